"""Command-line editing outside ComfyUI: ``ip2p-edit edit INPUT "make it winter" -o out.png --model M``.

Same cache, loader and sampler as the nodes, so an edit made here reproduces in ComfyUI with the same seed.
Every argument and file is checked before a model is loaded: a typo in ``-o`` must not cost a whole edit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import limits
from .editing.seeds import SEED_MODES
from .errors import InputError, IP2PError
from .models.assets import SAMPLE_INSTRUCTION, TOY_MODEL_ALIAS, TOY_TEXT_GUIDANCE
from .models.families import FAMILIES
from .models.releasing import MODES as MEMORY_MODES
from .models.schedulers import AUTO, SCHEDULER_CHOICES

if TYPE_CHECKING:
    from .editing.seeds import SeedPlan
    from .editing.settings import EditSettings
    from .models.loading import ModelSource
    from .models.lora import LoraRef

log = logging.getLogger("ip2p_nodes.cli")

DEVICE_KINDS = ("cpu", "cuda", "mps", "xpu")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after every option's help, except where there is nothing to show or the help
    already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS or (
            "default" in help_text
        ):
            return help_text
        return super()._get_help_string(action)


def _whole_number(text: str) -> int:
    """argparse type for counts and seeds: "20" and "20.0" are 20; "20.5" is refused, naming the value."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a whole number, e.g. 20") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give one, e.g. {round(value)}")
    return int(value)


def _ranged(bounds: limits.Range) -> str:
    low, high = (int(v) if float(v).is_integer() else v for v in (bounds.low, bounds.high))
    return f"{low}-{high}"


def family_defaults(which: int) -> str:
    """The families' default text (0) or image (1) guidance for --help, from the families themselves."""
    return ", ".join(f"{f.default_guidance[which]:g} {f.label}" for f in reversed(FAMILIES))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ip2p-edit", description="Edit images by instruction with InstructPix2Pix.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser(
        "edit", help="edit one image by an instruction", formatter_class=_HelpFormatter,
        description=(
            "Edit INPUT by INSTRUCTION and write the result, at the input's exact size, to --output. "
            f"Try it without downloading anything: --model {TOY_MODEL_ALIAS} (the shipped demo model; it only knows "
            "32x32 pictures of coloured shapes, e.g. the sample `ip2p-edit demo` uses)."
        ),
    )
    e.add_argument("input", help="input image file (PNG, JPEG, WebP, ...)")
    e.add_argument("instruction", help='what to change, e.g. "make it winter"')
    e.add_argument("-o", "--output", required=True,
                   help="output file; its extension picks the format (.png, .jpg, .webp, ...); with --count N, "
                        "_0, _1, ... are appended")
    e.add_argument("--model", required=True,
                   help=f"'{TOY_MODEL_ALIAS}' (the shipped demo model: no download), a diffusers folder, a "
                        "single-file checkpoint (.safetensors/.ckpt), or a Hugging Face id owner/name (downloaded "
                        "once; only a plain owner/name that is not a local path is looked up there)")
    e.add_argument("--negative", default="", help="negative prompt (default: empty, as in the paper)")
    e.add_argument("--text-guidance", type=float, default=None,
                   help="how hard to follow the instruction, useful 3-12 (default: the model family's: "
                        f"{family_defaults(0)}; {TOY_TEXT_GUIDANCE:g} with --model {TOY_MODEL_ALIAS}, its best)")
    e.add_argument("--image-guidance", type=float, default=None,
                   help="how close to stay to the input, useful 1-2.5 (default: the model family's: "
                        f"{family_defaults(1)})")
    e.add_argument("--steps", type=_whole_number, default=int(limits.STEPS.default),
                   help=f"denoising steps, {_ranged(limits.STEPS)}")
    e.add_argument("--seed", type=_whole_number, default=int(limits.SEED.default),
                   help=f"noise seed, {_ranged(limits.SEED)}: the same seed and settings give the same picture")
    e.add_argument("--count", type=_whole_number, default=1, help="number of variations (seeds seed, seed+1, ...)")
    e.add_argument("--seed-mode", choices=SEED_MODES, default="increment", help="how --count seeds are chosen")
    e.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default=AUTO,
                   help="sampler; auto = the model's own (its folder's, else its family's)")
    e.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help=f"auto: fp16 on GPUs, bf16 on CPUs with fast bf16, else fp32 (fp32 for --model "
                        f"{TOY_MODEL_ALIAS})")
    e.add_argument("--memory", choices=MEMORY_MODES, default="auto",
                   help="low = one model part in memory at a time (each read from the model folder when needed and "
                        "freed after; SD1.5 in bf16 on a CPU peaks at 2.9 instead of 3.3 GB, for 1-2 s "
                        "more per edit); keep = everything stays; auto = free the text encoder after encoding when "
                        "the machine has less memory available than the model's size. Diffusers folders only; "
                        "other models keep everything")
    e.add_argument("--vram", choices=limits.VRAM_MODES, default="auto",
                   help="device memory: low = one model part on the GPU at a time, the UNet one batch row at a time "
                        "and the VAE in tiles (small GPUs, for more time); normal = all on the GPU; auto = low when "
                        "the GPU has too little free memory for a normal edit (never on a CPU: see --memory)")
    e.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1, mps or xpu (default: the best available, "
                        f"here {_default_device()})")
    e.add_argument("--mask", default=None,
                   help="mask image: white = edit here, black = keep exactly (any size; resized to the input)")
    e.add_argument("--feather", type=_whole_number, default=int(limits.FEATHER.default),
                   help=f"mask edge blend width in pixels, {_ranged(limits.FEATHER)}")
    e.add_argument("--crop-to-mask", action="store_true",
                   help="edit only a box around the mask at full working resolution (small regions in big pictures)")
    e.add_argument("--denoise", type=float, default=limits.DENOISE.default,
                   help=f"edit strength {_ranged(limits.DENOISE)}: below 1 starts from the picture itself, so small "
                        "changes stay small")
    e.add_argument("--working-resolution", type=_whole_number, default=int(limits.WORKING_RESOLUTION.default),
                   help="edit at about this many pixels squared (0 = the model's own: 512 for SD1.5, 32 for the toy)")
    e.add_argument("--fast", action="store_true",
                   help="fast mode: the whole UNet on one step in --fast-interval and on the last, only its outer "
                        "layers on the others, reusing the deep features of the last full step (DeepCache); about "
                        "0.75x the time of a 20-step SD1.5 edit on a CPU, for a slightly different picture: for drafts "
                        "and sweeps")
    e.add_argument("--fast-interval", type=_whole_number, default=int(limits.FAST_INTERVAL.default),
                   help=f"with --fast: one full UNet step of every this many, {_ranged(limits.FAST_INTERVAL)}; "
                        "higher is faster and further from the quality edit, 1 is the quality edit")
    e.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="a LoRA file (kohya/A1111 or diffusers format) to apply, at STRENGTH (-4..4, default 1); "
                        "repeat for several, e.g. --lora style.safetensors:0.7 --lora detail.safetensors")
    e.add_argument("--controlnet", default=None,
                   help="a ControlNet of the model's base model (.safetensors in the original or diffusers layout, "
                        ".pth, or a diffusers folder) that steers the edit by --control-image")
    e.add_argument("--control-image", default=None,
                   help="the ControlNet's hint picture (e.g. a Canny edge map of the input), any size")
    e.add_argument("--control-strength", type=float, default=limits.CONTROL_STRENGTH.default,
                   help=f"how strongly the hint holds the picture, {_ranged(limits.CONTROL_STRENGTH)}")
    e.add_argument("--tokenizer-dir", default=None,
                   help="CLIP tokenizer folder (vocab.json + merges.txt) for single-file SD1.5 checkpoints")

    from .scoring.commands import add_pick_best_options, add_score_parser

    add_pick_best_options(e)
    add_score_parser(sub, _HelpFormatter)

    d = sub.add_parser("demo", help="edit the shipped sample with the shipped toy model (no download)",
                       formatter_class=_HelpFormatter)
    d.add_argument("-o", "--output", default="ip2p-demo.png", help="where to write 'input | edit', enlarged")
    d.add_argument("--instruction", default=SAMPLE_INSTRUCTION,
                   help='e.g. "remove the triangle", "add a green star"')
    d.add_argument("--image", default=None,
                   help="a 32x32 shapes picture (default: the shipped sample); other pictures are edited at 32x32, "
                        "with a warning")
    d.add_argument("--seed", type=_whole_number, default=0, help="noise seed")
    from .batch.cli import add_batch_parser

    b = add_batch_parser(sub, e, _HelpFormatter)
    for q in (e, d, b):
        q.add_argument("-v", "--verbose", action="store_true", help="log every step of loading and editing")
    return p


def _default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device_name(name: str) -> str:
    """``name`` if it names a device an edit can run on, whether or not this machine has one."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name}: not a device name; use one of {', '.join(DEVICE_KINDS)} (e.g. cuda:1), "
                         "or leave --device out for the best available") from None
    if device.type not in DEVICE_KINDS:
        raise InputError(f"--device {name}: cannot run an edit; use one of {', '.join(DEVICE_KINDS)}")
    return str(device)


def check_device(name: str | None) -> str:
    """The device to run on: ``name`` if this machine has it, the best available for None."""
    if name is None:
        return _default_device()
    device = torch.device(check_device_name(name))
    if device.type == "cpu":
        return str(device)
    module = getattr(torch, device.type, None) if device.type != "mps" else getattr(torch.backends, "mps", None)
    available = bool(module is not None and module.is_available())
    if not available:
        why = {
            "cuda": ("this torch was built without CUDA" if torch.version.cuda is None
                     else "no NVIDIA GPU or driver was found"),
            "mps": "Apple's Metal (MPS) is not available here",
            "xpu": "no Intel GPU (XPU) was found",
        }[device.type]
        raise InputError(
            f"--device {name}: {why}; use --device cpu, or leave --device out to use the best available "
            f"({_default_device()})"
        )
    count = module.device_count() if hasattr(module, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise InputError(
            f"--device {name}: there is no {device.type} device {device.index}; this machine has {count} "
            f"({', '.join(f'{device.type}:{i}' for i in range(count))})"
        )
    return str(device)


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


@dataclass
class EditJob:
    """An ``edit`` command's arguments, every one checked; loading the model is all that is left to fail."""

    source: ModelSource
    device: str
    precision: str  # resolved: fp32 / fp16 / bf16
    image: torch.Tensor  # IMAGE [1, H, W, 3]
    mask: torch.Tensor | None  # MASK [1, H', W'], 1 = edit
    plan: SeedPlan
    settings: EditSettings  # checked
    outputs: list[Path]  # one per plan item, each checked writable
    # (text, image) guidance as given; None: the model family's default, known once the model is loaded
    guidance: tuple[float | None, float | None] = (None, None)
    loras: tuple[LoraRef, ...] = ()  # files checked to exist; their layers are checked against the model on load
    controlnet: Path | None = None  # checked to exist; loaded (and checked against the model) after the model
    control_image: torch.Tensor | None = None  # IMAGE [1, H, W, 3]
    control_strength: float = limits.CONTROL_STRENGTH.default


def output_paths(output: str, count: int) -> list[Path]:
    """The files a run writes: ``output`` itself, or ``stem_0.ext``, ``stem_1.ext``, ... for several pictures."""
    from .editing.images import check_output_path

    out = check_output_path(output)
    if count == 1:
        return [out]
    return [check_output_path(out.with_name(f"{out.stem}_{i}{out.suffix}")) for i in range(count)]


@dataclass
class SamplerArgs:
    """The model and sampler options ``edit`` and ``batch`` share, checked; only loading the model is left."""

    source: ModelSource
    device: str
    precision: str  # resolved: fp32 / fp16 / bf16
    settings: EditSettings  # checked
    # (text, image) guidance as given; None: the model family's default, known once the model is loaded
    guidance: tuple[float | None, float | None] = (None, None)
    loras: tuple[LoraRef, ...] = ()  # files checked to exist; their layers are checked against the model on load


def check_sampler_args(args: argparse.Namespace, check_device_here: bool = True) -> SamplerArgs:
    """The model and sampler options, checked in order of cost; raises :class:`IP2PError`.

    ``check_device_here=False`` checks only the device's name: a Ray job runs on the cluster's machines, which
    may have GPUs the machine that starts it lacks.
    """
    from .editing.settings import EditSettings
    from .models.loading import ModelSource
    from .models.lora import LoraRef, parse_lora_arg
    from .models.precision import resolve_precision

    text_guidance, image_guidance = args.text_guidance, args.image_guidance
    if text_guidance is None and args.model.strip() == TOY_MODEL_ALIAS:
        text_guidance = TOY_TEXT_GUIDANCE  # the paper's 7.5 over-saturates the toy model; 3 is its best
    # Guidance not given is the family's default, known only after loading; the limits' defaults stand in
    # here so every given value is still checked before the model is loaded.
    settings = EditSettings(
        steps=args.steps,
        text_guidance=limits.TEXT_GUIDANCE.default if text_guidance is None else text_guidance,
        image_guidance=limits.IMAGE_GUIDANCE.default if image_guidance is None else image_guidance,
        scheduler=args.scheduler, feather=args.feather, denoise=args.denoise,
        working_resolution=args.working_resolution or None, crop_to_mask=args.crop_to_mask,
        speed="fast" if args.fast else "quality", fast_interval=args.fast_interval, vram=args.vram,
    ).checked()
    device = check_device(args.device) if check_device_here or args.device is None else check_device_name(args.device)
    precision = args.precision
    if precision == "auto" and args.model.strip() == TOY_MODEL_ALIAS:
        precision = "fp32"  # what the demo runs: the same seed gives the demo's picture (the toy is tiny anyway)
    precision = resolve_precision(precision, device).name
    if args.tokenizer_dir is not None and not Path(args.tokenizer_dir).expanduser().is_dir():
        raise InputError(f"--tokenizer-dir {args.tokenizer_dir}: no such folder; give the folder holding "
                         "vocab.json and merges.txt")
    loras = []
    for text in args.lora:
        path, strength = parse_lora_arg(text)
        try:
            loras.append(LoraRef.of(path, strength))
        except InputError as exc:
            raise InputError(f"--lora {text}: {exc}") from None
    source = ModelSource.from_path(args.model, tokenizer_dir=args.tokenizer_dir)
    guidance = (None if text_guidance is None else settings.text_guidance,
                None if image_guidance is None else settings.image_guidance)
    return SamplerArgs(source, device, precision, settings, guidance, tuple(loras))


def check_edit_args(args: argparse.Namespace) -> EditJob:
    """Everything the ``edit`` command was given, checked in order of cost; raises :class:`IP2PError`."""
    from .editing.images import load_image
    from .editing.seeds import make_plan

    if not args.instruction.strip():
        raise InputError("the instruction is empty; write the edit you want, e.g. \"make it winter\"")
    plan = make_plan(args.seed, args.count, args.seed_mode)
    outputs = output_paths(args.output, len(plan))
    s = check_sampler_args(args)
    image = load_image(args.input)
    mask = load_image(args.mask)[..., 0] if args.mask else None  # grey value of the mask picture, 1 = edit
    controlnet, control_image, control_strength = check_control_args(args)
    return EditJob(s.source, s.device, s.precision, image, mask, plan, s.settings, outputs, s.guidance, s.loras,
                   controlnet, control_image, control_strength)


def check_control_args(args: argparse.Namespace) -> tuple[Path | None, torch.Tensor | None, float]:
    """--controlnet, --control-image and --control-strength, checked before the model loads."""
    from .editing.checks import check_float
    from .editing.images import load_image

    strength = check_float(args.control_strength, "--control-strength", limits.CONTROL_STRENGTH)
    if args.controlnet is None and args.control_image is None:
        return None, None, strength
    if args.controlnet is None or args.control_image is None:
        given, missing = ("--controlnet", "--control-image") if args.control_image is None else (
            "--control-image", "--controlnet")
        raise InputError(f"{given} needs {missing} too: the ControlNet steers by its hint picture")
    path = Path(args.controlnet).expanduser()
    if not path.exists():
        raise InputError(f"--controlnet {args.controlnet}: no such file or folder ({path.resolve()}); check the path")
    return path, load_image(args.control_image), strength


def run_edit(args: argparse.Namespace) -> list[Path]:
    from .editing.conditioning import encode_instruction
    from .editing.edit import edit
    from .editing.images import save_image
    from .models.cache import MODEL_CACHE
    from .scoring.commands import check_pick_best, write_best

    job = check_pick_best(check_edit_args(args), args)
    MODEL_CACHE.memory = args.memory
    model = MODEL_CACHE.get(MODEL_CACHE.key_for(job.source, job.precision, job.device, job.loras))
    cond = encode_instruction(model, args.instruction, args.negative)
    if job.controlnet is not None:
        from .editing.control import add_control, make_control
        from .models.controlnet import load_controlnet

        controlnet = load_controlnet(job.controlnet, model)
        cond = add_control(cond, make_control(controlnet, job.control_image, job.control_strength))
    s = job.settings
    result = edit(model, cond, job.image, job.plan, steps=s.steps, text_guidance=job.guidance[0],
                  image_guidance=job.guidance[1], scheduler=s.scheduler, progress=_progress_bar("editing"),
                  mask=job.mask, feather=s.feather, crop_to_mask=s.crop_to_mask, denoise=s.denoise,
                  working_resolution=s.working_resolution, speed=s.speed, fast_interval=s.fast_interval,
                  vram=s.vram)
    if args.pick_best:
        return [write_best(job, args, result)]
    paths = []
    for img, path, (_, item) in zip(result.images, job.outputs, result.items):
        paths.append(save_image(img, path))
        log.info("wrote %s (seed %d)", path, item.seed)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        if args.command == "edit":
            run_edit(args)
        elif args.command == "batch":
            from .batch.cli import run_batch_command

            return run_batch_command(args)
        elif args.command == "score":
            from .scoring.commands import run_score

            run_score(args)
        else:
            from .demo import run_demo

            run_demo(args.output, instruction=args.instruction, image=args.image, seed=args.seed,
                     progress=_progress_bar("demo"))
    except IP2PError as exc:
        log.error("error: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
