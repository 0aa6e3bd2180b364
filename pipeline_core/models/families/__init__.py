"""The model families the pack edits with, and how a checkpoint or folder is matched to one.

Families are asked in order, the most specific first (CosXL Edit is SDXL-IP2P plus EDM keys); the first that
recognises the model loads it. Adding a family = one module here, one entry in :data:`FAMILIES`, its configs.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ...errors import ModelLoadError
from .base import Family, TextEncoding, checkpoint_facts, describe_facts
from .cosxl import CosXLFamily
from .sd15 import SD15Family
from .sdxl import SDXLFamily

# Most specific first: a CosXL Edit file is an SDXL-IP2P file plus its edm_vpred.* keys.
FAMILIES: tuple[Family, ...] = (CosXLFamily(), SDXLFamily(), SD15Family())
_BY_NAME = {f.name: f for f in FAMILIES}


def get(name: str) -> Family:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ModelLoadError(f"unknown model family {name!r}; known: {', '.join(_BY_NAME)}") from None


def detect_checkpoint(state: Mapping[str, torch.Tensor], where: str) -> Family:
    """The family of a single-file checkpoint whose UNet has already been checked to take 8 channels."""
    for family in FAMILIES:
        if family.matches_checkpoint(state):
            return family
    raise ModelLoadError(
        f"{where}: an 8-channel (InstructPix2Pix-style) UNet of a family this pack does not know "
        f"({describe_facts(checkpoint_facts(state))}); supported: {', '.join(f.label for f in FAMILIES)}"
    )


def family_for_modules(modules: Mapping[str, object], scheduler_config: Mapping | None = None) -> str:
    """The family of bare modules (no checkpoint to read): two text encoders make SDXL, an EDM scheduler CosXL."""
    if modules.get("text_encoder_2") is None:
        return "sd15"
    if str((scheduler_config or {}).get("_class_name", "")).startswith("EDM"):
        return "cosxl"
    return "sdxl"


def detect_folder(where: str, index: dict, unet_config: dict, scheduler_config: dict) -> Family:
    for family in FAMILIES:
        if family.matches_folder(index, unet_config, scheduler_config):
            return family
    raise ModelLoadError(
        f"{where}: a diffusers folder of a family this pack does not know (UNet input channels "
        f"{unet_config.get('in_channels')}, cross-attention dim {unet_config.get('cross_attention_dim')}, "
        f"components {', '.join(sorted(k for k in index if not k.startswith('_')))}); supported: "
        f"{', '.join(f.label for f in FAMILIES)}"
    )


__all__ = ["FAMILIES", "Family", "TextEncoding", "detect_checkpoint", "detect_folder", "family_for_modules", "get"]
