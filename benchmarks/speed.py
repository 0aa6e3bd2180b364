"""Speed of our sampler against diffusers' InstructPix2Pix pipeline (the anchor), measured in the same run.

    python benchmarks/speed.py --model full --resolution 256 --steps 4

``full`` builds the real SD1.5-IP2P architecture (860 M-parameter UNet) with random weights: speed does not depend
on the weights' values, and nothing is downloaded. ``sdxl`` builds the real SDXL-IP2P architecture the same way (2.6
B-parameter UNet, CLIP-L and CLIP-G; about 14 GB in fp32) against diffusers' SDXL pipeline. ``tiny`` is the test
model (seconds, for a smoke run). Prints seconds per edit, seconds per step, ratios against the anchor, and the UNet
floor (how much of a step is spent outside the UNet); then (``--sections memory``, full model) the peak memory of
fresh processes doing load + one edit, ours against diffusers' (benchmarks/peak_memory.py). ``--sections fast``: our
fp32 edit in fast mode (the step cache, ``--fast-interval``) against the same edit in quality mode, with the UNet's
middle-block calls counted. ``--sections levers``: one UNet call (the 3 guidance passes) with each CPU speed lever
of issue 10 against the plain fp32 call — the classic attention against PyTorch's SDPA (diffusers' default),
channels_last, ``torch.compile`` (inductor; its compile time printed apart), and in bf16 the convolutions on
prepacked weights (``pipeline_core/models/cpu_pack.py``) — so each lever is kept or rejected on a figure.
``--sections sweep``: a 4-seed x 3-guidance plan as one call against 12 single edits. ``--json PATH`` writes every
figure.

    python benchmarks/speed.py --model full --resolution 256 --steps 20 --sections fast
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
import time
from pathlib import Path

import peak_memory  # beside this file: run as a script, its folder is on sys.path
import torch

from ip2p_nodes.pipeline_core import ModelCache, ModelSource, PlanItem, SeedPlan, edit, encode_instruction, limits
from ip2p_nodes.pipeline_core.editing.step_cache import StepCache
from ip2p_nodes.pipeline_core.models.components import IP2PComponents
from ip2p_nodes.pipeline_core.models.families import get as get_family
from ip2p_nodes.pipeline_core.models.loading import CONFIG_DIR
from ip2p_nodes.pipeline_core.models.precision import resolve_precision

FAMILY_OF = {"full": "sd15", "sdxl": "sdxl", "tiny": "sd15"}


def build_modules(kind: str, tmp: Path) -> tuple[dict, dict]:
    """(modules by role, scheduler config) of the benchmark's model: ``full`` SD1.5-IP2P, ``sdxl`` SDXL-IP2P (2.6 B
    UNet, CLIP-L + CLIP-G), both at real size from the pack's configs with random fp32 weights (the tests' model
    files); ``tiny`` the tests' tiny model."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared test support package
    from support import model_files, tiny_models, tiny_sdxl

    family = FAMILY_OF[kind]
    if kind == "tiny":
        unet, vae, te, _ = tiny_models.make_components()
        modules = {"unet": unet, "vae": vae, "text_encoder": te}
    else:
        modules = model_files.full_size_modules(family, seed=0, dtype=torch.float32)
    # The byte-level tokenizer (nothing downloaded); SDXL's second one pads with id 0, as the real one does.
    modules["tokenizer"], tokenizer_2 = tiny_sdxl.write_tokenizers(tmp / "tok")
    if family == "sdxl":
        modules["tokenizer_2"] = tokenizer_2
    sched = json.loads((CONFIG_DIR / family / "scheduler.json").read_text())
    return modules, sched


def anchor_pipeline(kind: str, modules: dict, sched: dict):
    """diffusers' own InstructPix2Pix pipeline of the family on the same modules, fp32 (its default), with the
    family's scheduler; returns a function doing one edit of ``x`` (1, 3, H, W) in [0, 1]."""
    import diffusers

    scheduler = getattr(diffusers, sched["_class_name"]).from_config(sched)
    if FAMILY_OF[kind] == "sdxl":
        pipe = diffusers.StableDiffusionXLInstructPix2PixPipeline(scheduler=scheduler, add_watermarker=False,
                                                                   **modules)
    else:
        pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            **modules)
    pipe.set_progress_bar_config(disable=True)

    def run(x, steps):
        # SDXL's pipeline edits at 1024² unless told the size; SD1.5's takes the picture's.
        size = {"height": x.shape[2], "width": x.shape[3]} if FAMILY_OF[kind] == "sdxl" else {}
        pipe("make it winter", image=x, num_inference_steps=steps, guidance_scale=7.5, image_guidance_scale=1.5,
             generator=torch.Generator().manual_seed(0), output_type="pt", **size)

    return run


def unet_floor_inputs(unet, batch: int, lat: int, dtype: torch.dtype, channels_last: bool) -> dict:
    """Random inputs of one UNet call on ``batch`` rows (SDXL's pooled text and size ids included)."""
    cfg = unet.config
    sample = torch.randn(batch, cfg.in_channels, lat, lat, dtype=dtype)
    if channels_last:
        sample = sample.contiguous(memory_format=torch.channels_last)
    kwargs = {"sample": sample, "timestep": 500,
              "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, dtype=dtype)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, dtype=dtype),
                                       "time_ids": torch.full((batch, 6), float(lat * 8), dtype=dtype)}
    return kwargs


def timed(fn, repeats: int) -> float:
    """Best of ``repeats`` after one untimed call (oneDNN builds its kernels on the first call of a shape);
    ``repeats=0``: one timed call, nothing before it (for long runs whose shapes were already warmed up)."""
    if repeats == 0:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=tuple(FAMILY_OF), default="full",
                   help="full: SD1.5-IP2P; sdxl: SDXL-IP2P (about 14 GB in fp32: the speed section); tiny: a smoke run")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sections", nargs="+", choices=("speed", "sweep", "memory", "fast", "levers"),
                   default=["speed", "sweep", "memory", "fast"],
                   help="memory: peak RSS of fresh processes, full-size model only (see peak_memory.py); sweep: a "
                        "4-seed x 3-guidance plan in one call against 12 single edits; fast: fast mode against "
                        "quality; levers: one UNet call with each CPU speed lever")
    p.add_argument("--fast-interval", type=int, default=int(limits.FAST_INTERVAL.default),
                   help="fast section: one full UNet step of every this many")
    p.add_argument("--json", type=Path, help="also write the figures here")
    peak_memory.add_arguments(p)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    figures = {}
    if "speed" in args.sections:
        figures["speed"] = speed_section(args)
    if "sweep" in args.sections:
        figures["sweep"] = sweep_section(args)
    if "fast" in args.sections:
        figures["fast"] = fast_section(args)
    if "levers" in args.sections:
        figures["levers"] = levers_section(args)
    if "memory" in args.sections and args.model in peak_memory.FAMILIES:
        # Each case is a fresh process, so what the speed section left in this one does not count.
        figures["memory"] = peak_memory.run_section(args, args.resolution, args.steps)
        peak_memory.print_table(figures["memory"])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def speed_section(args) -> dict:
    """Seconds per edit of diffusers' pipeline and ours in this process; prints the table, returns the figures."""
    with tempfile.TemporaryDirectory() as tmp:
        modules, sched = build_modules(args.model, Path(tmp))
        family = get_family(FAMILY_OF[args.model])
        img = torch.rand(1, args.resolution, args.resolution, 3, generator=torch.Generator().manual_seed(0))
        x = img.permute(0, 3, 1, 2)
        common = dict(steps=args.steps, text_guidance=7.5, image_guidance=1.5)
        rows = []
        floors = {}

        # Anchor: diffusers' own pipeline, fp32 (its default), same scheduler and settings; measured first, so
        # ours can then take the very same modules (fp32 as they are, "auto" cast in place, last): no second
        # copy of the weights, which SDXL in fp32 (14 GB) could not afford.
        run_diffusers = anchor_pipeline(args.model, modules, sched)
        anchor = timed(functools.partial(run_diffusers, x, args.steps), args.repeats)
        rows.append(("diffusers pipeline fp32 (anchor)", anchor))
        del run_diffusers

        for precision in ("fp32", "auto"):
            resolved = resolve_precision(precision, "cpu")
            src = ModelSource("diffusers", f"in-memory-{args.model}")

            def loader(source, prec, device, place):
                return family.assemble(dict(modules), sched, prec, torch.device(device), source)

            cache = ModelCache(loader=loader)
            model = cache.get(cache.key_for(src, precision, "cpu"))
            assert isinstance(model.components, IP2PComponents)
            cond = encode_instruction(model, "make it winter")
            # Bound now (not a closure): `model` is deleted at the end of each pass to free its memory.
            t = timed(functools.partial(edit, model, cond, img, SeedPlan.single(0), **common), args.repeats)
            packed = any("forward" in m.__dict__ for m in model.components.unet.modules())
            label = {"bf16": " + channels_last" + (", prepacked convolutions" if packed else "")}.get(resolved.name, "")
            rows.append((f"ip2p-nodes {resolved.name}{label}", t))

            # UNet floor: one batch-of-3 forward at this precision.
            c = model.components
            lat = args.resolution // 8
            inputs = unet_floor_inputs(c.unet, 3, lat, c.precision.unet, c.precision.unet == torch.bfloat16)
            floor = timed(lambda: c.unet(**inputs), args.repeats)
            # VAE floor: the input encoded once and the result decoded once, the module calls alone.
            pixels = x.to(c.precision.vae) * 2 - 1
            z = torch.randn(1, 4, lat, lat, dtype=c.precision.vae)
            with torch.inference_mode():
                vae_floor = timed(lambda: (c.vae.encode(pixels).latent_dist.mode(), c.vae.decode(z).sample),
                                  args.repeats)
            rows.append((f"  UNet floor: steps x batch-of-3 forward ({resolved.name})", floor * args.steps))
            rows.append((f"  VAE floor: one encode + one decode ({resolved.name})", vae_floor))
            rows.append((f"  everything else: scheduler, guidance, Python ({resolved.name})",
                         t - floor * args.steps - vae_floor))
            floors[resolved.name] = {"edit_seconds": t, "unet_floor_seconds": floor * args.steps,
                                     "vae_floor_seconds": vae_floor,
                                     "edit_vs_unet_vae_floor": t / (floor * args.steps + vae_floor)}
            del cache, model

    print(f"\nmodel={args.model} resolution={args.resolution} steps={args.steps} threads={torch.get_num_threads()}")
    print(f"{'what (one edit)':58s} {'seconds':>9s} {'s/step':>8s} {'share':>6s} {'vs anchor':>10s}")
    total = anchor
    for name, secs in rows:
        if not name.startswith("  "):
            total = secs
            share, ratio = "", f"{anchor / secs:9.2f}x"
        else:
            share, ratio = f"{100 * secs / total:5.0f}%", ""
        print(f"{name:58s} {secs:9.3f} {secs / args.steps:8.3f} {share:>6s} {ratio:>10s}")
    for name, f in floors.items():
        # Issue 10's floor: what the UNet and the VAE alone would take; the rest is ours to shave.
        print(f"edit / (UNet + VAE floor), {name}: {f['edit_vs_unet_vae_floor']:.3f}x")
    return {"floors": floors, "model": args.model, "resolution": args.resolution, "steps": args.steps,
            "threads": torch.get_num_threads(), "anchor_seconds": anchor,
            "rows": [{"what": name.strip(), "seconds": secs, "vs_anchor": anchor / secs} for name, secs in rows]}


def in_memory_edit(args, tmp: Path, precision: str):
    """The benchmark's model (:func:`build_modules`) through our cache in ``precision``, "make it winter"
    encoded, and the input picture: (model, conditioning, image)."""
    modules, sched = build_modules(args.model, tmp)

    def loader(source, prec, device, place):
        return get_family(FAMILY_OF[args.model]).assemble(modules, sched, prec, torch.device(device), source)

    cache = ModelCache(loader=loader)
    model = cache.get(cache.key_for(ModelSource("diffusers", f"in-memory-{args.model}"), precision, "cpu"))
    img = torch.rand(1, args.resolution, args.resolution, 3, generator=torch.Generator().manual_seed(0))
    return model, encode_instruction(model, "make it winter"), img


def sweep_section(args) -> dict:
    """A 4-seed x 3-text-guidance plan as one edit call (at the default and at a 12-item batch) against the same 12
    edits one call each, in "auto" precision; plus one edit at s_I = 1 (two guidance passes instead of three)."""
    with tempfile.TemporaryDirectory() as tmp:
        model, cond, img = in_memory_edit(args, Path(tmp), "auto")
        plan = [PlanItem(seed, s_t, 1.5) for seed in range(4) for s_t in (5.0, 7.5, 10.0)]

        def run(items, **kw):
            return edit(model, cond, img, items, steps=args.steps, **kw)

        # Untimed, one step each: oneDNN builds its kernels on the first call of each batch shape.
        for max_batch in (1, int(limits.MAX_BATCH.default), len(plan)):
            edit(model, cond, img, plan[:max_batch], steps=1, max_batch=max_batch)
        singles = sum(timed(functools.partial(run, [item]), 0) for item in plan)
        rows = {"12 single edits (one call each)": singles}
        for max_batch in (int(limits.MAX_BATCH.default), len(plan)):
            rows[f"one call, max_batch={max_batch}"] = timed(functools.partial(run, plan, max_batch=max_batch), 0)
        one = timed(functools.partial(run, [PlanItem(0, 7.5, 1.5)]), args.repeats)
        unit = timed(functools.partial(run, [PlanItem(0, 7.5, 1.0)]), args.repeats)
    precision = model.key.precision
    print(f"\nsweep: model={args.model} resolution={args.resolution} steps={args.steps} {precision} "
          f"threads={torch.get_num_threads()}; 4 seeds x text guidance 5 / 7.5 / 10, image guidance 1.5")
    out = {"model": args.model, "resolution": args.resolution, "steps": args.steps, "precision": precision,
           "threads": torch.get_num_threads(), "rows": {}}
    for name, secs in rows.items():
        per_item = secs / singles
        out["rows"][name] = {"seconds": secs, "per_item_vs_single": per_item}
        print(f"  {name:40s} {secs:9.2f} s  per item {per_item:6.3f}x a single edit")
    out["s_i_1"] = {"seconds": unit, "default_seconds": one, "ratio": unit / one}
    print(f"  one edit at s_I = 1: {unit:.2f} s against {one:.2f} s at s_I = 1.5 ({unit / one:.3f}x: 2 passes, not 3)")
    return out


def fast_section(args) -> dict:
    """Seconds per fp32 edit in quality and in fast mode, same model, picture and seed; prints the rows."""
    with tempfile.TemporaryDirectory() as tmp:
        model, cond, img = in_memory_edit(args, Path(tmp), "fp32")
        deep_calls = []
        hook = model.components.unet.mid_block.register_forward_pre_hook(lambda *_: deep_calls.append(1))
        runs = {speed: functools.partial(edit, model, cond, img, SeedPlan.single(0), steps=args.steps,
                                         text_guidance=7.5, image_guidance=1.5, speed=speed,
                                         fast_interval=args.fast_interval)
                for speed in ("quality", "fast")}
        rows = {}
        for speed, run in runs.items():
            deep_calls.clear()
            run()  # untimed: oneDNN builds its kernels on the first call of a shape
            rows[speed] = {"seconds": float("inf"), "deep_block_calls": len(deep_calls)}
        hook.remove()
        # Alternated, best of each: on a shared machine the load drifts, and it must not favour one mode.
        for _ in range(args.repeats):
            for speed, run in runs.items():
                t0 = time.perf_counter()
                run()
                rows[speed]["seconds"] = min(rows[speed]["seconds"], time.perf_counter() - t0)
        # One UNet call of each kind on the batch of 3 guidance passes: what a cached step costs against a full one.
        c = model.components
        lat = args.resolution // 8
        inputs = unet_floor_inputs(c.unet, 3, lat, torch.float32, channels_last=False)
        step_cache = StepCache(c.unet, interval=1 << 30)
        full_call = timed(lambda: c.unet(**inputs), args.repeats)
        step_cache(**inputs)  # keeps the deep features for the cached calls
        cached_call = timed(lambda: step_cache(**inputs), args.repeats)
        rows["unet_call"] = {"full_seconds": full_call, "cached_seconds": cached_call,
                             "cached_over_full": cached_call / full_call}
    ratio = rows["fast"]["seconds"] / rows["quality"]["seconds"]
    print(f"\nfast mode: model={args.model} resolution={args.resolution} steps={args.steps} fp32 "
          f"threads={torch.get_num_threads()} interval={args.fast_interval}")
    for speed in ("quality", "fast"):
        row = rows[speed]
        print(f"  {speed:8s} {row['seconds']:9.3f} s  {row['seconds'] / args.steps:8.3f} s/step  "
              f"middle block run {row['deep_block_calls']}x")
    print(f"  fast / quality time: {ratio:.3f} ({1 / ratio:.2f}x faster); one UNet call on 3 passes: full "
          f"{full_call:.3f} s, cached {cached_call:.3f} s ({cached_call / full_call:.3f})")
    return {"model": args.model, "resolution": args.resolution, "steps": args.steps, "precision": "fp32",
            "threads": torch.get_num_threads(), "interval": args.fast_interval, **rows, "fast_over_quality": ratio}


def levers_section(args) -> dict:
    """Seconds per UNet call (batch of the 3 guidance passes, fp32) with each lever; prints and returns them."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    with tempfile.TemporaryDirectory() as tmp:
        unet = build_modules(args.model, Path(tmp))[0]["unet"]
    lat = args.resolution // 8
    g = torch.Generator().manual_seed(0)
    inp = torch.randn(3, 8, lat, lat, generator=g)
    emb = torch.randn(3, 77, unet.config.cross_attention_dim, generator=g)
    reference = unet(inp, 500, encoder_hidden_states=emb).sample

    def call(module, x):
        return lambda: module(x, 500, encoder_hidden_states=emb).sample

    rows: dict[str, dict] = {}

    def measure(name, fn, **extra):
        seconds = timed(fn, args.repeats)
        out = fn()
        rows[name] = {"seconds": seconds, "max_abs_diff": float((out - reference).abs().max()), **extra}

    measure("plain fp32 (SDPA attention, diffusers' default)", call(unet, inp))
    unet.set_attn_processor(AttnProcessor())
    measure("classic attention (no SDPA)", call(unet, inp))
    unet.set_attn_processor(AttnProcessor2_0())
    unet.to(memory_format=torch.channels_last)
    measure("channels_last", call(unet, inp.contiguous(memory_format=torch.channels_last)))
    unet.to(memory_format=torch.contiguous_format)
    try:
        compiled = torch.compile(unet)
        t0 = time.perf_counter()
        compiled(inp, 500, encoder_hidden_states=emb)
        compile_seconds = time.perf_counter() - t0
        measure("torch.compile (inductor, default mode)", call(compiled, inp), compile_seconds=compile_seconds)
    except Exception as exc:  # a machine without a working C++ toolchain: the lever is unavailable, say so
        rows["torch.compile (inductor, default mode)"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    # bf16 (what "auto" runs on CPUs with AMX/AVX512-BF16): channels_last, then convolutions on prepacked weights.
    from ip2p_nodes.pipeline_core.models import cpu_pack

    if cpu_pack.available():
        unet.to(torch.bfloat16).to(memory_format=torch.channels_last)
        x16 = inp.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        e16 = emb.to(torch.bfloat16)
        bf16_ref = unet(x16, 500, encoder_hidden_states=e16).sample
        for name in ("bf16 channels_last", "bf16 channels_last, prepacked convolutions"):
            if "prepacked" in name:
                cpu_pack.pack_convolutions(unet)
            fn = lambda: unet(x16, 500, encoder_hidden_states=e16).sample  # noqa: E731
            rows[name] = {"seconds": timed(fn, args.repeats),
                          "max_abs_diff_vs_bf16": float((fn().float() - bf16_ref.float()).abs().max())}
    plain = rows["plain fp32 (SDPA attention, diffusers' default)"]["seconds"]
    print(f"\nCPU levers: one UNet call, 3 passes, model={args.model} resolution={args.resolution} fp32 "
          f"threads={torch.get_num_threads()}")
    for name, row in rows.items():
        if "error" in row:
            print(f"  {name:48s} unavailable: {row['error']}")
            continue
        row["vs_plain"] = row["seconds"] / plain
        extra = f"  (compile {row['compile_seconds']:.0f} s)" if "compile_seconds" in row else ""
        diff = row.get("max_abs_diff", row.get("max_abs_diff_vs_bf16"))
        against = "" if "max_abs_diff" in row else " vs bf16"
        print(f"  {name:48s} {row['seconds']:8.3f} s  {row['vs_plain']:6.3f}x  max|diff|{against} {diff:.1e}"
              f"{extra}")
    return {"model": args.model, "resolution": args.resolution, "threads": torch.get_num_threads(), "rows": rows}


if __name__ == "__main__":
    main()
