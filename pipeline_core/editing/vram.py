"""Low-VRAM mode: an edit that fits a small GPU, for more time.

What it changes, each a known way to trade time for device memory:

- One model part on the device at a time: the text encoders leave it before sampling, the VAE while the UNet
  runs, the UNet while the VAE decodes (diffusers' model CPU offload). Under ComfyUI its memory manager moves
  them: each load asks it for the room it needs, and it evicts what it must (our modules are its models).
- The UNet runs one batch row at a time (every guidance pass of every item apart) instead of passes x items at
  once, so its activations are one row's.
- The VAE encodes and decodes frames larger than its tile in tiles, as ComfyUI's own low-VRAM path does.

Attention is not sliced: PyTorch's SDPA (diffusers' default attention) runs memory-efficient or flash kernels on
CUDA, whose memory grows with the number of tokens, not with its square; diffusers' attention slicing exists for
the classic attention.

The picture is the normal mode's within float rounding where the frame fits one VAE tile (rows apart add up the
same sums, up to the kernels' choice); larger frames are decoded in tiles (each tile normalises on its own), as
normal mode does above ``resolution.VAE_TILE_AREA``.

``auto`` picks low on an accelerator when what a normal edit adds to the device (the UNet and VAE where they are
not there yet, a UNet call's activations) is more than the free memory the residency reports (under ComfyUI its
own count; ComfyUI started with ``--lowvram`` or ``--novram`` always gets low). On a CPU it never does: there
the RAM is ``--memory``'s concern (:mod:`..models.releasing`).
"""

from __future__ import annotations

import logging

import torch

from ..models.cache import CachedModel

log = logging.getLogger(__name__)

GB = 1024**3


def unet_activation_bytes(model: CachedModel, latent_area: int, batch: int) -> int:
    """Rough peak activation memory of one UNet call, for ComfyUI's memory manager to make room.

    Same heuristic ComfyUI uses for its own SD UNets (``BaseModel.memory_required``: 0.6/50 MiB per latent
    pixel and byte of dtype), so our runs and native ones compete for memory on the same terms.
    """
    dtype_bytes = torch.finfo(model.components.precision.unet).bits // 8
    return int(batch * latent_area * dtype_bytes * 0.6 / 50 * 1024 * 1024)


def bytes_to_bring(model: CachedModel, names: tuple[str, ...]) -> int:
    """Bytes of the named modules' weights that are not on the model's device yet (released ones included)."""
    c = model.components
    modules = c.modules()
    return sum(p.numel() * p.element_size() for name in names if name in modules
               for p in modules[name].parameters() if p.device != c.device)


def use_low_vram(model: CachedModel, mode: str, latent_area: int, rows: int) -> bool:
    """Whether an edit runs in low-VRAM mode: ``mode`` ``low``/``normal`` as asked, ``auto`` as the module says."""
    if mode != "auto":
        return mode == "low"
    device = model.components.device
    if device.type == "cpu":
        return False
    if model.residency.low_vram_forced():
        log.info("ip2p: low-VRAM mode (ComfyUI runs in low-VRAM mode)")
        return True
    free = model.residency.free_memory(device)
    if free is None:
        return False
    needed = bytes_to_bring(model, ("unet", "vae")) + unet_activation_bytes(model, latent_area, rows)
    if needed <= free:
        return False
    log.info("ip2p: low-VRAM mode: %.2f GB free on %s, a normal edit would need about %.2f GB more",
             free / GB, device, needed / GB)
    return True
