"""Instruction conditioning: the encoded instruction and negative prompt, tied to the model that made them.

The family does the encoding (SD1.5: CLIP-L; SDXL: CLIP-L + CLIP-G with a pooled embedding); this module only
pairs the two texts and checks that a conditioning meets the model it was made with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..models.cache import CachedModel, ModelKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conditioning:
    model_key: ModelKey
    instruction: str
    negative: str
    instruction_embeds: torch.Tensor  # [1, tokens, dim], float32 on the CPU
    negative_embeds: torch.Tensor
    instruction_pooled: torch.Tensor | None = None  # [1, pooled_dim] for families with pooled text (SDXL)
    negative_pooled: torch.Tensor | None = None
    # ControlNets steering the edit (:class:`.control.Control`), in the order they were applied; chaining appends.
    controls: tuple = ()


def encode_instruction(model: CachedModel, instruction: str, negative: str = "") -> Conditioning:
    """Encode both texts. An empty negative is encoded as "" (as the original code and ComfyUI do), not zeroed."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError("the instruction is empty; write the edit you want, e.g. 'make it winter'")
    if not isinstance(negative, str):
        raise InputError(f"the negative prompt must be text, got {type(negative).__name__}")
    text, neg = model.encode_texts(instruction, negative)
    return Conditioning(model.key, instruction, negative, text.embeds, neg.embeds, text.pooled, neg.pooled)


def check_conditioning(model: CachedModel, cond: Conditioning) -> None:
    if not isinstance(cond, Conditioning):
        raise InputError(f"expected IP2P conditioning from the instruction node, got {type(cond).__name__}")
    if cond.model_key.base != model.key.base:
        raise InputError(
            f"the conditioning was encoded with {cond.model_key.describe()} but the sampler uses "
            f"{model.key.describe()}; connect the same model to both nodes"
        )
    if cond.model_key.loras != model.key.loras:
        # Same weights underneath, so the embeddings fit the UNet; like a native graph whose CLIP skipped the
        # LoRA loader, the text encoder's part of the LoRA is simply not in them.
        log.info("ip2p: the instruction was encoded with %s, the sampler runs %s", cond.model_key.describe(),
                 model.key.describe())
