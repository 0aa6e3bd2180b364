"""Command-line editing outside ComfyUI: ``ip2p-edit edit INPUT "make it winter" -o out.png --model M``.

Same cache, loader and sampler as the nodes, so an edit made here reproduces in ComfyUI with the same seed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from .editing.seeds import SEED_MODES
from .errors import IP2PError
from .models.schedulers import AUTO, SCHEDULER_CHOICES

log = logging.getLogger("ip2p_nodes.cli")


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ip2p-edit", description="Edit images by instruction with InstructPix2Pix.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("edit", help="edit one image by an instruction")
    e.add_argument("input", help="input image file (PNG, JPEG, WebP, ...)")
    e.add_argument("instruction", help='what to change, e.g. "make it winter"')
    e.add_argument("-o", "--output", required=True, help="output file; with --count N, _0, _1, ... are appended")
    e.add_argument("--model", required=True,
                   help="diffusers folder, single-file checkpoint (.safetensors/.ckpt), "
                        "or a Hub id (downloads only then)")
    e.add_argument("--negative", default="", help="negative prompt (default empty, as in the paper)")
    e.add_argument("--text-guidance", type=float, default=7.5, help="how hard to follow the instruction (5-10)")
    e.add_argument("--image-guidance", type=float, default=1.5, help="how close to stay to the input (1-2)")
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--count", type=int, default=1, help="number of variations (seeds seed, seed+1, ...)")
    e.add_argument("--seed-mode", choices=SEED_MODES, default="increment")
    e.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=AUTO,
                   help="sampler; auto = the model's own (its folder's, else its family's)")
    e.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    e.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    e.add_argument("--mask", default=None,
                   help="mask image: white = edit here, black = keep exactly (any size; resized to the input)")
    e.add_argument("--feather", type=int, default=0, help="mask edge blend width in pixels")
    e.add_argument("--crop-to-mask", action="store_true",
                   help="edit only a box around the mask at full working resolution (small regions in big pictures)")
    e.add_argument("--denoise", type=float, default=1.0,
                   help="edit strength 0.01-1: below 1 starts from the picture itself, so small changes stay small")
    e.add_argument("--working-resolution", type=int, default=0,
                   help="edit at about this many pixels squared (0 = the model's own, 512 for SD1.5)")
    e.add_argument("--tokenizer-dir", default=None,
                   help="CLIP tokenizer folder (vocab.json + merges.txt) for single-file SD1.5 checkpoints")

    d = sub.add_parser("demo", help="edit the shipped sample with the shipped toy model (no download)")
    d.add_argument("-o", "--output", default="ip2p-demo.png", help="where to write 'input | edit', enlarged")
    d.add_argument("--instruction", default=None, help='e.g. "remove the triangle", "add a green star"')
    d.add_argument("--image", default=None, help="a 32x32 shapes picture (default: the shipped sample)")
    d.add_argument("--seed", type=int, default=0)
    for q in (e, d):
        q.add_argument("-v", "--verbose", action="store_true")
    return p


def _progress_bar(total_label: str):
    from tqdm.auto import tqdm

    bar = None

    def progress(done: int, total: int, _latents) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=total_label, unit="step")
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return progress


def run_edit(args: argparse.Namespace) -> list[Path]:
    from .editing.conditioning import encode_instruction
    from .editing.edit import edit
    from .editing.images import load_image, save_image
    from .editing.seeds import make_plan
    from .models.cache import MODEL_CACHE
    from .models.loading import ModelSource

    device = args.device or _default_device()
    source = ModelSource.from_path(args.model, tokenizer_dir=args.tokenizer_dir)
    model = MODEL_CACHE.get(MODEL_CACHE.key_for(source, args.precision, device))
    image = load_image(args.input)
    cond = encode_instruction(model, args.instruction, args.negative)
    plan = make_plan(args.seed, args.count, args.seed_mode)
    mask = load_image(args.mask)[..., 0] if args.mask else None  # grey value of the mask picture, 1 = edit
    result = edit(model, cond, image, plan, steps=args.steps, text_guidance=args.text_guidance,
                  image_guidance=args.image_guidance, scheduler=args.scheduler, progress=_progress_bar("editing"),
                  mask=mask, feather=args.feather, crop_to_mask=args.crop_to_mask, denoise=args.denoise,
                  working_resolution=args.working_resolution or None)
    out = Path(args.output)
    paths = []
    for i, (img, (_, item)) in enumerate(zip(result.images, result.items)):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        paths.append(save_image(img, path))
        log.info("wrote %s (seed %d)", path, item.seed)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        if args.command == "edit":
            run_edit(args)
        else:
            from .demo import run_demo
            from .models.assets import SAMPLE_INSTRUCTION

            run_demo(Path(args.output), instruction=args.instruction or SAMPLE_INSTRUCTION, image=args.image,
                     seed=args.seed)
    except IP2PError as exc:
        log.error("error: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
