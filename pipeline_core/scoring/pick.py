"""Picking the best edit of a sweep by the paper's trade-off.

The paper plots CLIP direction (how much the edit did what was asked) against CLIP image similarity (how much
of the input it kept) and reads the best settings off that curve: a stronger edit is only better while the
picture stays recognisably the input. So the pick maximises ``clip_direction`` among the edits whose
``clip_image`` is at least ``threshold``; if none keeps that much, the one that kept the most is chosen (and
the ranking says so), rather than the one that drifted furthest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import InputError
from .metrics import EditScore, check_cosine

log = logging.getLogger(__name__)

# The paper's comparisons sit at CLIP image similarity 0.75-0.9 for ViT-L/14 on photos; 0.8 keeps the subject.
DEFAULT_THRESHOLD = 0.8


@dataclass(frozen=True)
class Ranking:
    """Edits of one input, best first, and whether each kept enough of the input."""

    input_index: int
    order: list[int]  # indices into the scored batch, best first
    kept: list[bool]  # per entry of ``order``: clip_image >= threshold

    @property
    def best(self) -> int:
        return self.order[0]


def rank(scores: list[EditScore], indices: list[int], threshold: float) -> tuple[list[int], list[bool]]:
    kept = [i for i in indices if scores[i].clip_image >= threshold]
    rest = [i for i in indices if scores[i].clip_image < threshold]
    kept.sort(key=lambda i: -scores[i].clip_direction)
    rest.sort(key=lambda i: -scores[i].clip_image)
    return kept + rest, [True] * len(kept) + [False] * len(rest)


def pick_best(scores: list[EditScore], threshold: float = DEFAULT_THRESHOLD) -> list[Ranking]:
    """One :class:`Ranking` per input picture, in input order (ties keep the plan's order)."""
    if not scores:
        raise InputError("nothing to pick from: no scored edits")
    check_cosine(threshold, "threshold", "0.7-0.9")
    rankings = []
    for owner in sorted({s.input_index for s in scores}):
        order, kept = rank(scores, [i for i, s in enumerate(scores) if s.input_index == owner], threshold)
        if not kept[0]:
            log.warning("ip2p: no edit of input %d keeps clip_image >= %.2f; picked the closest to the input "
                        "(clip_image %.3f)", owner + 1, threshold, scores[order[0]].clip_image)
        rankings.append(Ranking(owner, order, kept))
    return rankings


def ranking_report(rankings: list[Ranking], scores: list[EditScore], labels: list[str] | None = None,
                   threshold: float = DEFAULT_THRESHOLD) -> str:
    lines = []
    for r in rankings:
        if len(rankings) > 1:
            lines.append(f"input {r.input_index + 1}:")
        for place, (i, kept) in enumerate(zip(r.order, r.kept), 1):
            s = scores[i]
            what = labels[i] if labels else f"edit {i + 1}"
            note = "" if kept else f" (clip_image below {threshold:g})"
            lines.append(f"{place}. {what}: clip_direction {s.clip_direction:.4f}, clip_image {s.clip_image:.4f}"
                         f"{note}")
    return "\n".join(lines)
