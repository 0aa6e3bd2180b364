"""``--filter-clip``: keep only the edits that pass the InstructPix2Pix paper's CLIP filter.

The paper (Brooks et al., CVPR 2023, §3.1.2) generated many edits and kept those whose CLIP image similarity
(input vs edit) is at least 0.75 and whose directional similarity is at least 0.2, with ViT-L/14. The scores
are :func:`..scoring.score_edits`' own: the paper's direction when a row gives both captions, else measured from
the empty text to the instruction (see :mod:`..scoring.metrics`).

The scores are made by the driver from the picture as written (its 8 bits, as anyone re-scoring it would read
it), with one CLIP for the job, so they are the same whichever engine edited the picture. They are stored in the
row's record with a key over the CLIP's files and the texts measured against: new thresholds re-filter from
the stored scores (no edit, no CLIP), and only a new CLIP or new captions make a row's picture be scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..scoring.clip import ClipSource
from .keys import HashMemo

log = logging.getLogger(__name__)

# The paper's thresholds, for ViT-L/14 on photos.
PAPER_MIN_DIRECTION = 0.2
PAPER_MIN_IMAGE = 0.75
SCORE_VERSION = 1  # raised when how a score is made changes, so stored scores are made again
SCORE_FIELDS = ("clip_image", "clip_direction", "clip_text", "direction_from")


@dataclass
class ClipFilter:
    """The job's CLIP filter: which CLIP scores, on which device, and the least scores a kept edit has."""

    source: ClipSource
    min_direction: float
    min_image: float
    device: str = "cpu"
    _scorer: object = field(default=None, repr=False, compare=False)
    _identity: str | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        return f"CLIP {self.source.name}: clip_direction >= {self.min_direction:g} and clip_image >= {self.min_image:g}"

    def passes(self, record: dict) -> bool:
        return record["clip_direction"] >= self.min_direction and record["clip_image"] >= self.min_image

    def identify(self, memo: HashMemo) -> None:
        """Name the CLIP by its files' digest (a Hub CLIP by its id: its files are only known once loaded)."""
        self._identity = self.source.location if self.source.kind == "hub" else memo.path_digest(
            Path(self.source.location))

    def score_key(self, instruction: str, caption_before: str | None, caption_after: str | None) -> str:
        """What a row's scores were made from: the CLIP and the two texts its direction is measured between."""
        from ..scoring.metrics import texts_for

        if self._identity is None:
            raise RuntimeError("ClipFilter.identify must be called before score_key")
        before, after, _ = texts_for(instruction, caption_before, caption_after)
        record = {"v": SCORE_VERSION, "clip": self._identity, "before": before, "after": after}
        return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def load(self):
        """The loaded CLIP (once per job: :data:`..scoring.CLIP_CACHE` keeps it)."""
        from ..scoring import CLIP_CACHE

        if self._scorer is None:
            self._scorer = CLIP_CACHE.get(self.source, self.device)
        return self._scorer

    def score(self, image: Path, edited: Path, instruction: str, caption_before: str | None,
              caption_after: str | None, key: str) -> dict:
        """The record fields of an edit's scores: ``clip_image``, ``clip_direction``, ``clip_text``, where the
        direction was measured from, the CLIP's name and ``clip_key``; the CLIP is loaded on first use."""
        from ..editing.images import load_image
        from ..scoring import score_edits

        [s] = score_edits(self.load(), load_image(image), load_image(edited), instruction, caption_before,
                          caption_after)
        scores = s.as_dict()
        return {**{name: scores[name] for name in SCORE_FIELDS}, "clip": self.source.name, "clip_key": key}


def check_filter_args(filter_clip: str | None, min_direction: float | None, min_image: float | None,
                      device: str) -> ClipFilter | None:
    """The job's filter from the command line, checked before any model loads (None: no filter)."""
    from ..models.assets import TOY_CLIP_ALIAS, TOY_CLIP_THRESHOLD
    from ..scoring.metrics import check_cosine

    if filter_clip is None:
        if min_direction is not None or min_image is not None:
            raise InputError("--min-direction and --min-image are thresholds of the CLIP filter; give the CLIP to "
                             "score with too: --filter-clip toy (shapes only), a CLIP folder or a Hugging Face id")
        return None
    source = ClipSource.from_text(filter_clip)  # a mistyped folder fails now, before the edit model is loaded
    # The toy CLIP's space is coarse: correct edits of shapes pictures keep far less of them than 0.75.
    toy = filter_clip.strip() == TOY_CLIP_ALIAS
    direction = PAPER_MIN_DIRECTION if min_direction is None else check_cosine(min_direction, "--min-direction",
                                                                               "0.1-0.3")
    image = (TOY_CLIP_THRESHOLD if toy else PAPER_MIN_IMAGE) if min_image is None else check_cosine(
        min_image, "--min-image", "0.7-0.9")
    return ClipFilter(source, direction, image, device)
