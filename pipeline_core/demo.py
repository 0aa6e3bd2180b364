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
from .editing.edit import Progress, edit
from .editing.images import check_output_path, load_image, save_image
from .editing.seeds import PlanItem, check_seed
from .errors import InputError
from .models.assets import (
    SAMPLE_INSTRUCTION,
    TOY_IMAGE_GUIDANCE,
    TOY_MODEL_ALIAS,
    TOY_TEXT_GUIDANCE,
    sample_image_path,
)
from .models.cache import MODEL_CACHE, ModelCache
from .models.loading import ModelSource

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    path: Path  # the written picture: input | edit side by side, enlarged
    instruction: str
    input: torch.Tensor  # IMAGE [1, H, W, 3]: the sample's 32 x 32, or the given picture's size
    output: torch.Tensor  # IMAGE [1, H, W, 3]


# The written picture shows each half at about this many pixels on its longer side: the toy's 32 x 32 pictures
# are enlarged (8x), a big picture is left at its own size rather than multiplied into gigabytes.
DISPLAY_SIDE = 256


def run_demo(out_path: str | Path, instruction: str = SAMPLE_INSTRUCTION, image: str | Path | None = None,
             seed: int = 0, steps: int = 20, text_guidance: float = TOY_TEXT_GUIDANCE,
             image_guidance: float = TOY_IMAGE_GUIDANCE, scale: int = 8, cache: ModelCache | None = None,
             progress: Progress | None = None) -> DemoResult:
    """Edit the sample picture (or ``image``) with the toy model; write ``input | edit``, enlarged up to ``scale``x.

    The toy model works on 32 x 32 pictures, so the result is enlarged with nearest-neighbour sampling (every
    model pixel stays one visible square) rather than left thumbnail-sized; larger pictures are enlarged less,
    or not at all. Another picture is edited at the toy's 32 x 32 working size and scaled back, with a warning
    that the toy only knows its shapes world. Everything the user gave is checked before the model is loaded.
    ``progress(done, total, preview)`` is called after every step.
    """
    out_path = check_output_path(out_path)
    seed = check_seed(seed)
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError("the instruction is empty; write the edit you want, e.g. 'make the circle red'")
    source = Path(image) if image is not None else sample_image_path()
    picture = load_image(source)
    height, width = picture.shape[1:3]
    cache = cache or MODEL_CACHE
    model = cache.get(cache.key_for(ModelSource.from_path(TOY_MODEL_ALIAS), "fp32", "cpu"))
    side = model.components.working_resolution
    if (height, width) != (side, side):
        log.warning(
            "ip2p demo: %s is %dx%d; the toy model only knows %dx%d pictures of coloured shapes, so it is edited at "
            "that size and scaled back: expect a blurry result that has little to do with the instruction. For real "
            "pictures use `ip2p-edit edit PICTURE INSTRUCTION -o OUT --model <an InstructPix2Pix model>`",
            source.name, width, height, side, side,
        )
    result = edit(model, encode_instruction(model, instruction), picture, [PlanItem(seed=seed)], steps=steps,
                  text_guidance=text_guidance, image_guidance=image_guidance, progress=progress)
    pair = torch.cat([picture, result.images[:1]], dim=2)[0]
    factor = max(1, min(int(scale), DISPLAY_SIDE // max(height, width)))
    big = pair.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    path = save_image(big, out_path)
    log.info("ip2p demo: %r on %s -> %s", instruction, source.name, path)
    return DemoResult(Path(path), instruction, picture, result.images[:1])


__all__ = ["DemoResult", "TOY_TEXT_GUIDANCE", "run_demo"]
