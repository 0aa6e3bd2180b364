"""Live previews for the sampler, made by ComfyUI's own ``latent_preview`` machinery.

The core reports, after every step, its current estimate of the clean latents, diffusers-scaled (the VAE
latents times the scaling factor). That is the space ComfyUI's samplers preview in (``latent_format.process_in``
of SD1.5/SDXL multiplies by the same factor), so the estimate goes to ``latent_preview.get_previewer`` as it is:
latent-to-RGB factors of the family's latent format, or TAESD when the user picked it and has the decoder in
``models/vae_approx``. The user's preview method (``--preview-method``, or the frontend's per-prompt setting,
which ComfyUI applies before the run) is respected: with "none" no preview is made at all.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import comfy.latent_formats
import latent_preview
import torch

log = logging.getLogger(__name__)

# A family names its ComfyUI latent format (Family.latent_format); these are the ones our families use.
LATENT_FORMATS: dict[str, Callable[[], Any]] = {
    "SD15": comfy.latent_formats.SD15,
    "SDXL": comfy.latent_formats.SDXL,
}

Preview = Callable[[torch.Tensor], Any]
"""preview(latents) -> what ``ProgressBar.update_absolute`` takes as its preview (or None)."""


def make_preview(latent_format: str, latent_channels: int, device: torch.device) -> Preview | None:
    """A function turning the core's clean-latent estimate ``[n, c, h, w]`` into a ProgressBar preview.

    None when previews are off (the user's preview method), when the latent format is unknown, or when the
    model's latents do not have the format's channel count (a preview is a nicety: never fail a run for it).
    """
    make_format = LATENT_FORMATS.get(latent_format)
    if make_format is None:
        log.warning("ip2p: no live preview for latent format %r (known: %s)", latent_format, ", ".join(LATENT_FORMATS))
        return None
    fmt = make_format()
    if latent_channels != fmt.latent_channels:
        log.warning("ip2p: no live preview: the model's latents have %d channels, the %s format %d",
                    latent_channels, latent_format, fmt.latent_channels)
        return None
    previewer = latent_preview.get_previewer(device, fmt)
    if previewer is None:  # previews are off
        return None

    def preview(latents: torch.Tensor):
        # Only the first picture of the batch is shown, as ComfyUI's samplers do. fp32: TAESD runs in fp32 and
        # the UNet's bf16/fp16 estimate would not feed it.
        x0 = latents[:1].detach().to(device=device, dtype=torch.float32)
        return previewer.decode_latent_to_preview_image("JPEG", x0)

    return preview
