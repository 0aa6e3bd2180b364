"""The scoring parts of ``ip2p-edit``: the ``score`` command, and ``edit --pick-best --clip C``.

Kept apart from :mod:`..cli` so the edit command gains only a hook: the options are added here, checked here
before any model is loaded, and the best of the plan is written here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from ..errors import InputError
from ..models.assets import TOY_CLIP_THRESHOLD
from .pick import DEFAULT_THRESHOLD

log = logging.getLogger("ip2p_nodes.cli")

CLIP_HELP = ("CLIP for scoring: 'toy' (the shipped toy CLIP: shapes pictures only, no download), a transformers CLIP "
             "folder (config.json, model.safetensors, tokenizer), or a Hugging Face id such as "
             "openai/clip-vit-large-patch14 (downloaded once; the only download)")


def add_score_parser(sub, formatter_class) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "score", help="score an edit with CLIP (the paper's image and direction similarity)",
        formatter_class=formatter_class,
        description="Print one JSON object: clip_image (how much of INPUT the edit kept), clip_direction (did the "
                    "picture change the way the text asks) and clip_text (does it match the output caption or "
                    "instruction). With both captions clip_direction is the paper's metric; with the instruction "
                    "alone it is measured from the empty text to the instruction.",
    )
    s.add_argument("--clip", required=True, help=CLIP_HELP)
    s.add_argument("--input", required=True, help="the picture before the edit")
    s.add_argument("--edited", required=True, help="the edited picture")
    s.add_argument("--instruction", default="", help="the instruction the edit followed")
    s.add_argument("--caption-before", default=None, help="a caption of the input (with --caption-after: the paper's)")
    s.add_argument("--caption-after", default=None, help="a caption of the wanted result")
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")
    s.add_argument("-v", "--verbose", action="store_true", help="log loading")
    return s


def add_pick_best_options(e: argparse.ArgumentParser) -> None:
    e.add_argument("--pick-best", action="store_true",
                   help="edit every item of the plan (--count seeds x the guidance values) and write only the best "
                        "to --output, by CLIP (needs --clip): highest clip_direction among edits that keep "
                        "clip_image >= --threshold")
    e.add_argument("--clip", default=None, help=CLIP_HELP + "; with --pick-best")
    e.add_argument("--threshold", type=float, default=None,
                   help=f"least clip_image a picked edit keeps (default {DEFAULT_THRESHOLD:g}; "
                        f"{TOY_CLIP_THRESHOLD:g} with --clip toy)")
    e.add_argument("--sweep-text-guidance", default=None,
                   help="with --pick-best: comma-separated text guidance values to try, e.g. '5, 7.5, 10'")
    e.add_argument("--sweep-image-guidance", default=None,
                   help="with --pick-best: comma-separated image guidance values to try, e.g. '1.2, 1.5, 2'")


def threshold_for(args: argparse.Namespace) -> float:
    from ..models.assets import TOY_CLIP_ALIAS

    if args.threshold is not None:
        from .metrics import check_cosine

        return check_cosine(args.threshold, "--threshold", "0.7-0.9")
    # The toy CLIP's space is coarse: correct edits of shapes pictures keep far less of them than 0.8.
    return TOY_CLIP_THRESHOLD if (args.clip or "").strip() == TOY_CLIP_ALIAS else DEFAULT_THRESHOLD


def check_pick_best(job, args: argparse.Namespace):
    """The edit job for ``--pick-best``: the plan crossed with the guidance values, one output; checked early."""
    from ..editing.seeds import make_plan, parse_values
    from ..limits import IMAGE_GUIDANCE
    from .clip import ClipSource

    if not args.pick_best:
        if args.clip or args.sweep_text_guidance or args.sweep_image_guidance or args.threshold is not None:
            raise InputError("--clip, --threshold and the --sweep-*-guidance lists only work with --pick-best")
        return job
    if not args.clip:
        raise InputError("--pick-best needs a CLIP to score with: --clip toy (shapes only), a CLIP folder or an id")
    ClipSource.from_text(args.clip)  # a mistyped folder fails now, before the edit model is loaded
    threshold_for(args)
    plan = make_plan(args.seed, args.count, args.seed_mode, parse_values(args.sweep_text_guidance or "",
                                                                            "--sweep-text-guidance"),
                     parse_values(args.sweep_image_guidance or "", "--sweep-image-guidance", IMAGE_GUIDANCE.low,
                                  IMAGE_GUIDANCE.high))
    if len(plan) < 2:
        raise InputError("--pick-best has one picture to pick from; give --count 2 or more, or guidance value lists")
    from ..editing.images import check_output_path

    return dataclasses.replace(job, plan=plan, outputs=[check_output_path(args.output)])


def write_best(job, args: argparse.Namespace, result) -> Path:
    """Score every edit of ``result`` against the input, write the best to the output, log the ranking."""
    from ..editing.images import save_image
    from . import CLIP_CACHE, ClipSource, pick_best, score_edits
    from .pick import ranking_report

    threshold = threshold_for(args)
    scorer = CLIP_CACHE.get(ClipSource.from_text(args.clip), job.device)
    scores = score_edits(scorer, job.image, result.images, args.instruction)
    labels = []
    for _, item in result.items:
        s_t = item.text_guidance if item.text_guidance is not None else job.guidance[0]
        s_i = item.image_guidance if item.image_guidance is not None else job.guidance[1]
        labels.append(f"seed {item.seed} · text {'default' if s_t is None else f'{s_t:g}'} · image "
                      f"{'default' if s_i is None else f'{s_i:g}'}")
    [ranking] = pick_best(scores, threshold)
    log.info("ranking by CLIP %s:\n%s", scorer.name, ranking_report([ranking], scores, labels, threshold))
    path = save_image(result.images[ranking.best], job.outputs[0])
    log.info("wrote %s: the best of %d edits (%s)", path, len(scores), labels[ranking.best])
    return path


def run_score(args: argparse.Namespace) -> dict:
    from ..cli import check_device
    from ..editing.images import load_image
    from . import CLIP_CACHE, ClipSource, score_edits

    source = ClipSource.from_text(args.clip)
    device = check_device(args.device)
    inputs, edited = load_image(args.input), load_image(args.edited)
    [score] = score_edits(CLIP_CACHE.get(source, device), inputs, edited, args.instruction, args.caption_before,
                          args.caption_after)
    out = {"clip_image": score.clip_image, "clip_direction": score.clip_direction, "clip_text": score.clip_text,
           "direction_from": score.direction_from, "clip": source.name}
    sys.stdout.write(json.dumps(out) + "\n")  # the command's output, for scripts: stdout, not the log
    return out
