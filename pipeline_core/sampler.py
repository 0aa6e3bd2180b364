"""The dual-guidance denoising loop, owned here rather than delegated to a diffusers pipeline ``__call__``.

It follows ``StableDiffusionInstructPix2PixPipeline`` step for step (same scheduler calls, same batch order,
same noise draws), so with the same seed and inputs it produces the same image; the differences are what the
pipeline gets wrong for users: per-item generators (an item is reproducible from its own seed inside any
batch), image guidance below 1, passes skipped where the formula does not need them, output at the input's
exact size, progress and cancel on every step.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from . import guidance
from .cache import CachedModel
from .conditioning import Conditioning, check_conditioning
from .errors import InputError
from .images import comfy_to_vae, vae_to_comfy
from .schedulers import DEFAULT_SCHEDULER, make_scheduler
from .seeds import PlanItem, SeedPlan, generators

log = logging.getLogger(__name__)

Progress = Callable[[int, int, "torch.Tensor | None"], None]
"""progress(done, total, latents): called after every step; may raise to cancel (ComfyUI's Cancel does)."""

MAX_STEPS = 500


@dataclass
class EditResult:
    images: torch.Tensor  # IMAGE [N, H, W, 3] at the input's size, 0..1, CPU float32
    latents: torch.Tensor  # unscaled VAE latents [N, 4, H'/8, W'/8] (ComfyUI LATENT convention), CPU float32
    items: list[tuple[int, PlanItem]]  # (input image index, plan item) for each output, in output order


@torch.inference_mode()
def encode_images(model: CachedModel, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image latents as the paper conditions on them: ``latent_dist.mode()``, not scaled."""
    c = model.components
    x, size = comfy_to_vae(images, c.vae_scale_factor)
    model.ensure_loaded("vae")
    latents = [c.vae.encode(x[i : i + 1].to(c.device, c.precision.vae)).latent_dist.mode() for i in range(len(x))]
    return torch.cat(latents).float(), size


@torch.inference_mode()
def decode_latents(model: CachedModel, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Unscaled latents (ComfyUI convention) -> IMAGE cropped to ``size``."""
    c = model.components
    model.ensure_loaded("vae")
    out = [c.vae.decode(latents[i : i + 1].to(c.device, c.precision.vae)).sample.float().cpu() for i in range(len(latents))]
    return vae_to_comfy(torch.cat(out), size)


def _step_kwargs(scheduler, gens: list[torch.Generator]) -> dict:
    # As diffusers' prepare_extra_step_kwargs: only ancestral/SDE schedulers take a generator, DDIM an eta.
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "generator" in params:
        kwargs["generator"] = gens
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


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
) -> torch.Tensor:
    """Run the sampler for one batch of items sharing guidance scales; returns diffusers-scaled latents.

    ``image_latents[k]`` is item k's image condition and ``seeds[k]`` its noise.
    """
    c = model.components
    n = len(seeds)
    device, dtype = c.device, c.precision.unet
    scheduler = make_scheduler(scheduler_name, c.scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    gens = generators(seeds)

    # 1. Initial noise, one generator per item, drawn on the CPU as diffusers' randn_tensor does.
    shape = (n, c.unet.config.out_channels, *image_latents.shape[-2:])
    latents = randn_tensor(shape, generator=gens, device=device, dtype=torch.float32) * scheduler.init_noise_sigma

    # 2. The passes this pair of scales needs, batched in the paper's order (text, image, uncond).
    passes = guidance.required_passes(s_t, s_i)
    img = image_latents.to(device, torch.float32)
    text_emb = cond.instruction_embeds.to(device, dtype)
    neg_emb = cond.negative_embeds.to(device, dtype)
    pass_images = {guidance.TEXT: img, guidance.IMAGE: img, guidance.UNCOND: torch.zeros_like(img)}
    pass_texts = {guidance.TEXT: text_emb, guidance.IMAGE: neg_emb, guidance.UNCOND: neg_emb}
    cond_images = torch.cat([pass_images[p] for p in passes])
    encoder_states = torch.cat([pass_texts[p].expand(n, -1, -1) for p in passes])
    step_kwargs = _step_kwargs(scheduler, gens)
    channels_last = c.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    # 3. Denoising loop.
    for t in scheduler.timesteps:
        scaled = scheduler.scale_model_input(torch.cat([latents] * len(passes)), t)
        unet_in = torch.cat([scaled, cond_images], dim=1).to(dtype)
        if channels_last:
            unet_in = unet_in.contiguous(memory_format=torch.channels_last)
        noise = c.unet(unet_in, t, encoder_hidden_states=encoder_states, return_dict=False)[0].float()
        predictions = dict(zip(passes, noise.chunk(len(passes))))
        noise_pred = guidance.combine(predictions, s_t, s_i)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
        if on_step is not None:
            on_step(latents)
    return latents


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
) -> EditResult:
    """Edit every image of the IMAGE batch ``images`` with every item of ``plan``.

    Outputs are ordered image-major: all plan items of image 0, then of image 1, ... Items are run in batches
    of up to ``max_batch`` that share guidance scales; a batch's composition does not change any item.
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
    make_scheduler(scheduler, model.components.scheduler_config)  # fail on a bad name before any work

    image_latents, size = encode_images(model, images)
    jobs = [(b, k) for b in range(len(image_latents)) for k in range(len(items))]
    # Group by guidance scales (they decide which passes run), keeping output order for the result.
    groups: dict[tuple[float, float], list[int]] = {}
    for j, (_, k) in enumerate(jobs):
        groups.setdefault(resolved[k], []).append(j)
    batches = [(scales, idx[i : i + max_batch]) for scales, idx in groups.items() for i in range(0, len(idx), max(1, max_batch))]

    total = len(batches) * steps
    done = 0
    results: dict[int, torch.Tensor] = {}
    model.ensure_loaded("unet", "vae")
    for (s_t, s_i), idx in batches:
        def on_step(latents: torch.Tensor) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, latents)

        out = denoise(
            model,
            cond,
            image_latents[[jobs[j][0] for j in idx]],
            [items[jobs[j][1]].seed for j in idx],
            s_t,
            s_i,
            steps,
            scheduler,
            on_step,
        )
        for j, lat in zip(idx, out):
            results[j] = lat.float().cpu()

    scaled = torch.stack([results[j] for j in range(len(jobs))])
    unscaled = scaled / model.components.scaling_factor
    out_images = decode_latents(model, unscaled, size)
    return EditResult(out_images, unscaled, [(b, items[k]) for b, k in jobs])
