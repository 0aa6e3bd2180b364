"""What every model family provides, and the parts they share.

A family is one class (the shape of ComfyUI's ``comfy/supported_models.py``): how to recognise its checkpoints
and folders, how to load them fully offline, how to encode text for its UNet, how its image latent is scaled,
which schedulers it samples with, and its defaults (working size, guidance). The editing code asks the family
and never which family it runs. Adding a family means adding one module here plus its configs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from ...errors import InputError, ModelLoadError
from .. import schedulers
from ..components import IP2PComponents
from ..ldm_format import load_text_encoder
from ..precision import Precision
from ..weights import load_folder_module

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
ENV_TOKENIZER_DIR = "IP2P_TOKENIZER_DIR"
UNET_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class TextEncoding:
    """One text as the UNet reads it."""

    embeds: torch.Tensor  # [1, tokens, context_dim], float32 on the CPU
    pooled: torch.Tensor | None = None  # [1, pooled_dim] (SDXL's CLIP-G projection), None where unused


def checkpoint_facts(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What a single file's keys say about its UNet: input channels, context dim, adm (pooled) width."""
    facts: dict[str, Any] = {"in_channels": None, "context_dim": None, "adm_channels": None}
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None:
        facts["in_channels"] = int(conv_in.shape[1])
    for key, value in state.items():
        if key.startswith(UNET_PREFIX) and key.endswith(".attn2.to_k.weight"):
            facts["context_dim"] = int(value.shape[1])
            break
    label = state.get(UNET_PREFIX + "label_emb.0.0.weight")
    if label is not None:
        facts["adm_channels"] = int(label.shape[1])
    return facts


def describe_facts(facts: Mapping[str, Any]) -> str:
    parts = [f"UNet input channels {facts.get('in_channels')}", f"context dim {facts.get('context_dim')}"]
    if facts.get("adm_channels"):
        parts.append(f"pooled/adm input {facts['adm_channels']}")
    return ", ".join(parts)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing; the model folder is incomplete") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot be read as JSON ({exc}); the model folder is damaged") from None


def find_tokenizer_dir(explicit: str | None) -> Path | None:
    """Local CLIP tokenizer files: the argument, ``$IP2P_TOKENIZER_DIR``, or ComfyUI's bundled SD1 tokenizer."""
    candidates = [explicit, os.environ.get(ENV_TOKENIZER_DIR)]
    if os.environ.get("COMFYUI_DIR"):
        candidates.append(str(Path(os.environ["COMFYUI_DIR"]) / "comfy" / "sd1_tokenizer"))
    for c in candidates:
        if c and (Path(c) / "vocab.json").is_file() and (Path(c) / "merges.txt").is_file():
            return Path(c)
    return None


def single_file_tokenizer(path: Path, embedded: dict[str, str] | None, tokenizer_dir: str | None, **kwargs):
    """The CLIP tokenizer of a single-file checkpoint: embedded in our own files, else found locally."""
    from transformers import CLIPTokenizer

    if embedded:
        # Our own small models carry their vocabulary; write it where the tokenizer class can read it.
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in embedded.items():
                (Path(tmp) / name).write_text(text)
            return CLIPTokenizer.from_pretrained(tmp, local_files_only=True, **kwargs)
    found = find_tokenizer_dir(tokenizer_dir)  # needs vocab.json + merges.txt: the CLIP BPE layout
    if found is None:
        raise ModelLoadError(
            f"{path.name}: a single-file checkpoint carries no CLIP tokenizer, and none was found locally. Inside "
            f"ComfyUI it comes from ComfyUI's comfy/sd1_tokenizer; elsewhere pass --tokenizer-dir (a folder with "
            f"vocab.json and merges.txt), set {ENV_TOKENIZER_DIR} or COMFYUI_DIR, or use the diffusers folder form"
        )
    return CLIPTokenizer.from_pretrained(str(found), local_files_only=True, **kwargs)


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Cast ``module`` to ``dtype`` (keeping the modules its class lists as fp32-only in fp32) on ``device``."""
    if next(module.parameters()).dtype != dtype:
        # diffusers' ModelMixin.to() warns "modules ... should be kept in float32: []" on every dtype cast, even
        # when its class keeps none (its list defaults to [] and the check is `is not None`). Doing what that
        # warning asks for -- keep the listed modules in fp32, cast the rest -- with torch's own Module.to()
        # leaves nothing to warn about. Our models are never quantized, the other case that override handles.
        torch.nn.Module.to(module, dtype=dtype)
        keep = getattr(module, "_keep_in_fp32_modules", None) or []
        if keep:
            for name, sub in module.named_modules():
                if any(k in name.split(".") for k in keep):
                    torch.nn.Module.to(sub, dtype=torch.float32)
    if next(module.parameters()).is_meta:  # deferred (memory-tight mode): read onto its device when first used
        module.eval().requires_grad_(False)
        return
    module.to(device=device).eval().requires_grad_(False)


def diffusers_load_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """Arguments for a diffusers model's ``from_pretrained`` on a local folder (transformers takes others).

    ``torch_dtype`` builds the weights in their final dtype (no fp32 copy to cast later). ``low_cpu_mem_usage``
    (meta-device init) is asked for only where ``accelerate``, which implements it in diffusers, is installed:
    diffusers' default asks for it always and, without accelerate, warns on every load and falls back to what
    ``False`` does anyway (skip the random init, then copy the weights in).
    """
    from diffusers.utils import is_accelerate_available

    return {"local_files_only": True, "torch_dtype": dtype, "low_cpu_mem_usage": is_accelerate_available()}


def uses_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a UNet or VAE in ``dtype`` on ``device`` keeps its convolution weights in channels_last.

    oneDNN's bf16 convolutions are fastest in NHWC: ~3x over fp32 NCHW for the UNet on AMX/AVX512-BF16 CPUs,
    and another ~20% off the VAE's bf16 time (measured at 256 px, benchmarks/speed.py). In fp32 it measured
    1.07x slower (``benchmarks/speed.py --sections levers``), so fp32 stays NCHW.
    """
    return torch.device(device).type == "cpu" and dtype == torch.bfloat16


def folder_unet_vae(path: Path, precision: Precision, device: torch.device | str = "cpu") -> dict[str, torch.nn.Module]:
    """A diffusers folder's UNet and VAE, read straight into their dtypes and layout (see :mod:`..weights`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return {
        role: load_folder_module(
            path / role, dtype, cls.from_config,
            lambda cls=cls, role=role, dtype=dtype: cls.from_pretrained(path, subfolder=role,
                                                                        **diffusers_load_kwargs(dtype)),
            channels_last=uses_channels_last(device, dtype),
        )
        for role, cls, dtype in (("unet", UNet2DConditionModel, precision.unet),
                                 ("vae", AutoencoderKL, precision.vae))
    }


def folder_text_encoder(path: Path, subfolder: str, model_class, dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers folder's CLIP text encoder (plain or ``WithProjection``), read straight into ``dtype``."""

    def load(text_encoder, state):
        load_text_encoder(text_encoder, state)
        fix_position_ids(text_encoder)  # a derived buffer: never in the file, left on the meta device by build

    return load_folder_module(
        path / subfolder, dtype, lambda config: model_class(model_class.config_class.from_dict(config)),
        lambda: model_class.from_pretrained(path, subfolder=subfolder, local_files_only=True), load,
    )


def fix_position_ids(text_encoder) -> None:
    """Rebuild CLIP's ``position_ids`` buffer, which single files do not carry (it is derived, not learned)."""
    getattr(text_encoder, "text_model", text_encoder).embeddings.register_buffer(
        "position_ids", torch.arange(text_encoder.config.max_position_embeddings).unsqueeze(0), persistent=False
    )


def check_tokenizer(path: Path, tokenizer, text_encoder) -> None:
    if not 3 < len(tokenizer) <= text_encoder.config.vocab_size:
        raise ModelLoadError(
            f"{path.name}: the tokenizer has {len(tokenizer)} tokens but the text encoder knows "
            f"{text_encoder.config.vocab_size}; they do not belong together"
        )


def tokenize(tokenizer, text: str, max_tokens: int) -> torch.Tensor:
    """Token ids padded to ``max_tokens``, warning when CLIP will not read the whole prompt."""
    ids = tokenizer(text, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt").input_ids
    full = tokenizer(text).input_ids
    if len(full) > max_tokens:
        log.warning("ip2p: the prompt is %d tokens long; CLIP reads the first %d, the rest is ignored", len(full),
                    max_tokens)
    return ids


class Family:
    """One model family. Subclasses set the class attributes and implement the loading and text encoding."""

    name: ClassVar[str]
    label: ClassVar[str]
    latent_format: ClassVar[str]  # ComfyUI's latent format (previews): "SD15" or "SDXL"
    config_dir: ClassVar[str]  # folder of configs/ with the shipped configs for single files
    default_resolution: ClassVar[int]  # working side when a UNet config gives no sample size
    default_guidance: ClassVar[tuple[float, float]]  # (text, image)
    default_scheduler: ClassVar[str]
    scale_image_latent: ClassVar[bool] = False
    # diffusers' LoRA loader mixin of the matching pipeline: converts kohya/A1111 keys for this family's layout
    # and loads adapters into its UNet and text encoders (see ..lora).
    lora_loader: ClassVar[type]
    # Scheduler names this family samples with; the shared table by default (EDM families override).
    scheduler_names: ClassVar[tuple[str, ...]] = schedulers.SCHEDULER_NAMES

    # ------------------------------------------------------------------------------------------ detection
    @classmethod
    def matches_checkpoint(cls, state: Mapping[str, torch.Tensor]) -> bool:
        raise NotImplementedError

    @classmethod
    def matches_folder(cls, index: dict, unet_config: dict, scheduler_config: dict) -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ loading
    def load_folder(self, path: Path, precision: Precision, device: torch.device, source) -> IP2PComponents:
        raise NotImplementedError

    def load_checkpoint(self, path: Path, state: dict, metadata: dict | None, precision: Precision,
                        device: torch.device, source) -> IP2PComponents:
        raise NotImplementedError

    def checkpoint_state(self, modules: dict[str, torch.nn.Module], scheduler_config: dict) -> dict[str, torch.Tensor]:
        """The modules in the original single-file layout that ComfyUI's ``CheckpointLoaderSimple`` reads."""
        raise NotImplementedError

    @classmethod
    def shipped_configs(cls, roles: tuple[str, ...]) -> dict[str, Any]:
        folder = CONFIG_DIR / cls.config_dir
        return {role: json.loads((folder / f"{role}.json").read_text()) for role in roles}

    def assemble(self, modules: dict[str, Any], scheduler_config: dict, precision: Precision, device: torch.device,
                 source) -> IP2PComponents:
        """Put loaded modules on ``device`` in ``precision`` and wrap them as this family's components."""
        dtypes = {"unet": precision.unet, "vae": precision.vae}
        for role, module in modules.items():
            if isinstance(module, torch.nn.Module):
                place(module, device, dtypes.get(role, precision.text_encoder))
        for role in ("unet", "vae"):
            if uses_channels_last(device, dtypes[role]):
                # A no-op for folders (read in this layout); single files and from_pretrained are converted here.
                modules[role].to(memory_format=torch.channels_last)
        return IP2PComponents(
            unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"],
            tokenizer=modules["tokenizer"], text_encoder_2=modules.get("text_encoder_2"),
            tokenizer_2=modules.get("tokenizer_2"), scheduler_config=dict(scheduler_config), precision=precision,
            device=device, source=source, family=self.name,
        )

    # ------------------------------------------------------------------------------------------ conditioning
    def encode_text(self, components: IP2PComponents, text: str) -> TextEncoding:
        raise NotImplementedError

    def time_ids(self, components: IP2PComponents, original_size: tuple[int, int], target_size: tuple[int, int],
                 crop: tuple[int, int] = (0, 0)) -> torch.Tensor | None:
        """Extra size conditioning of the UNet (SDXL's micro-conditioning); None where the family has none."""
        return None

    def image_latent_scale(self, components: IP2PComponents) -> float:
        """Factor on the image latent the UNet is conditioned on (the paper: unscaled; CosXL: scaled)."""
        return components.scaling_factor if self.scale_image_latent else 1.0

    # ------------------------------------------------------------------------------------------ sampling
    def resolve_scheduler(self, name: str | None, scheduler_config: dict) -> str:
        """The scheduler name a run uses: ``auto``/None is the model's own (its folder's, else the family's)."""
        if name in (None, "", schedulers.AUTO):
            own = schedulers.name_for_class(scheduler_config.get("_class_name"))
            return own if own in self.scheduler_names else self.default_scheduler
        if name not in self.scheduler_names:
            if name not in schedulers.SCHEDULER_CHOICES:
                raise InputError(
                    f"unknown scheduler {name!r}; choose one of: {', '.join(schedulers.SCHEDULER_CHOICES)}"
                )
            raise InputError(
                f"{self.label} models cannot sample with {name!r}; choose one of: "
                f"{', '.join((schedulers.AUTO,) + tuple(self.scheduler_names))}"
            )
        return name

    def make_scheduler(self, name: str | None, scheduler_config: dict):
        """A fresh scheduler (schedulers hold per-run state) of the named kind, from the model's config."""
        return schedulers.make_scheduler(self.resolve_scheduler(name, scheduler_config), scheduler_config)

    def describe(self) -> str:
        text, image = self.default_guidance
        return f"{self.label} (defaults: text guidance {text:g}, image guidance {image:g})"
