"""Does CLIP scoring tell good edits from bad ones? Measured on the shapes world, where the truth is known.

The toy model edits held-out triplets over a plan of seeds x text guidance values; every edit is rule-checked
(:func:`.evaluation.rule_check`: success or failure, exactly) and scored with a CLIP (by default the shipped toy
CLIP) using the scenes' captions before and after, as the paper scores its edits. Two figures:

- ROC AUC of ``clip_direction`` for separating rule-check successes from failures (0.5 = chance, 1 = perfect);
- the success rate of :func:`..scoring.pick_best` per triplet against the best *single* fixed setting
  (seed and guidance) of the plan: picking per picture beats any one setting only if the score means something.

``python -m ip2p_nodes.pipeline_core.training.score_eval`` prints both for the shipped toy model and toy CLIP.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch

from ..models.assets import TOY_CLIP_THRESHOLD
from ..scoring import ClipScorer, pick_best, score_edits
from . import synthetic
from .evaluation import rule_check
from .toy_clip import captions_of

log = logging.getLogger(__name__)

PLAN_SEEDS = (0, 1, 2, 3)
PLAN_TEXT_GUIDANCE = (1.5, 3.0, 7.5)  # the toy's weak, best and the paper's (over-saturating for the toy) values
PLAN_IMAGE_GUIDANCE = 1.5
TOY_THRESHOLD = TOY_CLIP_THRESHOLD  # the toy CLIP's scale (see models/assets.py); `report` prints true edits'


@dataclass
class SweepResult:
    triplets: list[synthetic.Triplet]
    settings: list[tuple[int, float]]  # (seed, text guidance) per column, in the plan's order
    success: np.ndarray  # [triplets, settings] bool
    direction: np.ndarray  # [triplets, settings]
    image: np.ndarray
    scores: list[list]  # EditScore per triplet per setting


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half): Mann-Whitney U."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        raise ValueError("ROC AUC needs both successes and failures")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def sweep(model, scorer: ClipScorer, triplets: list[synthetic.Triplet], seeds=PLAN_SEEDS,
          text_guidance=PLAN_TEXT_GUIDANCE, image_guidance: float = PLAN_IMAGE_GUIDANCE,
          steps: int = 20) -> SweepResult:
    from ..editing.conditioning import encode_instruction
    from ..editing.edit import edit
    from ..editing.seeds import make_plan

    # One sampler run per triplet over the whole plan (as the Seed Batch node makes it): each picture depends only
    # on its own seed and guidance, so this equals editing setting by setting, at a fraction of the calls.
    plan = make_plan(seeds[0], len(seeds), "increment", tuple(text_guidance), (image_guidance,))
    settings = [(item.seed, item.text_guidance) for item in plan.items]
    per_triplet = []
    for t in triplets:
        result = edit(model, encode_instruction(model, t.instruction), torch.from_numpy(t.input)[None], plan,
                      steps=steps, scheduler="euler_ancestral", max_batch=len(plan))
        per_triplet.append(result.images.numpy())
    outputs = [[per_triplet[i][j] for i in range(len(triplets))] for j in range(len(settings))]
    success = np.array([[rule_check(t, outputs[j][i])[0] for j in range(len(settings))]
                        for i, t in enumerate(triplets)])
    scores = []
    for i, t in enumerate(triplets):
        before, after = captions_of(t)
        edited = torch.from_numpy(np.stack([outputs[j][i] for j in range(len(settings))]))
        scores.append(score_edits(scorer, torch.from_numpy(t.input)[None], edited, t.instruction, before, after))
    direction = np.array([[s.clip_direction for s in row] for row in scores])
    image = np.array([[s.clip_image for s in row] for row in scores])
    return SweepResult(triplets, settings, success, direction, image, scores)


def pick_best_success(result: SweepResult, threshold: float = TOY_THRESHOLD) -> float:
    picked = [result.success[i, pick_best(row, threshold)[0].best] for i, row in enumerate(result.scores)]
    return float(np.mean(picked))


def best_fixed(result: SweepResult) -> tuple[tuple[int, float], float]:
    rates = result.success.mean(0)
    j = int(np.argmax(rates))
    return result.settings[j], float(rates[j])


def report(model, scorer: ClipScorer, per_kind: int = 8, steps: int = 20, threshold: float = TOY_THRESHOLD) -> str:
    triplets = synthetic.balanced_set(per_kind, seed=0)
    result = sweep(model, scorer, triplets, steps=steps)
    (seed, s_t), fixed = best_fixed(result)
    truth = [score_edits(scorer, torch.from_numpy(t.input)[None], torch.from_numpy(t.edited)[None], "",
                         *captions_of(t))[0].clip_image for t in triplets]
    lines = [
        f"{len(triplets)} held-out triplets x {len(result.settings)} settings (seeds {PLAN_SEEDS} x text guidance "
        f"{PLAN_TEXT_GUIDANCE}, image {PLAN_IMAGE_GUIDANCE}) = {result.success.size} edits, {steps} steps",
        f"rule-check success over all edits: {result.success.mean():.3f}",
        f"ROC AUC of clip_direction (success vs failure): {roc_auc(result.direction, result.success):.3f}",
        f"ROC AUC of clip_image: {roc_auc(result.image, result.success):.3f}",
        f"best fixed setting: seed {seed}, text guidance {s_t:g}: success {fixed:.3f}",
        f"pick-best (max clip_direction, clip_image >= {threshold:g}): "
        f"success {pick_best_success(result, threshold):.3f}",
        f"oracle (any setting succeeds): {result.success.any(1).mean():.3f}",
        f"clip_image of the true edits: median {np.median(truth):.3f}, 5th percentile {np.percentile(truth, 5):.3f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..models.assets import toy_model_path
    from ..models.cache import ModelCache
    from ..models.loading import ModelSource
    from ..scoring import CLIP_CACHE, ClipSource

    parser = argparse.ArgumentParser(prog="python -m ip2p_nodes.pipeline_core.training.score_eval",
                                     description="Measure CLIP scoring and pick-best on toy edits.")
    parser.add_argument("--model", default=str(toy_model_path()))
    parser.add_argument("--clip", default="toy")
    parser.add_argument("--per-kind", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=TOY_THRESHOLD)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cache = ModelCache()
    model = cache.get(cache.key_for(ModelSource.from_path(args.model), "fp32", "cpu"))
    scorer = CLIP_CACHE.get(ClipSource.from_text(args.clip))
    sys.stdout.write(report(model, scorer, args.per_kind, args.steps, args.threshold) + "\n")  # the command's output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
