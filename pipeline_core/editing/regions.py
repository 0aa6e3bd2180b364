"""What part of each input picture the sampler edits, at which size, and how the result is put back.

A :class:`Region` ties the resolution policy (:mod:`.resolution`) to the mask (:mod:`.masks`) for one input
image: the box it edits (the whole picture, or a padded box around the mask in crop-to-mask mode), the
working-resolution picture the model sees, the latent mask that keeps unmasked latents on the original's
trajectory, and :meth:`Region.finish`, which turns the model's low-resolution output into the final picture
at the input's exact size: resize back, restore detail, blend by the feathered mask, paste into the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import masks as masks_mod
from .resolution import WorkingSize, resize_image, restore_detail, working_size


@dataclass
class Region:
    image: torch.Tensor  # the whole input picture [H,W,3], 0..1
    box: tuple[int, int, int, int]  # (top, left, bottom, right) of the part that is edited
    size: WorkingSize  # of the box
    low: torch.Tensor  # [1,h,w,3]: the box at working resolution, what the model sees
    alpha: torch.Tensor | None  # [box H, box W] blend weight of the edit; None: the edit replaces the box
    latent_mask: torch.Tensor | None  # [1,1,h/8,w/8], 1 = free to change; None: everywhere
    restore: bool = True  # put the original's fine detail back where the edit left it alone
    skip: bool = False  # empty mask: the output is the input, nothing is sampled

    @property
    def whole(self) -> bool:
        return self.box == (0, 0, *self.image.shape[:2])

    def finish(self, low_edit: torch.Tensor) -> torch.Tensor:
        """The model's ``[1,h,w,3]`` output -> the final ``[H,W,3]`` picture (see the module docstring)."""
        if self.skip:
            return self.image
        top, left, bottom, right = self.box
        original = self.image[top:bottom, left:right]
        out = low_edit
        if self.size.resized:
            if self.restore and self.size.downscaled:
                nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731
                out = restore_detail(nchw(original[None]), nchw(self.low), nchw(low_edit)).permute(0, 2, 3, 1)
            else:
                out = resize_image(low_edit, (bottom - top, right - left))
        out = out[0]
        if self.alpha is not None:
            # lerp is exact at both ends: weight 0 returns the input bit for bit, weight 1 the edit.
            out = torch.lerp(original, out, self.alpha[..., None])
        if self.whole:
            return out.contiguous()
        pasted = self.image.clone()
        pasted[top:bottom, left:right] = out
        return pasted


def make_region(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    native: int,
    multiple: int,
    *,
    resolution: int | None = None,
    max_side: int | None = None,
    upscale: bool = False,
    feather: int = 0,
    crop_to_mask: bool = False,
    crop_padding: int | None = None,
    restore: bool = True,
) -> Region:
    """The region of one ``[H,W,3]`` picture to edit under an optional ``[H,W]`` mask (already at its size)."""
    h, w = image.shape[:2]
    box = (0, 0, h, w)
    alpha = None
    skip = False
    if mask is not None and bool((mask >= 1.0).all()):
        mask = None  # a full mask is no mask: same code path, same result
    if mask is not None:
        if not bool((mask > 0).any()):
            skip = True
        else:
            alpha = masks_mod.feather(mask, feather)
            if crop_to_mask:
                box = masks_mod.padded_box(mask, crop_padding, feather)
    top, left, bottom, right = box
    # A crop is edited at the model's working resolution even when that means upscaling it: a small region
    # of a large picture then gets the model's full detail. A box that is the whole picture is not a crop.
    cropped = box != (0, 0, h, w)
    size = working_size(bottom - top, right - left, native, resolution, max_side, upscale or cropped, multiple)
    low = resize_image(image[None, top:bottom, left:right], size.content)
    region_alpha = None if alpha is None else alpha[top:bottom, left:right]
    lmask = None if region_alpha is None else masks_mod.latent_mask(region_alpha, size.content, size.frame, multiple)
    return Region(image, box, size, low, region_alpha, lmask, restore, skip)
