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
def vae_tiling(vae, pixels: int, force: bool = False):
    """Tile the VAE for frames above ``resolution.VAE_TILE_AREA`` pixels (or if ``force``), restoring its setting
    after.

    Tiled results differ slightly from whole-frame ones (each tile normalises on its own), so small frames,
    which fit in memory anyway, are never tiled.
    """
    previous = vae.use_tiling
    vae.use_tiling = previous or force or pixels > resolution.VAE_TILE_AREA
    # The VAE tiles only frames larger than its tile: a forced smaller one runs whole, so nothing to say.
    if vae.use_tiling and not previous and pixels > vae.tile_sample_min_size**2:
        log.info("ip2p: %d-pixel frame: VAE in tiles of %d px", pixels, vae.tile_sample_min_size)
    try:
        yield
    finally:
        vae.use_tiling = previous


def tiled_if_out_of_memory(vae, pixels: int, run, what: str, force_tiles: bool = False):
    """``run()`` with the VAE tiled by size; if the device runs out of memory untiled, once more in tiles.

    A GPU with little free memory (an 8 GB card at 1024 px, or one shared with other models) fails the
    whole-frame VAE pass that tiles would fit; as ComfyUI's own VAE nodes do, the pass is retried tiled (a
    slightly different picture, which is said) rather than the run failing after all its sampling.
    """
    # force_tiles: low-VRAM mode, in tiles from the start.
    tiled = force_tiles or vae.use_tiling or pixels > resolution.VAE_TILE_AREA
    try:
        with vae_tiling(vae, pixels, force_tiles):
            return run()
    except torch.OutOfMemoryError:
        if tiled:
            raise  # already in tiles: nothing smaller to try
    log.warning("ip2p: out of device memory in the VAE %s of a %d-pixel frame; retrying in tiles", what, pixels)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what the failed pass had allocated
    with vae_tiling(vae, pixels, force=True):
        return run()


@torch.inference_mode()
def encode_images(model: CachedModel, images: torch.Tensor,
                  tiled: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """Image latents as the paper conditions on them: ``latent_dist.mode()``, not scaled. ``tiled``: frames
    larger than the VAE's tile in tiles whatever their size (low-VRAM mode)."""
    c = model.components
    x, size = comfy_to_vae(images, c.vae_scale_factor)
    model.ensure_loaded("vae")

    def run():
        return [c.vae.encode(x[i : i + 1].to(c.device, c.precision.vae)).latent_dist.mode() for i in range(len(x))]

    latents = tiled_if_out_of_memory(c.vae, x.shape[-2] * x.shape[-1], run, "encode", tiled)
    return torch.cat(latents).float(), size


@torch.inference_mode()
def decode_latents(model: CachedModel, latents: torch.Tensor, size: tuple[int, int],
                   tiled: bool = False) -> torch.Tensor:
    """Unscaled latents (ComfyUI convention) -> IMAGE cropped to ``size``; ``tiled`` as :func:`encode_images`."""
    c = model.components
    model.ensure_loaded("vae")
    pixels = latents.shape[-2] * latents.shape[-1] * c.vae_scale_factor**2

    def run():
        return [c.vae.decode(z.to(c.device, c.precision.vae)).sample.float().cpu() for z in latents.split(1)]

    out = tiled_if_out_of_memory(c.vae, pixels, run, "decode", tiled)
    return vae_to_comfy(torch.cat(out), size)
