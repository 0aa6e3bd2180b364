"""The sampling loop for one batch: scheduler steps over a :class:`~.denoiser.Denoiser`.

It follows diffusers' IP2P pipelines step for step (same scheduler calls, same noise draws), so with the same
seed and inputs it gives the same picture. Beyond them: per-item generators (an item is reproducible from its
own seed inside any batch), edit strength (``strength`` < 1 starts from the image's own noised latent, as
img2img), a latent mask that keeps unmasked latents on the original's trajectory, and a callback after every
step for progress, live previews and Cancel.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from diffusers.utils.torch_utils import randn_tensor

from .denoiser import Denoiser
from .seeds import generators

StepCallback = Callable[[torch.Tensor, torch.Tensor], None]
"""on_step(latents, denoised): after every step, the new latents and the model's current estimate of the clean
latents (diffusers-scaled, what a live preview shows; the latents themselves where the scheduler gives none)."""


def strength_steps(steps: int, strength: float) -> int:
    """Steps actually run at edit strength ``strength``: the last ``steps * strength`` of the schedule (>= 1)."""
    if strength >= 1.0:
        return steps
    # As diffusers' img2img get_timesteps (floor), but never zero steps: a tiny strength still runs the last.
    return max(1, min(int(steps * strength), steps))


def _step_kwargs(scheduler, gens: list[torch.Generator]) -> dict:
    # As diffusers' prepare_extra_step_kwargs: only ancestral/SDE schedulers take a generator, DDIM an eta.
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "generator" in params:
        kwargs["generator"] = gens
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


@torch.inference_mode()
def sample(
    denoiser: Denoiser,
    scheduler,
    seeds: list[int],
    latent_shape: tuple[int, int, int],
    steps: int,
    device: torch.device,
    *,
    strength: float = 1.0,
    original: torch.Tensor | None = None,
    latent_mask: torch.Tensor | None = None,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Run ``steps`` (times ``strength``) scheduler steps; returns the final diffusers-scaled latents ``[n,...]``.

    ``original``: the pictures' own latents, scaled as the sampler's (needed for ``strength`` < 1 and masks).
    ``latent_mask`` ``[n,1,h,w]`` (1 = free): after every step the latent outside it is replaced by the original
    noised to the next timestep, and by the clean original after the last step, as diffusers' inpainting
    pipeline does for 4-channel UNets.
    """
    n = len(seeds)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    schedule_length = len(timesteps)
    first = 0  # index of the first step run in the whole schedule
    gens = generators(seeds)

    # 1. Initial noise, one generator per item, drawn on the CPU as diffusers' randn_tensor does.
    initial_noise = randn_tensor((n, *latent_shape), generator=gens, device=device, dtype=torch.float32)
    if strength < 1.0:
        # As diffusers' img2img: skip the first part of the schedule and noise the image's latent to where the
        # rest begins; begin_index lets schedulers that look timesteps up find the right sigma.
        t_start = steps - strength_steps(steps, strength)
        first = t_start * scheduler.order
        timesteps = timesteps[first:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        latents = scheduler.add_noise(original, initial_noise, timesteps[:1].repeat(n))
    else:
        latents = initial_noise * scheduler.init_noise_sigma
    if latent_mask is not None:
        latent_mask = latent_mask.to(device, torch.float32)
    step_kwargs = _step_kwargs(scheduler, gens)

    # 2. Denoising loop.
    for i, t in enumerate(timesteps):
        # The step's place in the whole schedule (not in the part denoise runs): ControlNet start/end read it.
        prediction = denoiser(scheduler.scale_model_input(latents, t), t, (first + i) / schedule_length)
        out = scheduler.step(prediction, t, latents, **step_kwargs, return_dict=True)
        latents = out.prev_sample
        denoised = getattr(out, "pred_original_sample", None)
        if latent_mask is not None:
            # 3. Keep the unmasked latent on the original's trajectory, so the edit meets its surroundings.
            anchor = original
            if i < len(timesteps) - 1:
                anchor = scheduler.add_noise(original, initial_noise, timesteps[i + 1 : i + 2].repeat(n))
            latents = (1.0 - latent_mask) * anchor + latent_mask * latents
            if denoised is not None:
                denoised = (1.0 - latent_mask) * original + latent_mask * denoised
        if on_step is not None:
            on_step(latents, latents if denoised is None else denoised)
    return latents
