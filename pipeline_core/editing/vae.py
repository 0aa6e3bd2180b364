"""Pictures in and out of the model's latent space: VAE encode (the image condition) and decode (the result).

Latents here are *unscaled* VAE latents (ComfyUI's LATENT convention); the sampler scales its own working latents
by the VAE's scaling factor, and the family decides how the image condition is scaled (:mod:`..models.families`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

from ..models.cache import CachedModel
from . import resolution
from .images import comfy_to_vae, vae_to_comfy

log = logging.getLogger(__name__)


@contextmanager
def vae_tiling(vae, pixels: int):
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
    with vae_tiling(c.vae, x.shape[-2] * x.shape[-1]):
        latents = [c.vae.encode(x[i : i + 1].to(c.device, c.precision.vae)).latent_dist.mode() for i in range(len(x))]
    return torch.cat(latents).float(), size


@torch.inference_mode()
def decode_latents(model: CachedModel, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Unscaled latents (ComfyUI convention) -> IMAGE cropped to ``size``."""
    c = model.components
    model.ensure_loaded("vae")
    pixels = latents.shape[-2] * latents.shape[-1] * c.vae_scale_factor**2
    with vae_tiling(c.vae, pixels):
        out = [c.vae.decode(z.to(c.device, c.precision.vae)).sample.float().cpu() for z in latents.split(1)]
    return vae_to_comfy(torch.cat(out), size)
