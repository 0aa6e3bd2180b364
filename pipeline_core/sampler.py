"""The dual-guidance denoising loop, owned here rather than delegated to a diffusers pipeline ``__call__``.

It follows ``StableDiffusionInstructPix2PixPipeline`` step for step (same scheduler calls, same batch order,
same noise draws), so with the same seed and inputs it produces the same image; the differences are what the
pipeline gets wrong for users: per-item generators (an item is reproducible from its own seed inside any
batch), image guidance below 1, passes skipped where the formula does not need them, output at the input's
exact size, progress and cancel on every step.

Beyond the pipeline: any input size through a working resolution (:mod:`.resolution`), masked edits that keep
the unmasked latent on the original's trajectory and the unmasked pixels bit for bit (:mod:`.masks`,
:mod:`.regions`), and edit strength (``denoise`` < 1 starts from the image's own noised latent, as img2img).
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from . import guidance, resolution
from .cache import CachedModel
from .conditioning import Conditioning, check_conditioning
from .errors import InputError
from .images import comfy_to_vae, to_rgb, vae_to_comfy
from .masks import check_feather, prepare_masks
from .regions import Region, make_region
from .schedulers import DEFAULT_SCHEDULER, make_scheduler
from .seeds import PlanItem, SeedPlan, generators

log = logging.getLogger(__name__)

Progress = Callable[[int, int, "torch.Tensor | None"], None]
"""progress(done, total, latents): called after every step; may raise to cancel (ComfyUI's Cancel does)."""

MAX_STEPS = 500


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


@contextmanager
def _vae_tiling(vae, pixels: int):
    """Tile the VAE for frames above ``resolution.VAE_TILE_AREA`` pixels, restoring its setting after.

    Tiled results differ slightly from whole-frame ones (each tile normalises on its own), so small frames,
    which fit in memory anyway, are never tiled.
    """
    previous = vae.use_tiling
    vae.use_tiling = previous or pixels > resolution.VAE_TILE_AREA
    if vae.use_tiling and not previous:
        log.info("ip2p: %d-pixel frame: VAE in tiles of %d px", pixels, vae.tile_sample_min_size)
    try:
        yield
    finally:
        vae.use_tiling = previous


@torch.inference_mode()
def encode_images(model: CachedModel, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image latents as the paper conditions on them: ``latent_dist.mode()``, not scaled."""
    c = model.components
    x, size = comfy_to_vae(images, c.vae_scale_factor)
    model.ensure_loaded("vae")
    with _vae_tiling(c.vae, x.shape[-2] * x.shape[-1]):
        latents = [c.vae.encode(x[i : i + 1].to(c.device, c.precision.vae)).latent_dist.mode() for i in range(len(x))]
    return torch.cat(latents).float(), size


@torch.inference_mode()
def decode_latents(model: CachedModel, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Unscaled latents (ComfyUI convention) -> IMAGE cropped to ``size``."""
    c = model.components
    model.ensure_loaded("vae")
    pixels = latents.shape[-2] * latents.shape[-1] * c.vae_scale_factor**2
    with _vae_tiling(c.vae, pixels):
        out = [c.vae.decode(z.to(c.device, c.precision.vae)).sample.float().cpu() for z in latents.split(1)]
    return vae_to_comfy(torch.cat(out), size)


def unet_activation_bytes(model: CachedModel, latent_area: int, batch: int) -> int:
    """Rough peak activation memory of one UNet call, for ComfyUI's memory manager to make room.

    Same heuristic ComfyUI uses for its own SD UNets (``BaseModel.memory_required``: 0.6/50 MiB per latent
    pixel and byte of dtype), so our runs and native ones compete for memory on the same terms.
    """
    dtype_bytes = torch.finfo(model.components.precision.unet).bits // 8
    return int(batch * latent_area * dtype_bytes * 0.6 / 50 * 1024 * 1024)


def _step_kwargs(scheduler, gens: list[torch.Generator]) -> dict:
    # As diffusers' prepare_extra_step_kwargs: only ancestral/SDE schedulers take a generator, DDIM an eta.
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "generator" in params:
        kwargs["generator"] = gens
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise InputError(
            f"denoise must be above 0 and at most 1, got {strength!r}: 1 redraws the picture under the image "
            "condition, 0.3-0.6 keeps its layout and colours"
        )
    return float(strength)


def strength_steps(steps: int, strength: float) -> int:
    """Steps actually run at edit strength ``strength``: the last ``steps * strength`` of the schedule (>= 1)."""
    if strength >= 1.0:
        return steps
    # As diffusers' img2img get_timesteps (floor), but never zero steps: a tiny strength still runs the last.
    return max(1, min(int(steps * strength), steps))


def _check_settings(steps: int, s_t: float, s_i: float) -> None:
    if not 1 <= int(steps) <= MAX_STEPS:
        raise InputError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    for name, v in (("text guidance", s_t), ("image guidance", s_i)):
        if not (isinstance(v, (int, float)) and -30.0 <= v <= 30.0) or v != v:
            raise InputError(f"{name} must be a number between -30 and 30, got {v}")


@torch.inference_mode()
def denoise(
    model: CachedModel,
    cond: Conditioning,
    image_latents: torch.Tensor,
    seeds: list[int],
    s_t: float,
    s_i: float,
    steps: int,
    scheduler_name: str = DEFAULT_SCHEDULER,
    on_step: Callable[[torch.Tensor], None] | None = None,
    strength: float = 1.0,
    latent_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the sampler for one batch of items sharing guidance scales; returns diffusers-scaled latents.

    ``image_latents[k]`` is item k's image condition and ``seeds[k]`` its noise. ``strength`` < 1 starts from
    the image's own latent noised to the matching timestep and runs only the rest of the schedule (img2img).
    ``latent_mask`` ``[k,1,h,w]`` (1 = free): after every step the latent outside it is replaced by the
    original latent noised to the next timestep, and by the clean original after the last step, as diffusers'
    inpainting pipeline does for 4-channel UNets.
    """
    c = model.components
    n = len(seeds)
    device, dtype = c.device, c.precision.unet
    scheduler = make_scheduler(scheduler_name, c.scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    gens = generators(seeds)

    # 1. Initial noise, one generator per item, drawn on the CPU as diffusers' randn_tensor does.
    shape = (n, c.unet.config.out_channels, *image_latents.shape[-2:])
    initial_noise = randn_tensor(shape, generator=gens, device=device, dtype=torch.float32)
    img = image_latents.to(device, torch.float32)
    original = img * c.scaling_factor if strength < 1.0 or latent_mask is not None else None
    if strength < 1.0:
        # As diffusers' img2img: skip the first part of the schedule and noise the image's latent to where
        # the rest begins; begin_index lets schedulers that look timesteps up find the right sigma.
        t_start = steps - strength_steps(steps, strength)
        timesteps = timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        latents = scheduler.add_noise(original, initial_noise, timesteps[:1].repeat(n))
    else:
        latents = initial_noise * scheduler.init_noise_sigma
    if latent_mask is not None:
        latent_mask = latent_mask.to(device, torch.float32)

    # 2. The passes this pair of scales needs, batched in the paper's order (text, image, uncond).
    passes = guidance.required_passes(s_t, s_i)
    text_emb = cond.instruction_embeds.to(device, dtype)
    neg_emb = cond.negative_embeds.to(device, dtype)
    pass_images = {guidance.TEXT: img, guidance.IMAGE: img, guidance.UNCOND: torch.zeros_like(img)}
    pass_texts = {guidance.TEXT: text_emb, guidance.IMAGE: neg_emb, guidance.UNCOND: neg_emb}
    cond_images = torch.cat([pass_images[p] for p in passes])
    encoder_states = torch.cat([pass_texts[p].expand(n, -1, -1) for p in passes])
    step_kwargs = _step_kwargs(scheduler, gens)
    channels_last = c.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    # 3. Denoising loop.
    for i, t in enumerate(timesteps):
        scaled = scheduler.scale_model_input(torch.cat([latents] * len(passes)), t)
        unet_in = torch.cat([scaled, cond_images], dim=1).to(dtype)
        if channels_last:
            unet_in = unet_in.contiguous(memory_format=torch.channels_last)
        noise = c.unet(unet_in, t, encoder_hidden_states=encoder_states, return_dict=False)[0].float()
        predictions = dict(zip(passes, noise.chunk(len(passes))))
        noise_pred = guidance.combine(predictions, s_t, s_i)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        if latent_mask is not None:
            # 4. Keep the unmasked latent on the original's trajectory, so the edit meets its surroundings.
            anchor = original
            if i < len(timesteps) - 1:
                anchor = scheduler.add_noise(original, initial_noise, timesteps[i + 1 : i + 2].repeat(n))
            latents = (1.0 - latent_mask) * anchor + latent_mask * latents
        if on_step is not None:
            on_step(latents)
    return latents


_run_batch = denoise  # edit() takes a `denoise` argument (ComfyUI's name for edit strength) that hides this


def edit(
    model: CachedModel,
    cond: Conditioning,
    images: torch.Tensor,
    plan: SeedPlan | Sequence[PlanItem],
    steps: int = 20,
    text_guidance: float = 7.5,
    image_guidance: float = 1.5,
    scheduler: str = DEFAULT_SCHEDULER,
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
) -> EditResult:
    """Edit every image of the IMAGE batch ``images`` with every item of ``plan``.

    Outputs are ordered image-major: all plan items of image 0, then of image 1, ... Items are run in batches
    of up to ``max_batch`` that share guidance scales; a batch's composition does not change any item.

    Size: each picture is edited at about ``working_resolution``² pixels (None/0: the model family's, 512²
    for SD1.5), aspect kept, longer side at most ``max_side``; smaller pictures at their own size unless
    ``upscale_small``. The output has the input's exact size; with ``restore_detail`` the original's fine
    detail is put back where a downscaled edit left the picture alone.

    Mask (ComfyUI MASK, 1 = edit; see :mod:`.masks` for size and batch rules): outside it the output is the
    input bit for bit; ``feather`` px fade the edit in inside its border. An empty mask returns the input
    without sampling; a full mask is the same as none. ``crop_to_mask`` edits a padded box around the mask at
    the working resolution (``crop_padding`` px of context, None: automatic) and pastes it back.

    ``denoise`` (0, 1]: edit strength. 1 is the plain sampler (pure-noise start); lower values start from the
    image's own latent, noised, and run the last ``steps * denoise`` steps, so small changes stay small.
    """
    check_conditioning(model, cond)
    items = list(plan.items if isinstance(plan, SeedPlan) else plan)
    if not items:
        raise InputError("the seed plan is empty")
    resolved = [
        (it.text_guidance if it.text_guidance is not None else text_guidance,
         it.image_guidance if it.image_guidance is not None else image_guidance)
        for it in items
    ]
    for s_t, s_i in resolved:
        _check_settings(steps, s_t, s_i)
    strength = check_strength(denoise)
    feather = check_feather(feather)
    resolution.check_resolution(working_resolution, max_side)
    make_scheduler(scheduler, model.components.scheduler_config)  # fail on a bad name before any work
    c = model.components
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        resolution.check_input_size(images.shape[1], images.shape[2])  # before to_rgb copies a huge picture
    images = to_rgb(images)
    batch, height, width = images.shape[:3]
    masks = prepare_masks(mask, batch, height, width)
    if masks is not None:
        masks = masks.to(images.device)

    regions: list[Region] = [
        make_region(
            images[b], None if masks is None else masks[b], c.family, c.vae_scale_factor,
            resolution=working_resolution, max_side=max_side, upscale=upscale_small, feather=feather,
            crop_to_mask=crop_to_mask, crop_padding=crop_padding, restore=restore_detail,
        )
        for b in range(batch)
    ]
    for b, region in enumerate(regions):
        if region.skip:
            log.info("ip2p: image %d: the mask is empty; returning the image unchanged without sampling", b)
        elif region.size.resized or not region.whole:
            log.info("ip2p: image %d: editing box %s at %s", b, region.box, region.size.describe())

    largest = max((r.size.latent[0] * r.size.latent[1] for r in regions), default=0)
    passes = max(len(guidance.required_passes(s_t, s_i)) for s_t, s_i in resolved)
    model.ensure_loaded("unet", "vae", memory_required=unet_activation_bytes(model, largest, passes * max(1, max_batch)))
    image_latents = [encode_images(model, r.low)[0] for r in regions]
    jobs = [(b, k) for b in range(batch) for k in range(len(items))]
    # Group by guidance scales (they decide which passes run) and latent size (crops differ), keeping output
    # order for the result; images with an empty mask are not sampled at all.
    groups: dict[tuple, list[int]] = {}
    for j, (b, k) in enumerate(jobs):
        if not regions[b].skip:
            groups.setdefault((resolved[k], tuple(image_latents[b].shape)), []).append(j)
    step = max(1, max_batch)
    batches = [(key[0], idx[i : i + step]) for key, idx in groups.items() for i in range(0, len(idx), step)]

    run_steps = strength_steps(steps, strength)
    total = len(batches) * run_steps
    done = 0
    results: dict[int, torch.Tensor] = {}
    for (s_t, s_i), idx in batches:
        def on_step(latents: torch.Tensor) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, latents)

        batch_regions = [regions[jobs[j][0]] for j in idx]
        lmask = None
        if any(r.latent_mask is not None for r in batch_regions):
            free = [torch.ones(1, 1, *r.size.latent) if r.latent_mask is None else r.latent_mask for r in batch_regions]
            lmask = torch.cat(free)
        out = _run_batch(
            model,
            cond,
            torch.cat([image_latents[jobs[j][0]] for j in idx]),
            [items[jobs[j][1]].seed for j in idx],
            s_t,
            s_i,
            steps,
            scheduler,
            on_step,
            strength=strength,
            latent_mask=lmask,
        )
        for j, lat in zip(idx, out):
            results[j] = lat.float().cpu()

    out_images, out_latents = [], []
    for j, (b, _) in enumerate(jobs):
        region = regions[b]
        if region.skip:
            out_images.append(region.image)
            out_latents.append(image_latents[b][0])
            continue
        unscaled = results[j] / c.scaling_factor
        low = decode_latents(model, unscaled[None], region.size.content)
        out_images.append(region.finish(low))
        out_latents.append(unscaled)
    if any(not r.whole for r in regions):
        # Crops have no common latent shape: hand out the final pictures at the whole picture's working size.
        whole = resolution.working_size(
            height, width, c.family, working_resolution, max_side, upscale_small, c.vae_scale_factor
        ).content
        out_latents = [encode_images(model, resolution.resize_image(im[None], whole))[0][0] for im in out_images]
    return EditResult(torch.stack(out_images), torch.stack(out_latents), [(b, items[k]) for b, k in jobs])
