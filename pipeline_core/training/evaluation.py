"""Measuring an edit model on held-out synthetic triplets, the way the paper measures one.

The paper plots edit strength (CLIP direction similarity) against preservation (CLIP image similarity) over
text and image guidance scales. The synthetic world knows the exact answer, so we can do better than CLIP:

- PSNR and SSIM of the output against the true edited image;
- a rule check per instruction (:func:`rule_check`), e.g. for "make the circle red": the circle's core pixels
  are now nearest to red and nothing else moved — the per-instruction success rate;
- preservation: PSNR of the output against the input outside the region the instruction may change;
- all of it over a grid of text guidance x image guidance (:func:`guidance_table`).

Every edit goes through the real path: :class:`cache.ModelCache` (loader) -> :func:`encode_instruction` ->
:func:`..editing.edit.edit` (dual guidance). ``python -m ip2p_nodes.pipeline_core.training.evaluation`` prints
the report for the shipped toy model, or for ``--model PATH``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import limits
from . import synthetic
from .synthetic import BACKGROUNDS, COLOURS, EDIT_KINDS, Shape, Triplet

log = logging.getLogger(__name__)

KEEP_BACKGROUND = 0.06  # mean abs error allowed on untouched background (VAE round trips are ~0.01-0.02)
KEEP_SHAPE = 0.15  # mean abs error allowed on each untouched shape (edges blur a little through the VAE)
MIN_IOU = 0.6


# ----------------------------------------------------------------------------------------------- image metrics

def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of images in 0..1 (over ``mask`` pixels if given)."""
    err = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = err[mask].mean() if mask is not None else err.mean()
    return float(10 * np.log10(1.0 / max(mse, 1e-10)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03), mean over RGB channels."""
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[:, None].double()
    y = torch.from_numpy(np.ascontiguousarray(b)).permute(2, 0, 1)[:, None].double()
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2)).double()
    w = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t):
        return F.conv2d(F.pad(t, (5, 5, 5, 5), mode="reflect"), w)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


# ----------------------------------------------------------------------------------------------- rule checks

def _cov(shape: Shape, size: int) -> np.ndarray:
    return synthetic.coverage(shape, size)


def _nearest(colour: np.ndarray, palette: dict[str, np.ndarray]) -> str:
    return min(palette, key=lambda k: float(np.sum((palette[k] - colour) ** 2)))


def _palette(scene, extra_bg: bool = True) -> dict[str, np.ndarray]:
    pal = {k: np.asarray(v, np.float32) * scene.darkness for k, v in COLOURS.items()}
    pal["background"] = np.asarray(BACKGROUNDS[scene.background], np.float32) * scene.darkness
    return pal


def _slot_box(slot: int, size: int) -> tuple[slice, slice]:
    h = size // 2
    return slice((slot // 2) * h, (slot // 2 + 1) * h), slice((slot % 2) * h, (slot % 2 + 1) * h)


def _shape_iou(out: np.ndarray, t: Triplet, shape: Shape, other: Shape | None) -> tuple[float, float]:
    """IoU of "pixels coloured like ``shape`` in its slot" with ``shape``'s mask, and with ``other``'s."""
    size = out.shape[0]
    ys, xs = _slot_box(shape.slot, size)
    pal = _palette(t.after)
    fg, bg = pal[shape.colour], pal["background"]
    patch = out[ys, xs]
    painted = np.sum((patch - fg) ** 2, -1) < np.sum((patch - bg) ** 2, -1)

    def iou(s: Shape | None) -> float:
        if s is None:
            return 0.0
        m = _cov(s, size)[ys, xs] >= 0.5
        return float((painted & m).sum() / max(1, (painted | m).sum()))

    return iou(shape), iou(other)


def _kept(out: np.ndarray, t: Triplet, changed: Sequence[Shape]) -> tuple[bool, str]:
    """Nothing outside the changed shapes moved: background and every other shape match the true edit."""
    size = out.shape[0]
    region = np.zeros((size, size), bool)
    for s in changed:
        region |= _cov(s, size) > 0
    region = F.max_pool2d(torch.from_numpy(region[None, None].astype(np.float32)), 3, 1, 1)[0, 0].numpy() > 0
    err = np.abs(out - t.edited).mean(-1)
    others = [s for s in t.after.shapes if all((s.slot != c.slot) for c in changed)]
    occupied = region.copy()
    for s in others:
        m = _cov(s, size) >= 0.5
        occupied |= _cov(s, size) > 0
        if err[m].mean() > KEEP_SHAPE:
            return False, f"the {s.kind} changed (mean error {err[m].mean():.2f})"
    background = ~occupied
    if background.any() and err[background].mean() > KEEP_BACKGROUND:
        return False, f"the background changed (mean error {err[background].mean():.2f})"
    return True, "nothing else moved"


def edit_region(t: Triplet) -> np.ndarray:
    """Pixels the instruction may change (everything for "make it darker")."""
    size = t.input.shape[0]
    if t.kind == "darker":
        return np.ones((size, size), bool)
    region = np.zeros((size, size), bool)
    shapes = [t.target] + ([t.before.find(t.target.kind)] if t.kind != "add" else [])
    if t.kind == "morph":
        shapes.append(next(s for s in t.before.shapes if s.slot == t.target.slot))
    for s in shapes:
        if s is not None:
            region |= _cov(s, size) > 0
    return F.max_pool2d(torch.from_numpy(region[None, None].astype(np.float32)), 3, 1, 1)[0, 0].numpy() > 0


def rule_check(t: Triplet, out: np.ndarray) -> tuple[bool, str]:
    """Did ``out`` (``[H,W,3]`` 0..1) do what ``t.instruction`` asks, and nothing else? Returns (ok, why)."""
    size = out.shape[0]
    if t.kind == "darker":
        ratio = float(out.mean() / max(1e-6, t.input.mean()))
        err = float(np.abs(out - t.edited).mean())
        if not 0.4 <= ratio <= 0.62:
            return False, f"brightness ratio {ratio:.2f}, wanted about {synthetic.DARKER_FACTOR}"
        if err > KEEP_BACKGROUND:
            return False, f"darker, but the picture changed otherwise (mean error {err:.2f})"
        return True, f"darker by {ratio:.2f} and nothing else changed"
    shape = t.target
    pal = _palette(t.after)
    core = _cov(shape, size) > 0.99
    seen = _nearest(out[core].mean(0), pal)
    if t.kind in ("recolor", "add") and seen != shape.colour:
        return False, f"the {shape.kind} looks {seen}, wanted {shape.colour}"
    if t.kind == "remove" and seen != "background":
        return False, f"the {shape.kind}'s place looks {seen}, wanted the background"
    if t.kind in ("morph", "add"):
        old = next((s for s in t.before.shapes if s.slot == shape.slot), None)
        new_iou, old_iou = _shape_iou(out, t, shape, old)
        if new_iou < MIN_IOU or new_iou <= old_iou:
            return False, f"the {shape.kind}'s outline matches {new_iou:.2f} (old outline {old_iou:.2f})"
        if t.kind == "morph" and seen != shape.colour:
            return False, f"the {shape.kind} looks {seen}, wanted it to keep {shape.colour}"
    changed = [shape] if t.kind != "morph" else [shape, next(s for s in t.before.shapes if s.slot == shape.slot)]
    return _kept(out, t, changed)


# ----------------------------------------------------------------------------------------------- running edits

def run_edits(model, triplets: Sequence[Triplet], text_guidance: float, image_guidance: float, steps: int = 20,
              seed: int = 0, scheduler: str = "euler_ancestral", speed: str = "quality",
              fast_interval: int = int(limits.FAST_INTERVAL.default)) -> list[np.ndarray]:
    """Edit every triplet's input with its instruction through the real path; outputs in triplet order.

    ``speed`` / ``fast_interval``: as :func:`..editing.edit.edit` (fast mode's step cache)."""
    from ..editing.conditioning import encode_instruction
    from ..editing.edit import edit

    by_text: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(triplets):
        by_text[t.instruction].append(i)
    outputs: list[np.ndarray | None] = [None] * len(triplets)
    for text, idx in by_text.items():
        cond = encode_instruction(model, text)
        images = torch.from_numpy(np.stack([triplets[i].input for i in idx]))
        result = edit(model, cond, images, [_item(seed)], steps=steps, text_guidance=text_guidance,
                      image_guidance=image_guidance, scheduler=scheduler, max_batch=len(idx), speed=speed,
                      fast_interval=fast_interval)
        for i, img in zip(idx, result.images):
            outputs[i] = img.numpy()
    return outputs  # type: ignore[return-value]


def _item(seed: int):
    from ..editing.seeds import PlanItem

    return PlanItem(seed=seed)


@dataclass
class Scores:
    success: dict[str, float]  # per edit kind, and "all"
    psnr: float  # to the true edit
    ssim: float
    preservation: float  # PSNR to the input outside the edit region (inf-free: capped at 60 dB)
    n: int


def score(triplets: Sequence[Triplet], outputs: Sequence[np.ndarray]) -> Scores:
    ok: dict[str, list[bool]] = defaultdict(list)
    psnrs, ssims, keeps = [], [], []
    for t, out in zip(triplets, outputs):
        passed, _ = rule_check(t, out)
        ok[t.kind].append(passed)
        psnrs.append(min(60.0, psnr(out, t.edited)))
        ssims.append(ssim(out, t.edited))
        outside = ~edit_region(t)
        if outside.any():
            keeps.append(min(60.0, psnr(out, t.input, outside)))
    success = {k: float(np.mean(ok[k])) for k in EDIT_KINDS if ok[k]}
    success["all"] = float(np.mean([v for k in ok for v in ok[k]]))
    return Scores(success, float(np.mean(psnrs)), float(np.mean(ssims)), float(np.mean(keeps)) if keeps else 60.0,
                  len(triplets))


def evaluate(model, triplets: Sequence[Triplet], text_guidance: float = 7.5, image_guidance: float = 1.5,
             steps: int = 20, seed: int = 0, **speed) -> Scores:
    """Scores of the edits; ``speed``: ``speed=`` / ``fast_interval=`` of :func:`run_edits`."""
    return score(triplets, run_edits(model, triplets, text_guidance, image_guidance, steps, seed, **speed))


def guidance_table(model, triplets: Sequence[Triplet], text_scales=(1.0, 3.0, 7.5), image_scales=(1.0, 1.5, 2.5),
                   steps: int = 20, seed: int = 0, **speed) -> list[tuple[float, float, Scores]]:
    return [(s_t, s_i, evaluate(model, triplets, s_t, s_i, steps, seed, **speed))
            for s_t in text_scales for s_i in image_scales]


def baselines(triplets: Sequence[Triplet], vae=None) -> dict[str, Scores]:
    """Reference rows: "do nothing" (output = input) and, given the VAE, the true edit through the VAE."""
    rows = {"identity (output = input)": score(triplets, [t.input for t in triplets])}
    if vae is not None:
        from .toy import images_to_tensor

        with torch.no_grad():
            x = images_to_tensor([t.edited for t in triplets]).to(next(vae.parameters()).dtype)
            rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.float()
        outs = [((r.permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1) for r in rec]
        rows["true edit through the VAE (ceiling)"] = score(triplets, outs)
    return rows


# ----------------------------------------------------------------------------------------------- report

def _row(label: str, s: Scores) -> str:
    kinds = " ".join(f"{s.success.get(k, float('nan')):6.0%}" for k in EDIT_KINDS)
    return f"{label:<38} {s.success['all']:6.0%} {kinds}  {s.psnr:6.2f} {s.ssim:6.3f} {s.preservation:7.2f}"


def report(model, per_kind: int = 20, steps: int = 20, seed: int = 0, table: bool = True,
           table_per_kind: int = 8, settings=((7.5, 1.5), (3.0, 1.5)), speed: str = "quality",
           fast_interval: int = int(limits.FAST_INTERVAL.default)) -> str:
    """The printed evaluation: baselines, the paper's default setting (and others), and the guidance grid.

    ``speed="fast"``: every model edit in fast mode (the step cache, one full step of every ``fast_interval``)."""
    fast = {"speed": speed, "fast_interval": fast_interval}
    mode = "quality" if speed == "quality" else f"fast mode, interval {fast_interval}"
    held_out = synthetic.balanced_set(per_kind, seed=seed, size=synthetic.BASE_SIZE)
    kinds = " ".join(f"{k:>6}" for k in EDIT_KINDS)
    header = f"{'':<38} {'all':>6} {kinds}  {'PSNR':>6} {'SSIM':>6} {'keep dB':>7}"
    lines = [f"held-out triplets: {len(held_out)} ({per_kind} per edit kind), {steps} steps euler_ancestral, "
             f"seed {seed}, {mode}",
             "success = rule check per instruction; PSNR/SSIM to the true edit; keep = PSNR to the input outside "
             "the edit region", header]
    for label, s in baselines(held_out, model.components.vae).items():
        lines.append(_row(label, s))
    for s_t, s_i in settings:
        start = time.time()
        scores = evaluate(model, held_out, s_t, s_i, steps, seed, **fast)
        lines.append(_row(f"model, text {s_t} / image {s_i}", scores))
        log.info("evaluation at s_T %s / s_I %s took %.0f s", s_t, s_i, time.time() - start)
    if table:
        subset = synthetic.balanced_set(table_per_kind, seed=seed, size=synthetic.BASE_SIZE)
        lines += ["", f"guidance grid on {len(subset)} held-out triplets (text guidance s_T x image guidance s_I):",
                  header]
        for s_t, s_i, s in guidance_table(model, subset, steps=steps, seed=seed, **fast):
            lines.append(_row(f"s_T {s_t:>4} / s_I {s_i:>4}", s))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from ..models.assets import toy_model_path
    from ..models.cache import ModelCache
    from ..models.loading import ModelSource

    parser = argparse.ArgumentParser(prog="python -m ip2p_nodes.pipeline_core.training.evaluation",
                                     description="Score an IP2P model on held-out synthetic triplets.")
    parser.add_argument("--model", default=str(toy_model_path()), help="model path (default: the shipped toy model)")
    parser.add_argument("--per-kind", type=int, default=20, help="held-out triplets per edit kind")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-table", action="store_true", help="skip the guidance grid")
    parser.add_argument("--table-per-kind", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fast", action="store_true",
                        help="edit in fast mode (the DeepCache-style step cache), to measure what it costs")
    parser.add_argument("--fast-interval", type=int, default=int(limits.FAST_INTERVAL.default),
                        help="with --fast: one full UNet step of every this many (default: the pack's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = ModelCache()
    model = cache.get(cache.key_for(ModelSource.from_path(args.model), "fp32", "cpu"))
    text = report(model, args.per_kind, args.steps, args.seed, not args.no_table, args.table_per_kind,
                  speed="fast" if args.fast else "quality", fast_interval=args.fast_interval)
    # The report is this command's output, so it goes to stdout (not through logging).
    import sys

    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
