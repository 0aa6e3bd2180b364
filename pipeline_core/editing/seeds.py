"""Seed plans: which (seed, text guidance, image guidance) items a sampler run produces.

Each item's noise comes from its own generator seeded with the item's seed (initial latent and every
ancestral step), so an item is reproducible from its seed alone, whatever its position or the batch size.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass

import torch

from .. import limits
from ..errors import InputError
from .checks import check_int

SEED_MODES = ("fixed", "increment", "random")
MAX_SEED = int(limits.SEED.high)
MAX_PLAN_ITEMS = limits.PLAN_ITEMS


@dataclass(frozen=True)
class PlanItem:
    seed: int
    text_guidance: float | None = None  # None: the sampler's own setting
    image_guidance: float | None = None


@dataclass(frozen=True)
class SeedPlan:
    items: tuple[PlanItem, ...]

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> str:
        """One line per item, as the iterator reports it (the drawn seeds of random mode included)."""
        lines = []
        for i, it in enumerate(self.items):
            extra = ""
            if it.text_guidance is not None:
                extra += f" text_guidance={it.text_guidance:g}"
            if it.image_guidance is not None:
                extra += f" image_guidance={it.image_guidance:g}"
            lines.append(f"#{i} seed={it.seed}{extra}")
        return "\n".join(lines)

    @classmethod
    def single(cls, seed: int) -> "SeedPlan":
        return cls((PlanItem(check_seed(seed)),))


def check_seed(seed: int) -> int:
    """A seed as torch's generators take it: a whole number in 0..2**64-1 (beyond that torch overflows)."""
    return check_int(seed, "seed", limits.SEED, " — pick a seed in that range (the range of ComfyUI's seed widget)")


def parse_values(text: str, name: str, low: float = limits.TEXT_GUIDANCE.low,
                 high: float = limits.TEXT_GUIDANCE.high) -> tuple[float, ...]:
    """'5, 7.5, 10' -> (5.0, 7.5, 10.0); empty text -> () meaning 'use the sampler's value'."""
    values = []
    for part in text.replace(";", ",").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise InputError(
                f"{name}: {part!r} is not a number; write values separated by commas, e.g. 5, 7.5, 10"
            ) from None
        if not low <= v <= high:
            raise InputError(f"{name}: {v:g} is outside the useful range {low:g}..{high:g}")
        values.append(v)
    return tuple(values)


def make_plan(
    seed: int,
    count: int,
    mode: str = "increment",
    text_guidances: tuple[float, ...] = (),
    image_guidances: tuple[float, ...] = (),
) -> SeedPlan:
    """``count`` seeds (fixed / increment / random) crossed with the guidance lists, seeds outermost."""
    if mode not in SEED_MODES:
        raise InputError(f"unknown seed mode {mode!r}; choose one of: {', '.join(SEED_MODES)}")
    # Checked before any list is built: a count of 10**9 must fail here, not after filling the memory.
    count = check_int(count, "count (how many seeds)", limits.Range(1, MAX_PLAN_ITEMS, 1),
                      f"; the plan holds at most {MAX_PLAN_ITEMS} items")
    seed = check_seed(seed)
    if mode == "fixed":
        seeds = [seed] * count
    elif mode == "increment":
        seeds = [(seed + i) % (MAX_SEED + 1) for i in range(count)]
    else:
        # Fresh entropy on purpose: "random" is for exploring; the drawn values are reported so a good one
        # can be pinned with mode "fixed".
        seeds = [secrets.randbelow(2**32) for _ in range(count)]
    items = [
        PlanItem(s, t, i)
        for s, t, i in itertools.product(seeds, text_guidances or (None,), image_guidances or (None,))
    ]
    if len(items) > MAX_PLAN_ITEMS:
        raise InputError(
            f"the plan has {len(items)} items (seeds x text values x image values); the limit is {MAX_PLAN_ITEMS} — "
            "use fewer seeds or guidance values"
        )
    return SeedPlan(tuple(items))


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per item: CPU noise is the same on every device, so a seed means one picture."""
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
