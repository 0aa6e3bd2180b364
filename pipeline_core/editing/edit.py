"""``edit()``: pictures in, edited pictures out, for any model family.

The data path, one call in one direction each: settings are checked (:mod:`.settings`) → each picture becomes a
:class:`~.regions.Region` (what is edited at which size, under which mask) → the (picture, plan item) jobs are
grouped into batches that share guidance scales and latent size → each batch is sampled
(:func:`.sampling.sample` over a :class:`~.denoiser.Denoiser`) → each result is finished (decoded, resized back,
detail restored, blended by the mask). The family (text conditioning, image-latent scaling, schedulers, working
size) is asked through the model; nothing here knows which family it runs.

What this does that the anchors get wrong for users (shared/REFERENCE.md §3): per-item generators, image
guidance below 1, passes skipped where the formula does not need them, output at the input's exact size, masks
that keep the unmasked pixels bit for bit, edit strength, progress on every step and Cancel within a UNet call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from .. import limits
from ..models.cache import CachedModel, return_memory_to_os
from . import guidance, resolution
from .cancel import CancelCheck, cancel_points, checked_blocks
from .conditioning import Conditioning, check_conditioning
from .control import BatchControl, check_hints, hint_frame
from .denoiser import Denoiser
from .images import to_rgb, warn_if_tiny
from .masks import prepare_masks
from .regions import Region, make_region
from .sampling import sample, strength_steps
from .seeds import PlanItem, SeedPlan
from .settings import EditSettings, plan_items
from .step_cache import check_cacheable
from .vae import decode_latents, encode_images
from .vram import unet_activation_bytes, use_low_vram

log = logging.getLogger(__name__)

Progress = Callable[[int, int, "torch.Tensor | None"], None]
"""progress(done, total, preview): called after every step with the batch's current estimate of the clean
latents (diffusers-scaled; see :data:`.sampling.StepCallback`); may raise to cancel. Cancel checked only here waits
for a whole step; pass ``check_cancel`` to :func:`edit` to stop within a UNet call."""


@dataclass
class EditResult:
    """The edited pictures and their latents.

    ``latents`` are unscaled VAE latents (ComfyUI LATENT convention) at the *working* resolution, padded to the
    VAE factor: decoding one gives the sampler's picture before it is resized back to the input's size,
    detail-restored and blended by the mask. For an unmasked edit at native size (pictures up to the working
    area) that is exactly the IMAGE output. In crop-to-mask mode they are the final pictures encoded at the
    whole picture's working size (crops of different sizes have no common latent shape); for an image whose
    mask is empty, the input's own latent.
    """

    images: torch.Tensor  # IMAGE [N, H, W, 3] at the input's size, 0..1, CPU float32
    latents: torch.Tensor  # unscaled VAE latents [N, 4, h/8, w/8] at the working resolution, CPU float32
    items: list[tuple[int, PlanItem]]  # (input image index, plan item) for each output, in output order


@dataclass(frozen=True)
class Batch:
    """Jobs sampled together: the same guidance passes and the same latent size; each job has its own scales.

    A guidance sweep's items only differ in their scales, so they share batches: on a CPU a UNet call on 36 rows
    costs about as much as two on 12 (bf16 weights are re-laid out for every call), see benchmarks/speed.py.
    """

    text_guidance: tuple[float, ...]  # per job
    image_guidance: tuple[float, ...]
    jobs: tuple[int, ...]  # indices into the job list


def make_regions(model: CachedModel, images: torch.Tensor, masks: torch.Tensor | None,
                 settings: EditSettings) -> list[Region]:
    """Stage 1: what of each picture is edited, at which working size, under which mask."""
    c = model.components
    regions = [
        make_region(
            images[b], None if masks is None else masks[b], c.working_resolution, c.vae_scale_factor,
            resolution=settings.working_resolution, max_side=settings.max_side, upscale=settings.upscale_small,
            feather=settings.feather, crop_to_mask=settings.crop_to_mask, crop_padding=settings.crop_padding,
            restore=settings.restore_detail,
        )
        for b in range(len(images))
    ]
    for b, region in enumerate(regions):
        if region.skip:
            log.info("ip2p: image %d: the mask is empty; returning the image unchanged without sampling", b)
        elif region.size.resized or not region.whole:
            log.info("ip2p: image %d: editing box %s at %s", b, region.box, region.size.describe())
    return regions


def plan_batches(regions: list[Region], latent_shapes: list[tuple], guidances: list[tuple[float, float]],
                 max_batch: int) -> tuple[list[tuple[int, int]], list[Batch]]:
    """Stage 2: the (picture, item) jobs in output order, grouped into batches of at most ``max_batch``.

    A batch's composition never changes an item (each has its own generator); pictures whose mask is empty are
    not sampled at all.
    """
    jobs = [(b, k) for b in range(len(regions)) for k in range(len(guidances))]
    groups: dict[tuple, list[int]] = {}
    for j, (b, k) in enumerate(jobs):
        if not regions[b].skip:
            groups.setdefault((guidance.required_passes(*guidances[k]), latent_shapes[b]), []).append(j)
    batches = []
    for idx in groups.values():
        for i in range(0, len(idx), max_batch):
            chunk = tuple(idx[i : i + max_batch])
            scales = [guidances[jobs[j][1]] for j in chunk]
            batches.append(Batch(tuple(s for s, _ in scales), tuple(s for _, s in scales), chunk))
    return jobs, batches


def batch_controls(model: CachedModel, cond: Conditioning, pictures: list[int],
                   regions: list[Region]) -> list[BatchControl]:
    """The conditioning's active ControlNets with each item's hint at its region's working frame.

    A hint is cut and resized exactly as its picture (:func:`.control.hint_frame`), so in crop-to-mask mode the
    ControlNet sees the hint of the box that is edited.
    """
    out = []
    for control in cond.controls:
        if not control.active:
            continue  # strength 0 or no steered step: not run at all, so the edit is the one without it
        frames = []
        for b in pictures:
            region = regions[b]
            hint = control.hint[b if control.hint.shape[0] > 1 else 0][None]
            frames.append(hint_frame(hint, tuple(region.image.shape[:2]), region.box, region.size.content,
                                     model.components.vae_scale_factor))
        out.append(BatchControl(control, torch.cat(frames)))
    return out


def sample_batch(model: CachedModel, cond: Conditioning, batch: Batch, jobs: list[tuple[int, int]],
                 regions: list[Region], image_latents: list[torch.Tensor], items: list[PlanItem],
                 scheduler_name: str, settings: EditSettings, on_step) -> torch.Tensor:
    """Stage 3: sample one batch; returns its diffusers-scaled latents in the batch's job order."""
    c = model.components
    family = c.spec
    pictures = [jobs[j][0] for j in batch.jobs]
    latents = torch.cat([image_latents[b] for b in pictures])
    time_ids = None
    if cond.instruction_pooled is not None:
        ids = []
        for b in pictures:
            top, left, bottom, right = regions[b].box
            ids.append(family.time_ids(c, (bottom - top, right - left), regions[b].size.content))
        time_ids = torch.cat(ids)
    denoiser = Denoiser(model, cond, latents, batch.text_guidance, batch.image_guidance, time_ids,
                        batch_controls(model, cond, pictures, regions), fast_interval=settings.cache_interval,
                        steps=strength_steps(settings.steps, settings.denoise),
                        unet_rows=1 if settings.vram == "low" else None)
    lmask = None
    batch_regions = [regions[b] for b in pictures]
    if any(r.latent_mask is not None for r in batch_regions):
        free = [torch.ones(1, 1, *r.size.latent) if r.latent_mask is None else r.latent_mask for r in batch_regions]
        lmask = torch.cat(free)
    original = None
    if settings.denoise < 1.0 or lmask is not None:
        original = latents.to(c.device, torch.float32) * c.scaling_factor
    return sample(
        denoiser,
        family.make_scheduler(scheduler_name, c.scheduler_config),
        [items[jobs[j][1]].seed for j in batch.jobs],
        (c.unet.config.out_channels, *latents.shape[-2:]),
        settings.steps,
        c.device,
        strength=settings.denoise,
        original=original,
        latent_mask=lmask,
        on_step=on_step,
    )


def finish(model: CachedModel, regions: list[Region], image_latents: list[torch.Tensor],
           jobs: list[tuple[int, int]], results: dict[int, torch.Tensor], settings: EditSettings,
           size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 4: decode each result and put it back at the input's size (see :meth:`Region.finish`)."""
    c = model.components
    out_images, out_latents = [], []
    for j, (b, _) in enumerate(jobs):
        region = regions[b]
        if region.skip:
            out_images.append(region.image)
            out_latents.append(image_latents[b][0])
            continue
        unscaled = results[j] / c.scaling_factor
        low = decode_latents(model, unscaled[None], region.size.content, tiled=settings.vram == "low")
        out_images.append(region.finish(low))
        out_latents.append(unscaled)
    if any(not r.whole for r in regions):
        # Crops have no common latent shape: hand out the final pictures at the whole picture's working size.
        whole = resolution.working_size(
            *size, c.working_resolution, settings.working_resolution, settings.max_side, settings.upscale_small,
            c.vae_scale_factor,
        ).content
        tiled = settings.vram == "low"
        out_latents = [encode_images(model, resolution.resize_image(im[None], whole), tiled=tiled)[0][0]
                       for im in out_images]
    return torch.stack(out_images), torch.stack(out_latents)


def check_images(images) -> torch.Tensor:
    """An IMAGE batch as float RGB in 0..1, or an :class:`InputError` before any copy of a huge picture.

    Pictures below ``limits.MIN_USEFUL_SIDE`` on a side are edited, with a warning that the result means nothing.
    """
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        resolution.check_input_size(images.shape[1], images.shape[2])
    images = to_rgb(images)
    warn_if_tiny(images.shape[1], images.shape[2])
    return images


def edit(
    model: CachedModel,
    cond: Conditioning,
    images: torch.Tensor,
    plan: SeedPlan | Sequence[PlanItem],
    steps: int = 20,
    text_guidance: float | None = None,
    image_guidance: float | None = None,
    scheduler: str | None = "auto",
    progress: Progress | None = None,
    max_batch: int = 4,
    *,
    mask: torch.Tensor | None = None,
    feather: int = 0,
    denoise: float = 1.0,
    working_resolution: int | None = None,
    max_side: int | None = None,
    upscale_small: bool = False,
    restore_detail: bool = True,
    crop_to_mask: bool = False,
    crop_padding: int | None = None,
    check_cancel: CancelCheck | None = None,
    speed: str = "quality",
    fast_interval: int = int(limits.FAST_INTERVAL.default),
    vram: str = "auto",
) -> EditResult:
    """Edit every image of the IMAGE batch ``images`` with every item of ``plan``.

    Outputs are ordered image-major: all plan items of image 0, then of image 1, ... Items are run in batches
    of up to ``max_batch`` that share guidance scales; a batch's composition does not change any item.

    ``text_guidance`` / ``image_guidance``: s_T and s_I of the paper's formula; None is the model family's
    default (7.5 / 1.5 for SD1.x, 3.0 / 1.5 for SDXL-IP2P, 5.0 / 1.5 for CosXL Edit). A plan item's own values
    win over these.

    ``scheduler``: a name of :data:`SCHEDULER_CHOICES`; ``"auto"`` (default) is the model's own — its diffusers
    folder's scheduler, else its family's (Euler ancestral for SD1.5, EDM Euler for CosXL).

    Size: each picture is edited at about ``working_resolution``² pixels (None/0: the model's own, from its UNet:
    512² for SD1.5, 768² or 1024² for SDXL-based models), aspect kept, longer side at most ``max_side``;
    smaller pictures at their own size unless ``upscale_small``. The output has the input's exact size; with
    ``restore_detail`` the original's fine detail is put back where a downscaled edit left the picture alone.

    Mask (ComfyUI MASK, 1 = edit; see :mod:`.masks` for size and batch rules): outside it the output is the
    input bit for bit; ``feather`` px fade the edit in inside its border. An empty mask returns the input
    without sampling; a full mask is the same as none. ``crop_to_mask`` edits a padded box around the mask at
    the working resolution (``crop_padding`` px of context, None: automatic) and pastes it back.

    ``denoise`` (0, 1]: edit strength. 1 is the plain sampler (pure-noise start); lower values start from the
    image's own latent, noised, and run the last ``steps * denoise`` steps, so small changes stay small.

    ControlNets on ``cond`` (:func:`.control.add_control`) steer every UNet pass of the steps they cover; their
    hints follow each picture's region (see :mod:`.control` for the conventions).

    ``speed``: ``"quality"`` (default) runs the whole UNet on every step; ``"fast"`` is a step cache in the style of
    DeepCache (:mod:`.step_cache`): the whole UNet runs on one step of every ``fast_interval`` (1..10, default 2)
    and on the last, only its shallowest blocks on the others, reusing the deep features of the last full step —
    fewer seconds per edit for a slightly different picture. Each batch has its own cache. Interval 1 is quality.

    ``vram``: ``"normal"`` keeps the model's parts on the device; ``"low"`` fits small GPUs for more time (one
    part on the device at a time, the UNet one batch row at a time, the VAE in tiles: see :mod:`.vram`);
    ``"auto"`` (default) picks low on an accelerator with too little free memory, never on a CPU.

    ``check_cancel``: called before every step and before each block of every UNet and VAE call (see
    :mod:`.cancel`); raising there stops the edit within a fraction of a UNet call, and the model stays as it
    was, so the next edit gives the same picture as if this one had never started.
    """
    check_conditioning(model, cond)
    c = model.components
    default_text, default_image = c.spec.default_guidance
    settings = EditSettings(
        steps=steps, text_guidance=default_text if text_guidance is None else text_guidance,
        image_guidance=default_image if image_guidance is None else image_guidance, scheduler=scheduler,
        max_batch=max_batch, feather=feather, denoise=denoise, working_resolution=working_resolution,
        max_side=max_side, upscale_small=upscale_small, restore_detail=restore_detail, crop_to_mask=crop_to_mask,
        crop_padding=crop_padding, speed=speed, fast_interval=fast_interval, vram=vram,
    ).checked()
    items = plan_items(plan)
    guidances = [settings.guidance_for(it) for it in items]
    scheduler_name = c.spec.resolve_scheduler(settings.scheduler, c.scheduler_config)  # bad name: fail now
    if settings.cache_interval is not None:
        check_cacheable(c.unet)  # a UNet fast mode cannot run: refused before any model work
        log.info("ip2p: fast mode: the whole UNet on one step of every %d, its shallow blocks on the others",
                 settings.cache_interval)
    images = check_images(images)
    batch, height, width = images.shape[:3]
    check_hints([ctl for ctl in cond.controls if ctl.active], batch)
    masks = prepare_masks(mask, batch, height, width)
    if masks is not None:
        masks = masks.to(images.device)

    regions = make_regions(model, images, masks, settings)
    largest = max((r.size.latent[0] * r.size.latent[1] for r in regions), default=0)
    passes = max(len(guidance.required_passes(s_t, s_i)) for s_t, s_i in guidances)
    rows = passes * settings.max_batch  # of the largest UNet call
    low_vram = use_low_vram(model, settings.vram, largest, rows)
    settings = replace(settings, vram="low" if low_vram else "normal")
    if low_vram:
        # One part on the device at a time (see .vram): the UNet comes when the VAE has encoded.
        model.offload(*(name for name in c.modules() if name.startswith("text_encoder")), "unet")
        model.ensure_loaded("vae")
    else:
        model.ensure_loaded("unet", "vae", memory_required=unet_activation_bytes(model, largest, rows))
    with cancel_points(checked_blocks(c.unet, c.vae), check_cancel):
        image_latents = [encode_images(model, r.low, tiled=low_vram)[0] for r in regions]
        # The VAE encoder's and then the UNet's activations are freed into the C heap, where they stay resident
        # (fragmented) under the next phase's: handing them back between phases took 0.1-0.15 GB off a CPU
        # edit's peak (SD1.5, bf16, 256 px; benchmarks/peak_memory.py). A fraction of a millisecond each.
        model.done_with("vae")  # low memory mode: one module in memory at a time (models/releasing.py)
        return_memory_to_os(collect=False)
        if low_vram:
            model.offload("vae")
            model.ensure_loaded("unet", memory_required=unet_activation_bytes(model, largest, 1))
        jobs, batches = plan_batches(regions, [tuple(z.shape) for z in image_latents], guidances,
                                     settings.max_batch)

        total = len(batches) * strength_steps(settings.steps, settings.denoise)
        done = 0

        def on_step(_latents: torch.Tensor, denoised: torch.Tensor) -> None:
            nonlocal done
            done += 1
            if check_cancel is not None:
                check_cancel()
            if progress is not None:
                progress(done, total, denoised)

        results: dict[int, torch.Tensor] = {}
        for b in batches:
            out = sample_batch(model, cond, b, jobs, regions, image_latents, items, scheduler_name, settings,
                               on_step)
            for j, lat in zip(b.jobs, out):
                results[j] = lat.float().cpu()
        model.done_with("unet")
        return_memory_to_os(collect=False)
        if low_vram:
            model.offload("unet")
        out_images, out_latents = finish(model, regions, image_latents, jobs, results, settings, (height, width))
        model.done_with("vae")
    return EditResult(out_images, out_latents, [(b, items[k]) for b, k in jobs])
