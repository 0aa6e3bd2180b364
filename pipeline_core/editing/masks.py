"""Masks for local edits: ComfyUI's MASK convention in, a feathered blend weight and a latent mask out.

A MASK is ``[B,H,W]`` (or ``[H,W]``) float, 1 = edit here, 0 = keep. Rules, as the sampler's tooltip states:

- any size: a mask of another size than the image is resized to it (bilinear, antialiased when shrinking);
- batch: one mask is used for every image; otherwise there must be one mask per image;
- "outside the mask" means mask value 0 after resizing: there the output is the input, bit for bit;
- values between 0 and 1 blend the edit in proportionally; ``feather`` px soften the inside of the border.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import limits
from ..errors import InputError
from .images import to_unit_float

MAX_FEATHER = int(limits.FEATHER.high)


def prepare_masks(mask: torch.Tensor | None, batch: int, height: int, width: int) -> torch.Tensor | None:
    """``[batch, height, width]`` float masks in 0..1 for an image batch, or None for "edit everywhere"."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise InputError(f"expected a MASK tensor [batch, height, width], got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask[None]
    elif mask.ndim == 4 and mask.shape[1] == 1:  # [B,1,H,W], as some nodes hand masks around
        mask = mask[:, 0]
    if mask.ndim != 3 or 0 in mask.shape:
        raise InputError(f"expected a MASK [batch, height, width] or [height, width], got shape {tuple(mask.shape)}")
    mask = to_unit_float(mask, "mask")  # 8-bit masks (0..255) too, not only 0..1 floats
    if mask.shape[0] not in (1, batch):
        raise InputError(
            f"the mask batch has {mask.shape[0]} masks but the image batch has {batch} images; give one mask "
            "(used for every image) or one mask per image"
        )
    if tuple(mask.shape[1:]) != (height, width):
        shrink = height < mask.shape[1] or width < mask.shape[2]
        mask = F.interpolate(mask[:, None], (height, width), mode="bilinear", align_corners=False, antialias=shrink)
        mask = mask[:, 0].clamp(0.0, 1.0)
    return mask.expand(batch, height, width)


def check_feather(feather: int) -> int:
    if isinstance(feather, bool) or not isinstance(feather, (int, float)) or feather != feather:
        raise InputError(f"feather must be a whole number of pixels, got {feather!r}")
    if not 0 <= feather <= MAX_FEATHER:
        raise InputError(f"feather must be between 0 and {MAX_FEATHER} px, got {feather}")
    return int(feather)


def box_blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    """``[H,W]`` mean over a (2r+1)^2 window, edges replicated; cost independent of the radius."""
    if radius <= 0:
        return x
    k = 2 * radius + 1
    y = F.pad(x.double()[None, None], (radius,) * 4, mode="replicate")[0, 0]
    for dim in (0, 1):
        c = torch.cumsum(F.pad(y, (1, 0) if dim == 1 else (0, 0, 1, 0)), dim=dim)
        y = (c.narrow(dim, k, c.shape[dim] - k) - c.narrow(dim, 0, c.shape[dim] - k)) / k
    return y.to(x.dtype)


def feather(mask: torch.Tensor, width: int) -> torch.Tensor:
    """The blend weight of the edit: ``mask`` faded to 0 over ``width`` px inside its border.

    The fade runs inward so the weight is exactly 0 wherever the mask is 0 (the output keeps the input there,
    bit for bit). On a straight border the weight rises linearly from the first masked pixel to 1 at
    ``width`` px inside. The image's own edges are not borders: a mask touching them is not faded there.
    """
    if width <= 0:
        return mask
    support = (mask > 0).to(mask.dtype)
    ramp = (2.0 * box_blur(support, width) - 1.0).clamp(0.0, 1.0)
    return mask * ramp


def latent_mask(alpha: torch.Tensor, content: tuple[int, int], frame: tuple[int, int], factor: int) -> torch.Tensor:
    """``[1,1,h/f,w/f]`` latent mask (1 = free to change) for a ``[H,W]`` blend weight.

    Each latent cell takes the largest weight of the pixels it covers: wherever the final blend shows the
    edit, the latent was free to make it, while cells the blend does not show stay on the original's
    trajectory. The padding of the frame repeats the border, as the padded picture does.
    """
    a = alpha[None, None].float()
    if tuple(a.shape[-2:]) != tuple(content):
        shrink = content[0] < a.shape[-2] or content[1] < a.shape[-1]
        a = F.interpolate(a, size=content, mode="bilinear", align_corners=False, antialias=shrink).clamp(0.0, 1.0)
    pad_h, pad_w = frame[0] - content[0], frame[1] - content[1]
    if pad_h or pad_w:
        a = F.pad(a, (0, pad_w, 0, pad_h), mode="replicate")
    return F.max_pool2d(a, factor, stride=factor)


def padded_box(mask: torch.Tensor, padding: int | None = None, feather_px: int = 0) -> tuple[int, int, int, int] | None:
    """``(top, left, bottom, right)`` of the mask's non-zero pixels with context around, inside the image.

    ``padding`` None picks enough context for the model to see what the region is part of: a quarter of the
    region's longer side, at least 32 px and at least the feather width.
    """
    rows = torch.nonzero(mask.amax(dim=1) > 0).flatten()
    cols = torch.nonzero(mask.amax(dim=0) > 0).flatten()
    if len(rows) == 0:
        return None
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    if padding is None:
        padding = max(32, feather_px, max(bottom - top, right - left) // 4)
    h, w = mask.shape
    return max(0, top - padding), max(0, left - padding), min(h, bottom + padding), min(w, right + padding)
