"""The no-download demo: edit the shipped sample picture with the shipped toy model.

This is what ``ip2p-edit demo`` runs. It goes through the same path as every edit (model cache -> loader ->
instruction encoding -> dual-guidance sampler), only with the tiny model of :mod:`.training.toy`, which knows the
shapes world of :mod:`.training.synthetic` ("make the circle red", "remove the triangle", "add a green star", ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .editing.conditioning import encode_instruction
from .editing.edit import edit
from .editing.images import load_image, save_image
from .editing.seeds import PlanItem
from .models.assets import (
    SAMPLE_INSTRUCTION,
    TOY_IMAGE_GUIDANCE,
    TOY_TEXT_GUIDANCE,
    sample_image_path,
    toy_model_path,
)
from .models.cache import MODEL_CACHE, ModelCache
from .models.loading import ModelSource

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    path: Path  # the written picture: input | edit side by side, enlarged
    instruction: str
    input: torch.Tensor  # IMAGE [1, 32, 32, 3]
    output: torch.Tensor  # IMAGE [1, 32, 32, 3]


def run_demo(out_path: str | Path, instruction: str = SAMPLE_INSTRUCTION, image: str | Path | None = None,
             seed: int = 0, steps: int = 20, text_guidance: float = TOY_TEXT_GUIDANCE,
             image_guidance: float = TOY_IMAGE_GUIDANCE, scale: int = 8, cache: ModelCache | None = None) -> DemoResult:
    """Edit the sample picture (or ``image``) with the toy model; write ``input | edit`` enlarged ``scale`` times.

    The toy model works on 32 x 32 pictures, so the result is enlarged with nearest-neighbour sampling (every
    model pixel stays one visible square) rather than left thumbnail-sized.
    """
    cache = cache or MODEL_CACHE
    model = cache.get(cache.key_for(ModelSource("single_file", str(toy_model_path())), "fp32", "cpu"))
    picture = load_image(image or sample_image_path())
    result = edit(model, encode_instruction(model, instruction), picture, [PlanItem(seed=seed)], steps=steps,
                  text_guidance=text_guidance, image_guidance=image_guidance)
    pair = torch.cat([picture, result.images[:1]], dim=2)[0]
    big = pair.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    path = save_image(big, out_path)
    log.info("ip2p demo: %r on %s -> %s", instruction, Path(image or sample_image_path()).name, path)
    return DemoResult(Path(path), instruction, picture, result.images[:1])


__all__ = ["DemoResult", "TOY_TEXT_GUIDANCE", "run_demo"]
