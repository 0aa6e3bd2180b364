"""Loading ControlNets for an InstructPix2Pix model, fully offline, and keeping them loaded.

A ControlNet is a trained copy of its base model's UNet encoder plus a small hint encoder, so its architecture
is the IP2P model's own UNet encoder with 4 latent input channels (it sees the noisy latent, never the image
latent). That is why no config has to ship or be guessed: :func:`controlnet_config` builds it from the IP2P
model's UNet config (as diffusers' ``ControlNetModel.from_unet`` does) and the file's hint-encoder shapes, and
a file made for another base model (SD2.x, SDXL for an SD1.5 model) is recognised by its shapes and refused
with its name before any sampling work.

Layouts read:

- a diffusers folder (``config.json`` + weights), as ``save_pretrained`` writes it;
- one ``.safetensors`` (or ``.bin``/``.pth``/``.pt``/``.ckpt``, read with ``torch.load(weights_only=True)``) of
  diffusers keys (``controlnet_cond_embedding.*``);
- one file in the original ControlNet layout (``input_hint_block.*``, ``zero_convs.*``; ControlNet 1.1 and the
  fp16 safetensors ComfyUI users have), also with lllyasviel's ``control_model.`` prefix, converted with
  diffusers' own ``convert_controlnet_checkpoint``.

ControlNet-LoRA, T2I-Adapter and other control formats are refused by name. Loaded ControlNets are kept in
:data:`CONTROLNET_CACHE`, keyed by file, modification time, precision, device and architecture.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import InputError
from .cache import CachedModel
from .loading import read_checkpoint

log = logging.getLogger(__name__)

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
ORIGINAL_PREFIX = "control_model."  # lllyasviel's ControlNet 1.0 files: the ControlNet inside a full SD checkpoint
DIFFUSERS_HINT_KEY = "controlnet_cond_embedding.conv_in.weight"
ORIGINAL_HINT_KEY = "input_hint_block.0.weight"
# Settings of a UNet config that ControlNetModel takes over unchanged (the list diffusers' from_unet copies).
_FROM_UNET = (
    "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
    "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
    "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention",
    "resnet_time_scale_shift", "projection_class_embeddings_input_dim", "mid_block_type",
)


@dataclass(frozen=True)
class LoadedControlNet:
    """A ControlNet ready to run: the diffusers module on the IP2P model's device, in its UNet's dtype."""

    name: str  # the file or folder name, for messages
    module: Any  # diffusers ControlNetModel
    layout: str  # "diffusers" or "original"

    def __repr__(self) -> str:  # a workflow's error message shows this, not a module dump
        return f"ControlNet({self.name}, {self.layout} layout)"


def _refuse_other_formats(name: str, state: Mapping[str, torch.Tensor]) -> None:
    keys = list(state)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        raise InputError(f"{name}: a full Stable Diffusion checkpoint, not a ControlNet — put a ControlNet file "
                         "(e.g. control_v11p_sd15_canny_fp16.safetensors) in the controlnet folder")
    if "lora_controlnet" in state:
        raise InputError(f"{name}: a ControlNet-LoRA (Stability's control-lora); only full ControlNets are "
                         "supported — use a full ControlNet file")
    if any("lora_down" in k or "lora_A" in k or k.startswith("lora_") for k in keys):
        raise InputError(f"{name}: a LoRA, not a ControlNet")
    if any(k.startswith(("body.", "adapter.")) for k in keys):
        raise InputError(f"{name}: a T2I-Adapter, not a ControlNet; only ControlNets are supported")
    raise InputError(
        f"{name}: not a ControlNet (it has no hint encoder, {DIFFUSERS_HINT_KEY} or {ORIGINAL_HINT_KEY}); pick a "
        "ControlNet file such as control_v11p_sd15_canny_fp16.safetensors"
    )


def split_layout(name: str, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """("diffusers" | "original", the ControlNet's own keys), or an :class:`InputError` naming the file."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in state):
        state = {k[len(ORIGINAL_PREFIX):]: v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX)}
    if DIFFUSERS_HINT_KEY in state:
        return "diffusers", state
    if ORIGINAL_HINT_KEY in state:
        return "original", state
    _refuse_other_formats(name, state)
    raise AssertionError("unreachable")


def _hint_channels(layout: str, state: Mapping[str, torch.Tensor]) -> tuple[int, tuple[int, ...]]:
    """(hint image channels, conditioning_embedding_out_channels) from the hint encoder's convolutions.

    The encoder is conv_in, then pairs of (same-width conv, stride-2 conv to the next width), then conv_out;
    the widths are conv_in's output and each pair's second output.
    """
    if layout == "diffusers":
        first = state[DIFFUSERS_HINT_KEY]
        blocks = sorted(int(k.split(".")[2]) for k in state
                        if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight"))
        convs = [state[f"controlnet_cond_embedding.blocks.{i}.weight"] for i in blocks]
    else:
        first = state[ORIGINAL_HINT_KEY]
        # Convolutions sit at even indices of one Sequential (SiLUs between); the last one is conv_out.
        indices = sorted(int(k.split(".")[1]) for k in state if k.startswith("input_hint_block.") and k.endswith(
            ".weight"))
        convs = [state[f"input_hint_block.{i}.weight"] for i in indices[1:-1]]
    widths = [int(first.shape[0])] + [int(w.shape[0]) for w in convs[1::2]]
    return int(first.shape[1]), tuple(widths)


def _cross_attention_width(state: Mapping[str, torch.Tensor]) -> int | None:
    for key, value in state.items():
        if key.endswith("attn2.to_k.weight"):
            return int(value.shape[1])
    return None


def controlnet_config(unet_config: Mapping[str, Any], layout: str, state: Mapping[str, torch.Tensor],
                      name: str, model_name: str) -> dict[str, Any]:
    """The ControlNetModel config for a file that fits this IP2P UNet; an :class:`InputError` when it does not."""
    width = _cross_attention_width(state)
    expected_width = int(unet_config["cross_attention_dim"])
    if width is not None and width != expected_width:
        base = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
        raise InputError(
            f"{name}: a ControlNet for {base.get(width, 'another model')} (text width {width}), but {model_name} "
            f"reads text {expected_width} wide ({base.get(expected_width, 'its own base')}); pick a ControlNet "
            "made for the IP2P model's base model"
        )
    conv_in = state["conv_in.weight" if layout == "diffusers" else "input_blocks.0.0.weight"]
    block_out = tuple(unet_config["block_out_channels"])
    if int(conv_in.shape[0]) != int(block_out[0]):
        raise InputError(
            f"{name}: its UNet blocks are {int(conv_in.shape[0])} channels wide, {model_name}'s are {block_out[0]}; "
            "it is a ControlNet for another base model"
        )
    sdxl_like = unet_config.get("addition_embed_type") == "text_time"
    has_added = any(k.startswith(("add_embedding.", "label_emb.")) for k in state)
    if sdxl_like != has_added:
        raise InputError(
            f"{name}: a ControlNet for {'an SDXL' if has_added else 'an SD1.x/2.x'} model, but {model_name} is "
            f"{'SDXL' if sdxl_like else 'SD1.x'}-based; pick a ControlNet made for its base model"
        )
    hint_channels, embedding = _hint_channels(layout, state)
    config = {key: unet_config[key] for key in _FROM_UNET if key in unet_config}
    config.update(
        in_channels=int(conv_in.shape[1]),
        conditioning_channels=hint_channels,
        conditioning_embedding_out_channels=embedding,
    )
    return config


def _to_diffusers_keys(state: dict[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint(state, dict(config))
    if "label_emb.0.0.weight" in state:
        # convert_controlnet_checkpoint maps the layers only; SDXL's added embedding is named as in its UNets.
        for new, old in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
            converted[new] = state[old]
    return {k: v for k, v in converted.items() if v is not None}


def _build(config: dict[str, Any], state: dict[str, torch.Tensor], name: str, model_name: str,
           device: torch.device, dtype: torch.dtype):
    from diffusers import ControlNetModel

    # Cast before assigning: the module then needs no .to() (which diffusers' ModelMixin warns about for dtypes).
    state = {k: v.to(device, dtype) for k, v in state.items()}

    # On the meta device and then assigned: no time spent on a random initialisation the file overwrites.
    with torch.device("meta"):
        module = ControlNetModel.from_config(config)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise InputError(
            f"{name}: its weights do not fit a ControlNet for {model_name} ({detail}); it is a ControlNet for another "
            "base model or a damaged file"
        ) from exc
    return module


def _read_folder(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = json.loads((path / "config.json").read_text())
    if config.get("_class_name") not in (None, "ControlNetModel"):
        raise InputError(f"{path.name}: a {config.get('_class_name')} folder, not a ControlNet")
    for weights in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                    "diffusion_pytorch_model.bin"):
        if (path / weights).is_file():
            state, _ = read_checkpoint(path / weights)
            return config, state
    raise InputError(f"{path.name}: a ControlNet folder without weights (diffusion_pytorch_model.safetensors)")


def load_controlnet(path: str | Path, model: CachedModel) -> LoadedControlNet:
    """Load the ControlNet at ``path`` for ``model`` (its device and UNet dtype); see the module docstring."""
    path = Path(path)
    name = path.name
    c = model.components
    model_name = model.key.source.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{name}: a folder without config.json; give a ControlNet file or diffusers folder")
        folder_config, state = _read_folder(path)
        layout = "diffusers"
        if DIFFUSERS_HINT_KEY not in state:
            _refuse_other_formats(name, state)
    elif path.is_file():
        if path.suffix.lower() not in CONTROLNET_SUFFIXES:
            raise InputError(f"{name}: not a model file ({', '.join(CONTROLNET_SUFFIXES)})")
        folder_config = None
        state, _ = read_checkpoint(path)
        layout, state = split_layout(name, state)
    else:
        raise InputError(f"{path}: no such ControlNet file")
    config = controlnet_config(dict(c.unet.config), layout, state, name, model_name)
    if folder_config is not None:
        if int(folder_config.get("cross_attention_dim", 0)) != config["cross_attention_dim"]:
            raise InputError(f"{name}: its config.json does not match its weights")
        # What the weights cannot say: the hint's channel order and pooled hints (shuffle ControlNets).
        for key in ("controlnet_conditioning_channel_order", "global_pool_conditions"):
            if key in folder_config:
                config[key] = folder_config[key]
    if layout == "original":
        state = _to_diffusers_keys(state, config)
    module = _build(config, state, name, model_name, c.device, c.precision.unet).eval().requires_grad_(False)
    log.info("ip2p: loaded ControlNet %s (%s layout) for %s", name, layout, model_name)
    return LoadedControlNet(name, module, layout)


class ControlNetCache:
    """Lock-guarded LRU of loaded ControlNets, keyed by file, mtime, precision, device and architecture.

    A file changed on disk (new mtime) is read again; the same file for two IP2P models of one architecture on
    one device is loaded once.
    """

    def __init__(self, max_items: int = 4):
        self.max_items = max_items
        self._items: OrderedDict[tuple, LoadedControlNet] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # files actually read; tests read it

    @staticmethod
    def key_for(path: str | Path, model: CachedModel) -> tuple:
        path = Path(path).resolve()
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            stamp = None  # load_controlnet reports the missing file
        arch = json.dumps(dict(model.components.unet.config), sort_keys=True, default=str)
        return str(path), stamp, model.key.precision, model.key.device, arch

    def get(self, path: str | Path, model: CachedModel) -> LoadedControlNet:
        key = self.key_for(path, model)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
            loaded = load_controlnet(path, model)
            self.loads += 1
            self._items[key] = loaded
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
            return loaded

    def clear(self) -> int:
        with self._lock:
            count = len(self._items)
            self._items.clear()
        return count

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


CONTROLNET_CACHE = ControlNetCache()
"""The one ControlNet cache the nodes and the CLI share. Tests build their own or call ``clear()``."""
