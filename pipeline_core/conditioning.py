"""Instruction conditioning: the encoded instruction and negative prompt, tied to the model that made them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import CachedModel, ModelKey
from .errors import InputError


@dataclass(frozen=True)
class Conditioning:
    model_key: ModelKey
    instruction: str
    negative: str
    instruction_embeds: torch.Tensor  # [1, tokens, dim], float32 on the CPU
    negative_embeds: torch.Tensor


def encode_instruction(model: CachedModel, instruction: str, negative: str = "") -> Conditioning:
    """Encode both texts. An empty negative is encoded as "", as the original code does (not zeros)."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError("the instruction is empty; write the edit you want, e.g. 'make it winter'")
    return Conditioning(model.key, instruction, negative, model.encode(instruction), model.encode(negative))


def check_conditioning(model: CachedModel, cond: Conditioning) -> None:
    if not isinstance(cond, Conditioning):
        raise InputError(f"expected IP2P conditioning from the instruction node, got {type(cond).__name__}")
    if cond.model_key != model.key:
        raise InputError(
            f"the conditioning was encoded with {cond.model_key.describe()} but the sampler uses "
            f"{model.key.describe()}; connect the same model to both nodes"
        )
