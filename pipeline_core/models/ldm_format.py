"""Single-file checkpoints in the original Stable Diffusion ("LDM") layout, both ways.

Reading uses diffusers' own converters (``diffusers.loaders.single_file_utils``), so a real
``instruct-pix2pix-00-22000.safetensors`` is read exactly as ``from_single_file`` would read it, but with
configs that ship with this pack instead of configs fetched from the Hub.

Writing is the inverse mapping, which diffusers keeps only as an out-of-package script. Files we write load in
ComfyUI's native checkpoint loader, A1111, and back through :func:`read_single_file`. Our own files also carry
their component configs (and, for models with their own vocabulary, the tokenizer) in the safetensors
metadata, so a small or non-standard model needs no config on the side.
"""

from __future__ import annotations

import json
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
METADATA_KEY = "ip2p_nodes.config"

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_TO_LDM = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _replace_head(key: str, mapping: dict[str, str]) -> str:
    for old, new in mapping.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return key


def _layers_per_block(config: dict[str, Any]) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError("only UNets with one layers_per_block for every block can be written as a single file")
    return lpb


def unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """A diffusers ``UNet2DConditionModel`` state-dict key in the LDM layout (without the prefix)."""
    stride = _layers_per_block(config) + 1
    parts = key.split(".")
    head = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for old, new in head.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.* -> input_blocks.n.0.op.*
            return f"input_blocks.{(block + 1) * stride}.0.op." + ".".join(parts[5:])
        layer, rest = int(parts[3]), ".".join(parts[4:])
        index = 1 + block * stride + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0." + _replace_head(rest, _RESNET_TO_LDM)
        return f"input_blocks.{index}.1." + rest
    if parts[0] == "up_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            has_attention = "CrossAttn" in config["up_block_types"][block]
            conv = 2 if has_attention else 1
            return f"output_blocks.{block * stride + stride - 1}.{conv}.conv." + ".".join(parts[5:])
        layer, rest = int(parts[3]), ".".join(parts[4:])
        index = block * stride + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0." + _replace_head(rest, _RESNET_TO_LDM)
        return f"output_blocks.{index}.1." + rest
    if parts[0] == "mid_block":
        kind, layer, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * layer}." + _replace_head(rest, _RESNET_TO_LDM)
        return "middle_block.1." + rest
    raise KeyError(f"no LDM name for UNet key {key!r}")


def vae_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """A diffusers ``AutoencoderKL`` state-dict key in the LDM layout (without the prefix)."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    coder, rest = parts[0], parts[1:]
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "conv_norm_out":
        return f"{coder}.norm_out." + ".".join(rest[1:])
    if rest[0] == "mid_block":
        kind, layer, tail = rest[1], int(rest[2]), ".".join(rest[3:])
        if kind == "resnets":
            return f"{coder}.mid.block_{layer + 1}." + _replace_head(tail, _VAE_RESNET_TO_LDM)
        return f"{coder}.mid.attn_1." + _replace_head(tail, _VAE_ATTN_TO_LDM)
    if rest[0] in ("down_blocks", "up_blocks"):
        block, kind = int(rest[1]), rest[2]
        if rest[0] == "up_blocks":
            # LDM numbers decoder levels from the lowest resolution up; diffusers from the top down.
            block = len(config["up_block_types"]) - 1 - block
            level = f"{coder}.up.{block}"
        else:
            level = f"{coder}.down.{block}"
        if kind == "downsamplers":
            return f"{level}.downsample." + ".".join(rest[4:])
        if kind == "upsamplers":
            return f"{level}.upsample." + ".".join(rest[4:])
        return f"{level}.block.{int(rest[3])}." + _replace_head(".".join(rest[4:]), _VAE_RESNET_TO_LDM)
    raise KeyError(f"no LDM name for VAE key {key!r}")


def to_ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict holding the three modules, as SD1.x single-file checkpoints do."""
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        out[UNET_PREFIX + unet_key_to_ldm(key, unet.config)] = value
    out.update(vae_to_ldm(vae))
    out.update(clip_to_ldm(text_encoder, CLIP_PREFIX))
    return {k: v.detach().contiguous() for k, v in out.items()}


def vae_to_ldm(vae, prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` in the LDM layout (SD1.x and SDXL files alike)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        ldm_key = vae_key_to_ldm(key, vae.config)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[prefix + ldm_key] = value
    return out


def clip_to_ldm(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP-L ``CLIPTextModel`` under ``prefix`` in transformers' own names (SD1.x; SDXL's first encoder)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in text_encoder.state_dict().items():
        if key.endswith("position_ids"):
            continue  # a derived buffer, rebuilt on load
        # transformers 5 dropped the "text_model." level of CLIPTextModel; single files always have it.
        out[prefix + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return out


def match_text_encoder_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Add or drop the ``text_model.`` level so keys match the installed transformers' CLIPTextModel."""
    wants_level = any(k.startswith("text_model.") for k in expected)
    out = {}
    for key, value in state.items():
        has_level = key.startswith("text_model.")
        if key in expected:
            pass  # already this transformers' name (CLIPTextModelWithProjection's text_projection sits above the level)
        elif has_level and not wants_level:
            key = key[len("text_model."):]
        elif wants_level and not has_level:
            key = "text_model." + key
        out[key] = value
    return out


def load_text_encoder(text_encoder, state: dict[str, torch.Tensor]) -> None:
    """Load converted CLIP weights into a (meta-initialised) text encoder; raise naming what does not fit."""
    state = match_text_encoder_keys(state, set(text_encoder.state_dict()))
    missing, unexpected = text_encoder.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"text encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")


def from_ldm_state_dict(checkpoint: dict[str, torch.Tensor], unet_config: dict, vae_config: dict):
    """Split an LDM-layout checkpoint into diffusers state dicts (unet, vae, text encoder)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    unet = convert_ldm_unet_checkpoint(checkpoint, dict(unet_config))
    vae = convert_ldm_vae_checkpoint(checkpoint, dict(vae_config))
    text = convert_ldm_clip_checkpoint(checkpoint)
    return unet, vae, text


def encode_metadata(configs: dict[str, Any]) -> dict[str, str]:
    return {METADATA_KEY: json.dumps(configs, sort_keys=True)}


def decode_metadata(metadata: dict[str, str] | None) -> dict[str, Any] | None:
    if not metadata or METADATA_KEY not in metadata:
        return None
    return json.loads(metadata[METADATA_KEY])
