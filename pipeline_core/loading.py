"""Loading InstructPix2Pix models from diffusers folders, single-file checkpoints, or a Hub id.

Nothing here touches the network unless the user typed a Hub id: folders and single files load with
``local_files_only`` and with configs that ship in ``configs/``. Every failure names the file and says what to
do, because "size mismatch for conv_in.weight" helps nobody.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import ldm_format
from .errors import ModelLoadError
from .precision import Precision

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
IP2P_IN_CHANNELS = 8
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
ENV_TOKENIZER_DIR = "IP2P_TOKENIZER_DIR"


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
        """Guess the kind: an existing folder or file, else something that looks like ``owner/name``."""
        path = Path(location).expanduser()
        if path.is_dir():
            return cls("diffusers", str(path.resolve()), tokenizer_dir)
        if path.is_file():
            return cls("single_file", str(path.resolve()), tokenizer_dir)
        if location.count("/") == 1 and not location.startswith((".", "/", "~")) and not path.suffix:
            return cls("hub", location, tokenizer_dir)
        raise ModelLoadError(
            f"{location}: no such file or folder. Give a diffusers model folder (with model_index.json), a "
            f"single-file checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)}), or a Hugging Face id like owner/name."
        )


@dataclass
class IP2PComponents:
    """The loaded modules of one model, on one device, in the chosen precision."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    precision: Precision
    device: torch.device
    source: ModelSource
    family: str = "sd15"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def max_text_tokens(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing; the model folder is incomplete") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot be read as JSON ({exc}); the model folder is damaged") from None


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


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # Cast only when needed: diffusers warns on every dtype cast, even a no-op one, which would put a
    # meaningless warning in every user's log on every load.
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    module.to(device=device).eval().requires_grad_(False)


def _finish(unet, vae, text_encoder, tokenizer, scheduler_config, precision: Precision, device, source) -> IP2PComponents:
    for module, dtype in ((unet, precision.unet), (vae, precision.vae), (text_encoder, precision.text_encoder)):
        _place(module, device, dtype)
    if device.type == "cpu" and precision.unet == torch.bfloat16:
        # oneDNN's bf16 convolutions are fastest in NHWC: ~3x over fp32 NCHW for the UNet on AMX/AVX512-BF16
        # CPUs, and another ~20% off the VAE's bf16 time (measured at 256 px, benchmarks/speed.py).
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    return IP2PComponents(unet, vae, text_encoder, tokenizer, dict(scheduler_config), precision, device, source)


def load_diffusers_folder(path: Path, precision: Precision, device: torch.device, source: ModelSource) -> IP2PComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index = _read_json(path / "model_index.json")
    if "text_encoder_2" in index:
        raise ModelLoadError(
            f"{path.name}: an SDXL model; this version of the pack edits with SD1.x-based InstructPix2Pix models "
            "(e.g. timbrooks/instruct-pix2pix)"
        )
    unet_config = _read_json(path / "unet" / "config.json")
    check_unet_channels(int(unet_config.get("in_channels", 4)), f"{path.name}/unet")
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path.name}: the diffusers folder could not be loaded ({exc})") from exc
    return _finish(unet, vae, text_encoder, tokenizer, scheduler_config, precision, device, source)


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


def _default_configs() -> dict[str, Any]:
    folder = CONFIG_DIR / "sd15"
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in ("unet", "vae", "text_encoder", "scheduler")}


def find_tokenizer_dir(explicit: str | None) -> Path | None:
    """Local CLIP tokenizer files: the argument, ``$IP2P_TOKENIZER_DIR``, or ComfyUI's bundled SD1 tokenizer."""
    candidates = [explicit, os.environ.get(ENV_TOKENIZER_DIR)]
    if os.environ.get("COMFYUI_DIR"):
        candidates.append(str(Path(os.environ["COMFYUI_DIR"]) / "comfy" / "sd1_tokenizer"))
    for c in candidates:
        if c and (Path(c) / "vocab.json").is_file() and (Path(c) / "merges.txt").is_file():
            return Path(c)
    return None


def load_single_file(path: Path, precision: Precision, device: torch.device, source: ModelSource) -> IP2PComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    state, metadata = read_checkpoint(path)
    if not any(k.startswith(ldm_format.UNET_PREFIX) for k in state):
        raise ModelLoadError(
            f"{path.name}: no UNet weights ({ldm_format.UNET_PREFIX}*); it is not a full Stable Diffusion checkpoint "
            "(a LoRA, VAE or embedding file?)"
        )
    if any(k.startswith("conditioner.embedders.1.") for k in state):
        raise ModelLoadError(f"{path.name}: an SDXL checkpoint; this version of the pack edits with SD1.x-based IP2P models")
    conv_in = state.get(ldm_format.UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is None:
        raise ModelLoadError(f"{path.name}: the UNet has no input convolution; the file is damaged or not SD1.x")
    check_unet_channels(int(conv_in.shape[1]), path.name)

    configs = ldm_format.decode_metadata(metadata) or _default_configs()
    tokenizer_files = configs.pop("tokenizer", None)
    try:
        unet_sd, vae_sd, text_sd = ldm_format.from_ldm_state_dict(state, configs["unet"], configs["vae"])
        del state
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(configs["unet"])
            vae = AutoencoderKL.from_config(configs["vae"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        # assign=True adopts the file's tensors instead of copying into meta tensors; strict names every
        # missing or unexpected weight, which is how a file of another architecture shows.
        unet.load_state_dict(unet_sd, strict=True, assign=True)
        vae.load_state_dict(vae_sd, strict=True, assign=True)
        text_sd = ldm_format.match_text_encoder_keys(text_sd, set(text_encoder.state_dict()))
        missing, unexpected = text_encoder.load_state_dict(text_sd, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise RuntimeError(f"text encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:
        raise ModelLoadError(
            f"{path.name}: the weights do not fit an SD1.x InstructPix2Pix model ({str(exc)[:400]})"
        ) from exc
    getattr(text_encoder, "text_model", text_encoder).embeddings.register_buffer(
        "position_ids", torch.arange(text_encoder.config.max_position_embeddings).unsqueeze(0), persistent=False
    )
    tokenizer = _single_file_tokenizer(path, tokenizer_files, source.tokenizer_dir, CLIPTokenizer)
    if not 3 < len(tokenizer) <= text_encoder.config.vocab_size:
        raise ModelLoadError(
            f"{path.name}: the tokenizer has {len(tokenizer)} tokens but the text encoder knows "
            f"{text_encoder.config.vocab_size}; they do not belong together"
        )
    return _finish(unet, vae, text_encoder, tokenizer, configs["scheduler"], precision, device, source)


def _single_file_tokenizer(path: Path, embedded: dict[str, str] | None, tokenizer_dir: str | None, cls):
    import tempfile

    if embedded:
        # Our own small models carry their vocabulary; write it where the tokenizer class can read it.
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in embedded.items():
                (Path(tmp) / name).write_text(text)
            return cls.from_pretrained(tmp, local_files_only=True)
    found = find_tokenizer_dir(tokenizer_dir)  # needs vocab.json + merges.txt: the SD1.x CLIP layout
    if found is None:
        raise ModelLoadError(
            f"{path.name}: a single-file checkpoint carries no CLIP tokenizer, and none was found locally. Inside "
            f"ComfyUI it comes from ComfyUI's comfy/sd1_tokenizer; elsewhere pass --tokenizer-dir (a folder with "
            f"vocab.json and merges.txt), set {ENV_TOKENIZER_DIR} or COMFYUI_DIR, or use the diffusers folder form"
        )
    return cls.from_pretrained(str(found), local_files_only=True)


def download_hub_model(repo_id: str) -> Path:
    """The one place the pack touches the network, and only for an id the user typed."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*", "*.safetensors"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        log.info("ip2p: %s is not in the local Hugging Face cache; downloading it (only because it was typed)", repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise ModelLoadError(
            f"{repo_id}: could not be downloaded ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}). Offline? Copy the model "
            "folder (with model_index.json) into ComfyUI/models/diffusers/, or the single-file checkpoint into "
            "ComfyUI/models/instructpix2pix/, and pick it in the loader instead of typing an id"
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


def save_single_file(components_or_modules, path: Path, tokenizer_dir: Path | None = None, scheduler_config=None) -> Path:
    """Write unet + vae + text encoder as one LDM-layout ``.safetensors`` that this loader and ComfyUI read.

    The component configs go into the file's metadata, so models that are not exactly SD1.5-sized load too.
    """
    from safetensors.torch import save_file

    if isinstance(components_or_modules, IP2PComponents):
        unet, vae, text_encoder = (components_or_modules.unet, components_or_modules.vae, components_or_modules.text_encoder)
        scheduler_config = scheduler_config or components_or_modules.scheduler_config
    else:
        unet, vae, text_encoder = components_or_modules
    configs: dict[str, Any] = {
        "unet": dict(unet.config),
        "vae": dict(vae.config),
        "text_encoder": text_encoder.config.to_dict(),
        "scheduler": dict(scheduler_config or _default_configs()["scheduler"]),
    }
    if tokenizer_dir is not None:
        # Every file of the folder: transformers 4 writes vocab.json + merges.txt, transformers 5 tokenizer.json.
        configs["tokenizer"] = {
            f.name: f.read_text() for f in sorted(Path(tokenizer_dir).iterdir()) if f.suffix in (".json", ".txt")
        }
    state = {k: v.to("cpu") for k, v in ldm_format.to_ldm_state_dict(unet, vae, text_encoder).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=ldm_format.encode_metadata(_jsonable(configs)))
    return path


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not str(k).startswith("_") or k == "_class_name"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
