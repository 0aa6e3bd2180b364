"""Loading InstructPix2Pix models from diffusers folders, single-file checkpoints, or a Hub id.

Nothing here touches the network unless the user typed a Hub id: folders and single files load with
``local_files_only`` and with configs that ship in ``configs/``. Every failure names the file and says what to
do, because "size mismatch for conv_in.weight" helps nobody.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError
from . import families, ldm_format
from .assets import TOY_MODEL_ALIAS, toy_model_path
from .components import IP2PComponents

# CONFIG_DIR, ENV_TOKENIZER_DIR and find_tokenizer_dir are part of this module's interface (the nodes and
# scripts use them); they live with the families, which read them.
from .families.base import CONFIG_DIR, ENV_TOKENIZER_DIR, find_tokenizer_dir, read_json  # noqa: F401
from .precision import Precision

log = logging.getLogger(__name__)

IP2P_IN_CHANNELS = 8
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a ``diffusers`` folder, a ``single_file`` checkpoint, or a ``hub`` id."""

    kind: str
    location: str
    # CLIP tokenizer files for single-file checkpoints, which carry none (ComfyUI passes its bundled ones).
    tokenizer_dir: str | None = None

    @property
    def name(self) -> str:
        return self.location if self.kind == "hub" else Path(self.location).name

    @classmethod
    def from_path(cls, location: str, tokenizer_dir: str | None = None) -> "ModelSource":
        """What the user typed as a model: ``toy``, an existing folder or file, or a Hugging Face id.

        Only a plain ``owner/name`` that is not a plausible local path is taken for a Hub id (the one way a
        download can start): a mistyped ``models/x`` or ``./ckpt/model.safetensors`` is reported as a missing
        local path instead of being looked up on the Hub.
        """
        if not isinstance(location, str) or not location.strip():
            raise ModelLoadError(f"no model given; {_MODEL_FORMS}")
        location = location.strip()
        if location == TOY_MODEL_ALIAS:
            return cls("single_file", str(toy_model_path()))
        path = Path(location).expanduser()
        if path.is_dir():
            return cls("diffusers", str(path.resolve()), tokenizer_dir)
        if path.is_file():
            return cls("single_file", str(path.resolve()), tokenizer_dir)
        why_local = _why_local_path(location)
        if why_local is None:
            return cls("hub", location, tokenizer_dir)
        raise ModelLoadError(
            f"{location}: no such file or folder ({path.resolve()} does not exist; {why_local}, so it was not looked "
            f"up on the Hugging Face Hub). Check the path; {_MODEL_FORMS}"
        )


_MODEL_FORMS = (
    "give a diffusers model folder (with model_index.json), a single-file checkpoint "
    f"({', '.join(SINGLE_FILE_SUFFIXES)}), '{TOY_MODEL_ALIAS}' for the shipped demo model, or a Hugging Face id "
    "like owner/name"
)
# Hugging Face's own rule for repo ids (huggingface_hub.utils.validate_repo_id), with the owner required.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
# Folder names of a ComfyUI tree: "models/x" is a path even run from elsewhere. Not "diffusers": that is also
# the Hub owner of real IP2P models (diffusers/sdxl-instructpix2pix-768).
_LOCAL_FOLDER_NAMES = {"models", "checkpoints", "input", "output", "custom_nodes"}


def _why_local_path(location: str) -> str | None:
    """Why ``location`` must be a local path and not a Hub id, or None where it may be a Hub id."""
    if location.startswith((".", "/", "~")) or "\\" in location or ":" in location:
        return "it is written as a path"
    if location.count("/") != 1:
        return "a Hugging Face id has exactly one '/' (owner/name)"
    if Path(location).suffix.lower() in SINGLE_FILE_SUFFIXES:
        return "it names a checkpoint file"
    owner = location.split("/")[0]
    if Path(owner).is_dir():
        return f"'{owner}/' is a folder here"
    if owner.lower() in _LOCAL_FOLDER_NAMES:
        return f"'{owner}/' is a ComfyUI folder name"
    if not _HUB_ID.fullmatch(location) or ".." in location or "--" in location or location.endswith(".git"):
        return "it is not a valid Hugging Face id"
    return None


def check_unet_channels(in_channels: int, where: str) -> None:
    if in_channels != IP2P_IN_CHANNELS:
        hint = (
            "it is a plain text-to-image model, not an InstructPix2Pix model"
            if in_channels == 4
            else "it is an inpainting model, not an InstructPix2Pix model"
            if in_channels == 9
            else "it is not an InstructPix2Pix model"
        )
        raise ModelLoadError(
            f"{where}: UNet has {in_channels} input channels; an InstructPix2Pix model has {IP2P_IN_CHANNELS} "
            f"({hint}) — pick an IP2P checkpoint such as instruct-pix2pix-00-22000.safetensors"
        )


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """State dict and safetensors metadata of a single-file checkpoint; pickles only through weights_only."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata()
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        # weights_only refuses arbitrary pickled code: a .ckpt from the internet cannot run anything here.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and pickle raise many types for a truncated or foreign file
        raise ModelLoadError(
            f"{path.name}: cannot be read as a checkpoint ({type(exc).__name__}: {exc}); the file is damaged, "
            "incomplete or not a model — download it again"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path.name}: holds no state dict of tensors; it is not a Stable Diffusion checkpoint")
    return obj, None


def load_diffusers_folder(path: Path, precision: Precision, device: torch.device,
                          source: ModelSource) -> IP2PComponents:
    index = read_json(path / "model_index.json")
    unet_config = read_json(path / "unet" / "config.json")
    check_unet_channels(int(unet_config.get("in_channels", 4)), f"{path.name}/unet")
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
    family = families.detect_folder(path.name, index, unet_config, scheduler_config)
    log.info("ip2p: %s is a %s", path.name, family.label)
    return family.load_folder(path, precision, device, source)


def load_single_file(path: Path, precision: Precision, device: torch.device, source: ModelSource) -> IP2PComponents:
    state, metadata = read_checkpoint(path)
    if not any(k.startswith(ldm_format.UNET_PREFIX) for k in state):
        raise ModelLoadError(
            f"{path.name}: no UNet weights ({ldm_format.UNET_PREFIX}*); it is not a full Stable Diffusion checkpoint "
            "(a LoRA, VAE or embedding file?)"
        )
    conv_in = state.get(ldm_format.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise ModelLoadError(f"{path.name}: the UNet has no input convolution; the file is damaged or not SD-based")
    check_unet_channels(int(conv_in.shape[1]), path.name)
    family = families.detect_checkpoint(state, path.name)
    log.info("ip2p: %s is a %s", path.name, family.label)
    return family.load_checkpoint(path, state, metadata, precision, device, source)


def download_hub_model(repo_id: str) -> Path:
    """The one place the pack touches the network, and only for an id the user typed."""
    from huggingface_hub import snapshot_download

    # tokenizer_2: SDXL-based models (CLIP-G pads differently from CLIP-L)
    patterns = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*", "*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        log.info("ip2p: %s is not in the local Hugging Face cache; downloading it (only because it was typed)", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise ModelLoadError(
            f"{repo_id}: could not be downloaded ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}). "
            "Offline? Copy the model folder (with model_index.json) into ComfyUI/models/diffusers/, or the "
            "single-file checkpoint into ComfyUI/models/instructpix2pix/, and pick it in the loader instead of typing "
            f"an id. If you meant a local path: {Path(repo_id).resolve()} does not exist either"
        ) from exc


def load_components(source: ModelSource, precision: Precision, device: torch.device | str) -> IP2PComponents:
    """Load the model ``source`` names; raises :class:`ModelLoadError` with the reason and the fix."""
    device = torch.device(device)
    if source.kind == "hub":
        folder = download_hub_model(source.location)
        return load_diffusers_folder(folder, precision, device, source)
    path = Path(source.location)
    if source.kind == "diffusers":
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json)")
        return load_diffusers_folder(path, precision, device, source)
    if source.kind == "single_file":
        if not path.is_file():
            raise ModelLoadError(f"{path}: file not found")
        return load_single_file(path, precision, device, source)
    raise ModelLoadError(f"unknown model source kind {source.kind!r}")


def save_single_file(components_or_modules, path: Path, tokenizer_dir: Path | None = None, scheduler_config=None,
                     family: str | None = None) -> Path:
    """Write a model as one original-layout ``.safetensors`` that this loader and ComfyUI's checkpoint loader read.

    ``components_or_modules``: loaded :class:`IP2PComponents`, or the modules as a tuple ``(unet, vae,
    text_encoder[, text_encoder_2])`` or a dict by role. The family is the components' own, else ``family``,
    else SD1.5 for one text encoder and SDXL for two (CosXL: pass ``family="cosxl"``, or an EDM
    ``scheduler_config``, whose sigmas become the file's ``edm_vpred.*`` keys). The component configs go into
    the file's metadata, so models that are not exactly the family's size load too.
    """
    from safetensors.torch import save_file

    if isinstance(components_or_modules, IP2PComponents):
        modules = components_or_modules.modules()
        scheduler_config = scheduler_config or components_or_modules.scheduler_config
        family = family or components_or_modules.family
    elif isinstance(components_or_modules, dict):
        modules = dict(components_or_modules)
    else:
        modules = dict(zip(("unet", "vae", "text_encoder", "text_encoder_2"), components_or_modules))
    spec = families.get(family or families.family_for_modules(modules, scheduler_config))
    configs: dict[str, Any] = {role: _module_config(m) for role, m in modules.items()}
    configs["scheduler"] = dict(scheduler_config or spec.shipped_configs(("scheduler",))["scheduler"])
    if tokenizer_dir is not None:
        # Every file of the folder: transformers 4 writes vocab.json + merges.txt, transformers 5 tokenizer.json.
        configs["tokenizer"] = {
            f.name: f.read_text() for f in sorted(Path(tokenizer_dir).iterdir()) if f.suffix in (".json", ".txt")
        }
    state = {k: v.to("cpu") for k, v in spec.checkpoint_state(modules, configs["scheduler"]).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=ldm_format.encode_metadata(_jsonable(configs)))
    return path


def _module_config(module) -> dict[str, Any]:
    config = module.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_") or k == "_class_name"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
