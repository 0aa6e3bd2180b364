"""Soak: many mixed prompts through one real ComfyUI server, watching its memory.

    COMFYUI_DIR=/path/to/ComfyUI python benchmarks/soak.py --prompts 50 [--workdir DIR] [--models DIR] [--json F]

Runs ``--prompts`` API prompts through a real server (``main.py --cpu``) with the pack: three models (the
embedded toy model, the tiny test model, a random-weight full-size SD1.5-InstructPix2Pix-shaped checkpoint;
the cache holds two, so they also evict one another), three picture sizes, masks (feathered, crop-to-mask),
edit strength, and sweeps through IP2P Seed Batch. Half-way one prompt is cancelled, later ``POST /free``
("Unload Models and Execution Cache") drops every model. The server's RSS (``VmRSS`` from ``/proc``) is read
after every prompt.

Checks (shared/REFERENCE.md: issue 13): RSS after the last prompt within 5% of RSS after the baseline prompt
(10 for 50 prompts; in general one or more whole cycles of the prompt pattern before the last, so that the same
models are cached at both points), and the last prompt's pictures equal those of a fresh server given only that
prompt. Prints the RSS series, the ratio and the wall time; exits 1 when a check fails.

Pictures are tiny (48-80 px, 1-2 steps): the point is memory and state over many runs, not speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the live-server harness and the model builders

from ip2p_nodes.pipeline_core.models.assets import SAMPLE_INSTRUCTION, TOY_MODEL_CHOICE  # noqa: E402
from ip2p_nodes.pipeline_core.models.loading import save_single_file  # noqa: E402
from support import comfy_harness, model_files, tiny_models  # noqa: E402

log = logging.getLogger("soak")

SD15 = "sd15-ip2p-random.safetensors"
TINY = "tiny-ip2p.safetensors"
SIZES = {"square": (64, 64), "wide": (80, 48), "tall": (56, 72)}  # (width, height)
TOLERANCE = 0.05
MIB = 2**20


@dataclass(frozen=True)
class Job:
    """One prompt of the pattern: which model, picture and options."""

    model: str
    size: str
    steps: int = 1
    mask: bool = False
    count: int = 1
    text_values: str = ""
    image_values: str = ""
    denoise: float = 1.0
    feather: int = 0
    crop_to_mask: bool = False
    working_resolution: int = 0  # 0: the model's own

    @property
    def instruction(self) -> str:
        return SAMPLE_INSTRUCTION if self.model == TOY_MODEL_CHOICE else "make it look like a watercolor painting"


# One cycle. Toy and SD1.5 alternate (both stay cached); the tiny model comes once, right after SD1.5, so it evicts
# the toy model and is itself evicted by the toy model two prompts later: the cheap models churn, SD1.5 stays.
PATTERN = (
    Job(TOY_MODEL_CHOICE, "square", steps=2),
    Job(SD15, "square"),
    Job(TOY_MODEL_CHOICE, "wide", steps=2, mask=True, feather=4),
    Job(SD15, "tall", count=2, text_values="5, 7.5"),
    Job(TINY, "square", steps=2, image_values="1.2, 1.8"),
    Job(SD15, "wide", steps=2, mask=True, denoise=0.6),
    Job(TOY_MODEL_CHOICE, "tall", steps=2, count=3),
    Job(SD15, "square", mask=True, crop_to_mask=True, working_resolution=128),  # the box at 128², not 512²
)
PERIOD = len(PATTERN)
SAMPLER = "5"
SAVE = "6"


def job_for(number: int) -> Job:
    """The job of prompt ``number`` (1-based)."""
    return PATTERN[(number - 1) % PERIOD]


def prompt_for(number: int, job: Job | None = None, prefix: str | None = None) -> dict:
    """Prompt ``number`` in ComfyUI's API format; its seed is its number, so no two prompts are the same run."""
    job = job or job_for(number)
    sampler = {
        "model": ["2", 0], "conditioning": ["3", 0], "image": ["1", 0], "seed": 1000 + number, "steps": job.steps,
        "text_guidance": 3.0 if job.model == TOY_MODEL_CHOICE else 7.5, "image_guidance": 1.5,
        "scheduler": "auto", "plan": ["4", 0], "denoise": job.denoise, "feather": job.feather,
        "crop_to_mask": job.crop_to_mask, "working_resolution": job.working_resolution,
    }
    plan = {
        "seed": 1000 + number, "count": job.count, "mode": "increment", "text_guidance_values": job.text_values,
        "image_guidance_values": job.image_values,
    }
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": f"soak-{job.size}.png"}},
        # fp32, not "auto": on CPUs with AMX, "auto" is bf16, whose oneDNN kernels give a slightly different
        # picture from one call to the next (measured: 0.15-0.2 apart on a 1-step edit of this random model), so
        # "the last picture equals a fresh server's" could not tell a state leak from that noise. fp32 is exact.
        "2": {"class_type": "IP2PModelLoader", "inputs": {"model": job.model, "hub_id": "", "precision": "fp32"}},
        "3": {"class_type": "IP2PInstruction",
              "inputs": {"model": ["2", 0], "instruction": job.instruction, "negative": ""}},
        "4": {"class_type": "IP2PSeedPlan", "inputs": plan},
        SAMPLER: {"class_type": "IP2PSampler", "inputs": sampler},
        SAVE: {"class_type": "SaveImage",
               "inputs": {"images": [SAMPLER, 0], "filename_prefix": prefix or f"soak-{number:03d}"}},
    }
    if job.mask:
        prompt["7"] = {"class_type": "LoadImageMask",
                       "inputs": {"image": f"soak-{job.size}-mask.png", "channel": "red"}}
        sampler["mask"] = ["7", 0]
    return prompt


def baseline_for(prompts: int, warmup: int = 4) -> int:
    """The prompt to compare the last with: whole cycles before it, at least ``warmup`` (50 -> 10, 12 -> 4)."""
    if prompts < warmup + PERIOD:
        raise ValueError(f"a soak needs at least {warmup + PERIOD} prompts (one cycle of {PERIOD} after a warm-up)")
    return prompts - PERIOD * ((prompts - warmup) // PERIOD)


# ----------------------------------------------------------------------------------------------------------- set-up


def write_models(models: Path) -> dict[str, list[Path]]:
    """The two model files (kept between runs in ``models``); returns ComfyUI's extra model paths for them."""
    folder = models / "instructpix2pix"
    if not (folder / SD15).is_file():
        start = time.perf_counter()
        model_files.write_sd15_checkpoint(folder / f".{SD15}.part", in_channels=8).rename(folder / SD15)
        log.info("wrote %s (%.0f MiB) in %.0f s", SD15, (folder / SD15).stat().st_size / MIB,
                 time.perf_counter() - start)
    if not (folder / TINY).is_file():
        tok = models / "tiny-tokenizer"
        unet, vae, te, _ = tiny_models.make_components(seed=0, tokenizer_dir=tok)
        save_single_file((unet, vae, te), folder / TINY, tokenizer_dir=tok)
    return {"instructpix2pix": [folder]}


def write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"soak-{name}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 2 + 4, w // 3 : w - 4] = 255
        Image.fromarray(mask).save(folder / f"soak-{name}-mask.png")


def pictures(server: comfy_harness.ComfyServer, entry: dict) -> list[bytes]:
    out = []
    for path in server.output_files(entry, SAVE):
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB")).tobytes())
    return out


# ----------------------------------------------------------------------------------------------------------- soak


@dataclass
class SoakResult:
    prompts: int
    baseline: int
    rss: list[int] = field(default_factory=list)  # bytes, after prompt 1, 2, ...
    seconds: list[float] = field(default_factory=list)  # wall time of each prompt
    wall_s: float = 0.0  # the whole series, Cancel and free included
    cancel_after: int = 0
    cancelled_at_step: int = 0
    free_after: int = 0
    rss_before_free: int = 0
    rss_after_free: int = 0
    peak_rss: int = 0  # VmHWM of the server at the end
    outputs: int = 0  # pictures of the last prompt
    last_equals_fresh: bool = False
    fresh_s: float = 0.0

    @property
    def ratio(self) -> float:
        return self.rss[self.prompts - 1] / self.rss[self.baseline - 1]

    @property
    def ok(self) -> bool:
        return abs(self.ratio - 1.0) <= TOLERANCE and self.last_equals_fresh

    def report(self) -> str:
        series = " ".join(f"{r / MIB:.0f}" for r in self.rss)
        lines = [
            f"soak: {self.prompts} prompts in {self.wall_s:.1f} s wall ({self.wall_s / self.prompts:.2f} s per prompt; "
            f"prompt times min {min(self.seconds):.2f} / median {float(np.median(self.seconds)):.2f} / "
            f"max {max(self.seconds):.2f} s)",
            f"RSS after each prompt (MiB): {series}",
            f"RSS after prompt {self.baseline}: {self.rss[self.baseline - 1] / MIB:.0f} MiB; after prompt "
            f"{self.prompts}: {self.rss[-1] / MIB:.0f} MiB; ratio {self.ratio:.4f} (limit 1 +- {TOLERANCE:g}); "
            f"peak (VmHWM) {self.peak_rss / MIB:.0f} MiB",
            f"Cancel after prompt {self.cancel_after}: stopped at step {self.cancelled_at_step}; "
            f"POST /free after prompt {self.free_after}: RSS {self.rss_before_free / MIB:.0f} -> "
            f"{self.rss_after_free / MIB:.0f} MiB",
            f"last prompt ({self.outputs} pictures) equals a fresh server's: {self.last_equals_fresh} "
            f"(fresh server {self.fresh_s:.1f} s)",
            "PASS" if self.ok else "FAIL",
        ]
        return "\n".join(lines)


def _cancel_one(server: comfy_harness.ComfyServer, number: int) -> int:
    """Queue a long toy-model prompt, cancel it once its sampler reports progress; returns the step it reached."""
    job = Job(TOY_MODEL_CHOICE, "square", steps=500)  # the most the sampler takes; Cancel comes after the first
    with server.events() as events:
        prompt_id = server.post_prompt(prompt_for(number, job, prefix="soak-cancelled"), client_id=events.client_id)
        events.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("prompt_id") == prompt_id
                        and m["data"].get("node") == SAMPLER, timeout=300)
        server.interrupt()
        entry = server.wait_history(prompt_id, timeout=120)
        steps = [p["value"] for p in events.of_type("progress", prompt_id) if p.get("node") == SAMPLER]
    if entry["status"].get("status_str") != "error" or SAVE in entry["outputs"]:
        raise comfy_harness.ServerError(f"the cancelled prompt was not interrupted: {entry['status']}")
    return max(steps)


def _settled_rss(server: comfy_harness.ComfyServer, drop_from: int, timeout: float = 30.0) -> int:
    """RSS once a free has shown (ComfyUI collects garbage right after it); the last reading on timeout."""
    deadline = time.monotonic() + timeout
    rss = server.rss()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        newer = server.rss()
        if newer < drop_from * 0.8 and abs(newer - rss) < 4 * MIB:
            return newer
        rss = newer
    return rss


def run_soak(prompts: int, workdir: Path, models: Path | None = None, startup_timeout: float = 300.0) -> SoakResult:
    """Run the soak in ``workdir`` (server folders, outputs; model files in ``models``, default workdir/models)."""
    models = models or workdir / "models"
    # In a child process: building the 2 GB checkpoint would otherwise leave this process that much bigger
    # while the servers run on the same machine.
    subprocess.run([sys.executable, __file__, "--write-models", str(models)], check=True)
    extra_paths = write_models(models)
    result = SoakResult(prompts, baseline_for(prompts))
    result.cancel_after = prompts // 2
    result.free_after = max(result.baseline + 1, (prompts * 7) // 10)
    base = workdir / "soak-server"
    write_inputs(base / "input")
    with comfy_harness.comfy_server(base, extra_paths, startup_timeout=startup_timeout) as server:
        server.timeout = 600.0
        start = time.perf_counter()
        for number in range(1, prompts + 1):
            t0 = time.perf_counter()
            entry = server.run_prompt(prompt_for(number))
            result.seconds.append(time.perf_counter() - t0)
            result.rss.append(server.rss())
            log.info("prompt %d/%d (%s, %s): %.1f s, RSS %.0f MiB", number, prompts, job_for(number).model,
                     job_for(number).size, result.seconds[-1], result.rss[-1] / MIB)
            if number == prompts:
                last = pictures(server, entry)
            if number == result.cancel_after:
                result.cancelled_at_step = _cancel_one(server, number)
                log.info("cancelled a prompt at step %d", result.cancelled_at_step)
            if number == result.free_after:
                result.rss_before_free = server.rss()
                server.free(unload_models=True, free_memory=True, until_log=r"ip2p: ComfyUI freed its caches")
                result.rss_after_free = _settled_rss(server, result.rss_before_free)
                log.info("POST /free: RSS %.0f -> %.0f MiB", result.rss_before_free / MIB, result.rss_after_free / MIB)
        result.wall_s = time.perf_counter() - start
        result.peak_rss = server.memory_status()["VmHWM"]
        if "Traceback" in server.log_text():
            raise comfy_harness.ServerError(f"the server logged a traceback\n{server.log_tail()}")

    fresh_base = workdir / "fresh-server"
    write_inputs(fresh_base / "input")
    t0 = time.perf_counter()
    with comfy_harness.comfy_server(fresh_base, extra_paths, startup_timeout=startup_timeout) as fresh:
        fresh.timeout = 600.0
        again = pictures(fresh, fresh.run_prompt(prompt_for(prompts)))
    result.fresh_s = time.perf_counter() - t0
    result.outputs = len(last)
    result.last_equals_fresh = len(last) > 0 and again == last
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=50, help="how many prompts (default 50; at least 12)")
    parser.add_argument("--workdir", type=Path, help="where the servers and outputs go (default: a temp folder)")
    parser.add_argument("--models", type=Path, help="where the model files are written once and reused")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--write-models", type=Path, help=argparse.SUPPRESS)  # run_soak's child process
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.write_models:
        write_models(args.write_models)
        return 0
    if not os.environ.get(comfy_harness.COMFYUI_ENV):
        parser.error(comfy_harness.SKIP_REASON)
    baseline_for(args.prompts)  # too few prompts: say so now
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ip2p-soak-"))
    log.info("soak in %s", workdir)
    result = run_soak(args.prompts, workdir, args.models)
    print(result.report())  # noqa: T201 - the benchmark's output
    if args.json:
        args.json.write_text(json.dumps(dict(asdict(result), ratio=result.ratio, ok=result.ok), indent=1))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
