"""Scoring edits with CLIP, as the InstructPix2Pix paper measures them, and picking the best of a sweep.

Runtime code (the nodes and the CLI use it); it never imports the training tools. ``clip`` loads a user's CLIP
(a transformers ``CLIPModel`` folder, a typed Hub id, or the shipped toy CLIP) and embeds pictures and texts;
``metrics`` computes CLIP image, direction and text similarity; ``pick`` ranks a sweep by the paper's trade-off.
"""

from .clip import CLIP_CACHE, ClipCache, ClipScorer, ClipSource
from .metrics import EditScore, ScoredEdits, score_edits
from .pick import DEFAULT_THRESHOLD, Ranking, pick_best

__all__ = ["CLIP_CACHE", "ClipCache", "ClipScorer", "ClipSource", "EditScore", "ScoredEdits", "score_edits",
           "DEFAULT_THRESHOLD", "Ranking", "pick_best"]
