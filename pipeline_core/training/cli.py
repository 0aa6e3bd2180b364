"""The trainer's command line: ``python -m ip2p_nodes.pipeline_core.training train|toy ...``.

Apart from :mod:`.trainer` so the trainer does not import the toy recipe that uses it (no import circle).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..errors import IP2PError
from . import toy
from .trainer import TrainConfig, fine_tune

log = logging.getLogger(__name__)


def _config_from_args(args, base: TrainConfig | None = None) -> TrainConfig:
    """The options given on the command line over ``base`` (the toy recipe, or the defaults)."""
    names = {f.name for f in fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return TrainConfig(**{**asdict(base or TrainConfig()), **given})


def _add_train_options(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", dest="learning_rate", type=float, default=defaults.learning_rate)
    p.add_argument("--text-encoder-lr", dest="text_encoder_lr", type=float, default=defaults.text_encoder_lr,
                   help="also train the text encoder at this learning rate (default: frozen)")
    p.add_argument("--lora-rank", dest="lora_rank", type=int, default=defaults.lora_rank,
                   help="LoRA rank on the UNet's attention layers; 0 = full fine-tune")
    p.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=defaults.lora_alpha)
    p.add_argument("--ema-decay", dest="ema_decay", type=float, default=defaults.ema_decay)
    p.add_argument("--snr-gamma", dest="snr_gamma", type=float, default=defaults.snr_gamma)
    p.add_argument("--warmup-steps", dest="warmup_steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--cosine-decay", dest="cosine_decay", action=argparse.BooleanOptionalAction,
                   default=defaults.cosine_decay, help="decay the learning rate to 10%% along a cosine")
    p.add_argument("--precision", dest="mixed_precision", choices=("bf16", "no"), default=defaults.mixed_precision)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=defaults.checkpoint_every)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ip2p_nodes.pipeline_core.training",
                                     description="Train or fine-tune InstructPix2Pix models.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="fine-tune a model on triplets (resumes from OUT/checkpoints)")
    tr.add_argument("--model", required=True, help="diffusers folder, single-file checkpoint or hub id")
    tr.add_argument("--data", required=True, help="folder, .jsonl manifest, or synthetic:N")
    tr.add_argument("--out", required=True, type=Path)
    tr.add_argument("--resolution", type=int, default=None, help="crop pictures to this square size")
    tr.add_argument("--restart", action="store_true", help="ignore an existing checkpoint in OUT")
    _add_train_options(tr, TrainConfig())
    ty = sub.add_parser("toy", help="train the embedded toy model from nothing (the shipped one's recipe)")
    ty.add_argument("--out", required=True, type=Path)
    ty.add_argument("--install", action="store_true", help=f"copy the result to {toy.toy_model_path()}")
    ty.add_argument("--vae-steps", type=int, default=toy.RECIPE["vae_steps"])
    ty.add_argument("--triplets", type=int, default=toy.RECIPE["triplets"])
    ty.add_argument("--refine-steps", type=int, default=toy.RECIPE["refine_steps"],
                    help="stage 3: continued-training steps after the sharper decoder (0 skips stage 3)")
    ty.add_argument("--stage2", type=Path, default=None,
                    help="start stage 3 from this stage-2 model file (OUT/stage2/toy-ip2p-stage2.safetensors of an "
                         "earlier run) instead of training stages 1 and 2")
    ty.add_argument("--widen-steps", type=int, default=toy.RECIPE["widen_steps"],
                    help="stage 4: training steps of the UNet widened to twice its channels (0 skips stage 4)")
    ty.add_argument("--focus-steps", type=int, default=toy.RECIPE["focus_steps"],
                    help="stage 5: training steps of the wide UNet with removal drawn most (0 skips stage 5)")
    ty.add_argument("--stage3", type=Path, default=None,
                    help="start stage 4 from this stage-3 model file (OUT/stage3/toy-ip2p-stage3.safetensors of an "
                         "earlier run, or the previously shipped toy model) instead of training stages 1 to 3")
    _add_train_options(ty, toy.recipe_config())
    # The toy UNet is too small to gain from more threads, and on a shared machine extra threads cost a lot.
    ty.set_defaults(threads=1)
    tc = sub.add_parser("toy-clip", help="train the embedded toy CLIP (shapes captions) from nothing")
    tc.add_argument("--out", required=True, type=Path)
    tc.add_argument("--install", action="store_true", help="copy the result into the pack's assets")
    tc.add_argument("--steps", type=int, default=None, help="training steps (default: the shipped recipe's)")
    tc.add_argument("--triplets", type=int, default=6000, help="rendered training triplets")
    tc.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


def parse_config(args: argparse.Namespace) -> TrainConfig:
    return _config_from_args(args, toy.recipe_config() if args.command == "toy" else None)


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "toy-clip":
            from .toy_clip import ClipTrainConfig, build_toy_clip

            config = ClipTrainConfig(**({"steps": args.steps} if args.steps else {}))
            log.info("wrote %s", build_toy_clip(args.out, config, args.triplets, install=args.install))
            return 0
        if args.command == "train":
            folder, single = fine_tune(args.model, args.data, args.out, parse_config(args), args.resolution,
                                       args.restart)
        else:
            folder, single = toy.build_toy(args.out, parse_config(args), vae_steps=args.vae_steps,
                                           n_triplets=args.triplets, install=args.install,
                                           refine_steps=args.refine_steps, stage2=args.stage2,
                                           widen_steps=args.widen_steps, stage3=args.stage3,
                                           focus_steps=args.focus_steps)
    except IP2PError as exc:
        log.error("%s", exc)
        return 2
    log.info("wrote %s and %s", folder, single)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
