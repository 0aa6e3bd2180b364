"""The settings of one edit, validated once against :mod:`..limits` before any model work starts.

Every check gives a message that says what was wrong and the useful range, because in ComfyUI the message is
all the user sees. The nodes and the CLI build their widgets and options from the same limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Real
from typing import Sequence

from .. import limits
from ..errors import InputError
from .checks import check_float, check_int
from .seeds import PlanItem, SeedPlan, check_seed


def check_strength(strength: float) -> float:
    bounds = limits.DENOISE
    if isinstance(strength, bool) or not isinstance(strength, Real) or not math.isfinite(strength) or (
        strength not in bounds
    ):
        raise InputError(
            f"denoise must be above 0 and at most 1 ({bounds.low:g}..{bounds.high:g}), got {strength!r}: 1 redraws "
            "the picture under the image condition, 0.3-0.6 keeps its layout and colours"
        )
    return float(strength)


def _check_choice(value, name: str, choices: tuple[str, ...], meaning: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}, got {value!r}: {meaning}")
    return value


def check_speed(speed) -> str:
    return _check_choice(speed, "speed", limits.SPEEDS, "quality runs the whole model on every step; fast reuses "
                         "its deep features across steps for a faster, slightly different edit")


def check_vram(vram) -> str:
    return _check_choice(vram, "vram", limits.VRAM_MODES, "low keeps one model part on the device at a time (for "
                         "small GPUs), normal keeps them all, auto picks low when free memory is short")


def _optional_size(value, name: str, low: int, high: int) -> int | None:
    if value in (None, 0):
        return None
    return check_int(value, name, limits.Range(low, high, 0), "; use 0 for the model's own")


@dataclass(frozen=True)
class EditSettings:
    """Everything about an edit except the model, the pictures, the instruction and the seeds.

    Build with :meth:`checked` (or call it on an instance): the result has plain ints/floats within the
    limits, or an :class:`InputError` names the first bad setting.
    """

    steps: int = int(limits.STEPS.default)
    text_guidance: float = limits.TEXT_GUIDANCE.default
    image_guidance: float = limits.IMAGE_GUIDANCE.default
    scheduler: str | None = None  # None / "auto": the model's own
    max_batch: int = int(limits.MAX_BATCH.default)
    feather: int = 0
    denoise: float = 1.0
    working_resolution: int | None = None  # None/0: the model's own
    max_side: int | None = None  # None/0: no cap below the hard limit
    upscale_small: bool = False
    restore_detail: bool = True
    crop_to_mask: bool = False
    crop_padding: int | None = None  # None: automatic
    speed: str = "quality"  # a name of limits.SPEEDS
    fast_interval: int = int(limits.FAST_INTERVAL.default)  # fast mode: one full UNet step of every this many
    vram: str = "auto"  # a name of limits.VRAM_MODES

    @property
    def cache_interval(self) -> int | None:
        """The step cache's interval in fast mode, None in quality mode (the whole UNet every step)."""
        return self.fast_interval if self.speed == "fast" else None

    def checked(self) -> "EditSettings":
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise InputError(f"scheduler must be a name, got {self.scheduler!r}")
        padding = self.crop_padding
        if padding is not None:
            padding = check_int(padding, "crop padding", limits.Range(0, limits.MAX_WORKING_SIDE, 0))
        return replace(
            self,
            steps=check_int(self.steps, "steps", limits.STEPS, " (20 is usual)"),
            text_guidance=check_float(self.text_guidance, "text guidance", limits.TEXT_GUIDANCE),
            image_guidance=check_float(self.image_guidance, "image guidance", limits.IMAGE_GUIDANCE),
            max_batch=check_int(self.max_batch, "max batch", limits.MAX_BATCH),
            feather=check_int(self.feather, "feather (px)", limits.FEATHER),
            denoise=check_strength(self.denoise),
            working_resolution=_optional_size(
                self.working_resolution, "working resolution", int(limits.WORKING_RESOLUTION.low),
                int(limits.WORKING_RESOLUTION.high),
            ),
            max_side=_optional_size(self.max_side, "max side", int(limits.WORKING_RESOLUTION.low),
                                    limits.MAX_WORKING_SIDE),
            upscale_small=bool(self.upscale_small),
            restore_detail=bool(self.restore_detail),
            crop_to_mask=bool(self.crop_to_mask),
            crop_padding=padding,
            speed=check_speed(self.speed),
            fast_interval=check_int(self.fast_interval, "fast interval", limits.FAST_INTERVAL,
                                    " (2 is the default; 1 runs the whole UNet every step, as quality does)"),
            vram=check_vram(self.vram),
        )

    def guidance_for(self, item: PlanItem) -> tuple[float, float]:
        """(text, image) guidance of one plan item: its own values where it has them, else these settings'."""
        s_t = self.text_guidance if item.text_guidance is None else item.text_guidance
        s_i = self.image_guidance if item.image_guidance is None else item.image_guidance
        return (check_float(s_t, "text guidance", limits.TEXT_GUIDANCE),
                check_float(s_i, "image guidance", limits.IMAGE_GUIDANCE))


def plan_items(plan: SeedPlan | Sequence[PlanItem]) -> list[PlanItem]:
    """The plan's items, each with a valid seed (a seed beyond 64 bits would overflow inside torch)."""
    items = list(plan.items if isinstance(plan, SeedPlan) else plan)
    if not items:
        raise InputError("the seed plan is empty; give at least one seed")
    for item in items:
        if not isinstance(item, PlanItem):
            raise InputError(f"a seed plan holds PlanItem entries, got {type(item).__name__}")
    if len(items) > limits.PLAN_ITEMS:
        raise InputError(
            f"the plan has {len(items)} items; the limit is {limits.PLAN_ITEMS} — use fewer seeds or guidance values"
        )
    # An integral float seed (5.0) is taken as the int torch's generators need.
    return [replace(item, seed=check_seed(item.seed)) for item in items]
