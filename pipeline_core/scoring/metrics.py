"""The paper's CLIP measures of an edit (Brooks et al., CVPR 2023, §4.2; ``metrics/clip_similarity.py``).

For an input picture I, its edit I', and embeddings normalised to unit length (as the paper's code does):

- ``clip_image``     cos(E_img(I), E_img(I')): how much of the input the edit kept (1 = the same picture);
- ``clip_direction`` cos(E_img(I') - E_img(I), E_txt(after) - E_txt(before)): whether the picture changed the
  way the caption changed. With both captions given this is the paper's directional similarity exactly.
  Users usually know only the instruction, so then before = "" and after = the instruction: the paper's formula
  with the empty text as the "before" caption. Subtracting E_txt("") removes what every CLIP text embedding has
  in common, leaving the instruction's own direction; the figure is lower than the paper's (an instruction is
  not a caption of the result) and is comparable between edits of the same instruction, which is what picking
  the best of a sweep needs, not with the paper's published numbers;
- ``clip_text``      cos(E_img(I'), E_txt(after)): how well the result matches the output caption (or, without
  captions, the instruction).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import InputError
from .clip import ClipScorer


@dataclass(frozen=True)
class EditScore:
    clip_image: float
    clip_direction: float
    clip_text: float
    input_index: int  # which input picture this edit was made from
    direction_from: str  # "captions" (the paper's) or "instruction" (before = "")

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """A short caption line for a grid cell."""
        return f"dir {self.clip_direction:.3f} · img {self.clip_image:.3f}"


def check_cosine(value: float, name: str, useful: str) -> float:
    """``value`` if it can be a threshold on a cosine similarity (-1..1); ``useful`` says which values are."""
    if not -1.0 <= value <= 1.0:
        raise InputError(f"{name} {value:g}: a cosine similarity, in -1..1 ({useful} is useful)")
    return value


def texts_for(instruction: str = "", caption_before: str | None = None,
              caption_after: str | None = None) -> tuple[str, str, str]:
    """(before, after, which) for the direction: both captions, or "" and the instruction."""
    before = (caption_before or "").strip()
    after = (caption_after or "").strip()
    if before and after:
        return before, after, "captions"
    if before or after:
        missing = "caption_after" if before else "caption_before"
        raise InputError(f"only one caption was given; the paper's direction needs both — give {missing} too, or "
                         "leave both empty to measure against the instruction")
    if not instruction or not instruction.strip():
        raise InputError("nothing to measure the edit against: give the instruction (or both captions)")
    return "", instruction.strip(), "instruction"


def pair_inputs(n_inputs: int, n_edited: int) -> list[int]:
    """Which input each edit belongs to: the sampler's order is input-major (all plan items of input 1 first)."""
    if n_inputs < 1 or n_edited < 1:
        raise InputError("scoring needs at least one input and one edited picture")
    if n_edited % n_inputs:
        raise InputError(f"{n_edited} edited pictures for {n_inputs} inputs; connect the sampler's output made from "
                         "these inputs (each input gives the same number of edits)")
    per = n_edited // n_inputs
    return [k // per for k in range(n_edited)]


def score_edits(scorer: ClipScorer, inputs: torch.Tensor, edited: torch.Tensor, instruction: str = "",
                caption_before: str | None = None, caption_after: str | None = None) -> list[EditScore]:
    """Score every edited picture against the input it was made from (IMAGE batches ``[B, H, W, C]``)."""
    before, after, which = texts_for(instruction, caption_before, caption_after)
    owner = pair_inputs(int(inputs.shape[0]), int(edited.shape[0]))
    e_in = scorer.embed_images(inputs)[owner]
    e_out = scorer.embed_images(edited)
    t_before, t_after = scorer.embed_texts([before, after])
    image = F.cosine_similarity(e_in, e_out, dim=-1)
    direction = F.cosine_similarity(e_out - e_in, (t_after - t_before)[None], dim=-1)
    text = F.cosine_similarity(e_out, t_after[None], dim=-1)
    return [EditScore(float(i), float(d), float(t), o, which)
            for i, d, t, o in zip(image.tolist(), direction.tolist(), text.tolist(), owner)]


@dataclass(frozen=True)
class ScoredEdits:
    """A scored batch as the nodes pass it on: one score and one label line per edited picture."""

    scores: list[EditScore]
    labels: list[str]

    def __post_init__(self):
        if len(self.labels) != len(self.scores):
            raise InputError(f"{len(self.labels)} label lines for {len(self.scores)} scored edits; connect the labels "
                             "made with these pictures")

    def scored_labels(self) -> str:
        """The labels with each edit's scores appended: what a labelled grid shows under each cell."""
        return "\n".join(f"{label} · {s.label()}" if label else s.label() for label, s in zip(self.labels, self.scores))


def report(scores: list[EditScore], labels: list[str] | None = None) -> str:
    """One line per edit: its label (seed and guidance) and its three scores."""
    lines = []
    for k, s in enumerate(scores):
        what = labels[k] if labels else f"edit {k + 1}"
        lines.append(f"{what}: clip_direction {s.clip_direction:.4f}, clip_image {s.clip_image:.4f}, "
                     f"clip_text {s.clip_text:.4f}")
    return "\n".join(lines)
