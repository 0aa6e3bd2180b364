"""``ip2p-edit batch INPUT --out DIR``: the batch command's arguments, checked before any model loads.

The sampler options are the ``edit`` command's own argparse actions (same names, types, defaults and help), and
they are checked by the same :func:`..cli.check_sampler_args`, so the two commands cannot drift apart.
"""

from __future__ import annotations

import argparse
import copy

from ..errors import InputError
from ..models.assets import TOY_CLIP_THRESHOLD
from ..scoring.commands import CLIP_HELP
from .filtering import PAPER_MIN_DIRECTION, PAPER_MIN_IMAGE

# The edit command's options that mean the same for every row of a batch. Not borrowed: the input, instruction
# and output (a batch has rows and a folder), --count/--seed-mode (a row is one picture; give rows their own
# seeds) and --mask (a mask belongs to one picture: manifest rows name theirs).
SHARED_OPTIONS = (
    "model", "negative", "text_guidance", "image_guidance", "steps", "seed", "scheduler", "precision", "device",
    "feather", "crop_to_mask", "denoise", "working_resolution", "lora", "tokenizer_dir", "fast", "fast_interval",
    "vram",
)
ENGINES = ("local", "ray")


def add_batch_parser(sub, edit_parser: argparse.ArgumentParser, formatter_class) -> argparse.ArgumentParser:
    b = sub.add_parser(
        "batch", help="edit a folder of pictures or a JSONL manifest; resumable, on this machine or a Ray cluster",
        formatter_class=formatter_class,
        description=(
            "Edit every row of INPUT and write the pictures plus DIR/triplets.jsonl (the trainer's manifest format). "
            "INPUT is a folder of pictures (with --instruction or --instructions) or a .jsonl manifest of rows "
            '{"image", "instruction", ["mask"], ["seed"], ["text_guidance"], ["image_guidance"], '
            '["caption_before"], ["caption_after"]} with paths relative to it. Run the same command again after a '
            "crash or a change: rows done with the same settings are skipped, the rest are edited. With "
            "--filter-clip, edits below the CLIP thresholds go to DIR/filtered.jsonl instead of triplets.jsonl. "
            "Exit status 1 when some rows failed (listed in the summary)."
        ),
    )
    b.add_argument("input", help="a folder of pictures, or a .jsonl manifest (one JSON object a line)")
    b.add_argument("--out", required=True, help="output folder: edited pictures and triplets.jsonl")
    given = b.add_mutually_exclusive_group()
    given.add_argument("--instruction", default=None, help="the instruction for every picture of a folder INPUT")
    given.add_argument("--instructions", default=None, metavar="FILE",
                       help="a text file of instructions, one a line; every picture is edited with each")
    b.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: this process, one model load; ray: Ray Data actors, one model each "
                        '(pip install "ip2p-nodes[ray]")')
    b.add_argument("--address", default=None,
                   help="with --engine ray: the cluster to join (the address `ray start --head` prints, or auto); "
                        "default: a Ray instance on this machine")
    b.add_argument("--workers", type=int, default=None,
                   help="with --engine ray: actors, each holding one model (default: one per GPU, else one per "
                        "--threads CPUs)")
    b.add_argument("--threads", type=int, default=None,
                   help="CPU threads each worker edits with (default: local, torch's choice; ray, 1, and Ray reserves "
                        "as many CPUs per worker). On the CPU the thread count can change the last bit of some pixels "
                        "(sums are split differently), so give both engines the same --threads for identical pictures")
    b.add_argument("--filter-clip", default=None, metavar="CLIP",
                   help="keep only edits that pass the InstructPix2Pix paper's CLIP filter; the others are listed in "
                        "DIR/filtered.jsonl with their scores. " + CLIP_HELP)
    b.add_argument("--min-direction", type=float, default=None,
                   help=f"with --filter-clip: least clip_direction a kept edit has (did it change as asked; default "
                        f"{PAPER_MIN_DIRECTION:g}, the paper's)")
    b.add_argument("--min-image", type=float, default=None,
                   help=f"with --filter-clip: least clip_image a kept edit has (how much of the input it kept; "
                        f"default {PAPER_MIN_IMAGE:g}, the paper's with ViT-L/14; {TOY_CLIP_THRESHOLD:g} with "
                        "--filter-clip toy)")
    for action in edit_parser._actions:  # argparse's own `parents=` mechanism shares actions the same way
        if action.dest in SHARED_OPTIONS:
            if action.dest == "seed":
                action = copy.copy(action)
                action.help = "seed of the rows whose manifest line gives none (each row has its own generator)"
            b._add_action(action)
    return b


def check_engine_args(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if args.engine == "local":
        for name, value in (("--address", args.address), ("--workers", args.workers)):
            if value is not None:
                raise InputError(f"{name} is for --engine ray; the local engine runs in this one process")
        return
    from .engines.ray import require_ray

    require_ray()
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")

    if args.device is not None and ":" in args.device:
        raise InputError(f"--device {args.device}: with --engine ray each worker gets a GPU of its own from Ray; "
                         "give --device cuda (or cpu)")


def run_batch_command(args: argparse.Namespace) -> int:
    """The ``batch`` command: 0 when every row is done, 1 when some failed (the summary lists them)."""
    from ..cli import check_device, check_sampler_args
    from ..editing.seeds import check_seed
    from .filtering import check_filter_args
    from .rows import read_rows
    from .store import OutputStore

    check_engine_args(args)
    local = args.engine == "local"
    sampler = check_sampler_args(args, check_device_here=local)
    # The CLIP scores in this process: on the edit's device here, or (Ray) the best this machine has.
    clip = check_filter_args(args.filter_clip, args.min_direction, args.min_image,
                             sampler.device if local else check_device(None))
    check_seed(args.seed)
    rows = read_rows(args.input, args.instruction, args.instructions)
    out = OutputStore.check(args.out)
    if local:
        from .engines.local import run as run_local

        def local_engine(spec, tasks, on_outcome):
            run_local(spec, tasks, on_outcome, threads=args.threads)

        return _run(rows, sampler, args, out, local_engine, clip)
    from .engines import ray as ray_engine

    started = ray_engine.connect(args.address)
    try:
        if args.device is None and ray_engine.cluster_gpus():
            # No device asked for: the cluster's GPUs, as the machine that starts the job may have none.
            args.device = "cuda"
            sampler = check_sampler_args(args, check_device_here=False)

        def engine(spec, tasks, on_outcome):
            ray_engine.run(spec, tasks, on_outcome, workers=args.workers, threads=args.threads or 1)

        return _run(rows, sampler, args, out, engine, clip)
    finally:
        if started:
            ray_engine.require_ray().shutdown()


def _run(rows, sampler, args: argparse.Namespace, out, engine, clip=None) -> int:
    from .job import run_job
    from .work import JobSpec

    spec = JobSpec(sampler.source, sampler.precision, sampler.device, sampler.settings, sampler.guidance,
                  args.negative, sampler.loras)
    try:
        summary = run_job(rows, spec, out, engine, seed=args.seed, clip=clip)
    except KeyboardInterrupt:
        return 130  # the shell's status for Ctrl-C; the job logged how far it got
    return 1 if summary.failed else 0
