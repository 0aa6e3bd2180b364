"""The resolution policy: at what size the model edits a picture, and how the result gets back to the input's size.

Any height and width come in; the model works at a size suited to its family (SD1.5 was trained at 512 px,
SDXL at 1024 px: far from that area it repeats subjects or loses coherence, and it gets slow), the aspect is
kept, and the output has exactly the input's size. The anchors get this wrong (shared/REFERENCE.md §3): the
original crops to 512 px, diffusers' SDXL pipeline squashes to a square, ComfyUI's node crops to a multiple
of 8.

The working picture (``content``) is the input scaled by one factor, so the aspect is kept to the rounding
of a pixel; the ``frame`` the VAE sees pads it on the bottom/right to a multiple of the VAE factor (see
:mod:`.images`), and the padding is cut off again after decoding. Small pictures are not upscaled unless asked:
padding is all they need.

A picture edited below its own size loses the fine detail that resizing removes. :func:`restore_detail` puts
the original's high frequencies back where the edit left the picture alone; ``benchmarks/detail_roundtrip.py``
measures it against plain resizing.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import limits
from ..errors import InputError

log = logging.getLogger(__name__)

# Beyond the working-resolution limit the UNet needs tens of GB and minutes per step even on a large GPU; a typo
# (40960 for 4096) should get a message, not an out-of-memory error after the model has loaded.
MIN_WORKING_RESOLUTION = int(limits.WORKING_RESOLUTION.low)
MAX_WORKING_RESOLUTION = int(limits.WORKING_RESOLUTION.high)
MAX_WORKING_SIDE = limits.MAX_WORKING_SIDE
MAX_INPUT_PIXELS = limits.MAX_INPUT_PIXELS
# Frames with more pixels than this are encoded and decoded by the VAE in overlapping tiles. The SD VAE
# decoder's full-resolution activations take ~1.5 GB per megapixel in fp32; tiling keeps it at the tile size.
# Read at call time, so it can be lowered (tests do) without touching code.
VAE_TILE_AREA = 1024 * 1024

# Detail restoration thresholds on the local mean absolute change between the low-resolution edit and the
# low-resolution input (0..1 scale). Below CHANGE_LOW a pixel counts as untouched (the VAE's own
# reconstruction error of an SD VAE is mostly 0.01-0.04 there), above CHANGE_HIGH as edited. Set with
# benchmarks/detail_roundtrip.py.
CHANGE_LOW = 0.05
CHANGE_HIGH = 0.12
CHANGE_RADIUS = 2  # px at working resolution: the change map is averaged over a 5 x 5 window


@dataclass(frozen=True)
class WorkingSize:
    """How one picture (or crop) of ``height`` x ``width`` is edited."""

    height: int
    width: int
    content_height: int  # the picture scaled to the working resolution
    content_width: int
    multiple: int = 8  # the VAE factor; the frame is padded to it

    @property
    def content(self) -> tuple[int, int]:
        return self.content_height, self.content_width

    @property
    def frame(self) -> tuple[int, int]:
        """The size the VAE and the UNet see: the content padded up to a multiple of the VAE factor."""
        m = self.multiple
        return -(-self.content_height // m) * m, -(-self.content_width // m) * m

    @property
    def latent(self) -> tuple[int, int]:
        h, w = self.frame
        return h // self.multiple, w // self.multiple

    @property
    def resized(self) -> bool:
        return self.content != (self.height, self.width)

    @property
    def downscaled(self) -> bool:
        return self.content_height * self.content_width < self.height * self.width

    def describe(self) -> str:
        if not self.resized:
            return f"{self.width}x{self.height} (native)"
        return f"{self.width}x{self.height} -> {self.content_width}x{self.content_height}"


def check_input_size(height: int, width: int) -> None:
    if height * width > MAX_INPUT_PIXELS:
        raise InputError(
            f"the image is {width}x{height} ({height * width / 1e6:.0f} MP); "
            f"the limit is {MAX_INPUT_PIXELS / 1e6:.0f} MP — downscale it before editing, or crop the part you want "
            "to change"
        )


def native_side(native: int | str) -> int:
    """The model's own working side: given directly, or a family's default by name ("sd15": 512)."""
    if isinstance(native, str):
        from ..models import families

        return families.get(native).default_resolution
    return int(native)


def check_resolution(resolution: int | None, max_side: int | None) -> None:
    if resolution:
        if not MIN_WORKING_RESOLUTION <= int(resolution) <= MAX_WORKING_RESOLUTION:
            raise InputError(
                f"working resolution {resolution} is outside {MIN_WORKING_RESOLUTION}..{MAX_WORKING_RESOLUTION}; "
                "use 0 for the model's own (512 for SD1.5, 768 or 1024 for SDXL-based models)"
            )
    if max_side and not MIN_WORKING_RESOLUTION <= int(max_side) <= MAX_WORKING_SIDE:
        raise InputError(
            f"max side {max_side} is outside {MIN_WORKING_RESOLUTION}..{MAX_WORKING_SIDE}; use 0 for no limit"
        )


def working_size(
    height: int,
    width: int,
    native: int | str = 512,
    resolution: int | None = None,
    max_side: int | None = None,
    upscale: bool = False,
    multiple: int = 8,
) -> WorkingSize:
    """The size to edit a ``height`` x ``width`` picture at.

    ``native``: the model's own working side (``IP2PComponents.working_resolution``; a family name gives that
    family's default). ``resolution``: side of the square whose area the model works at (None/0: ``native``).
    ``max_side``: cap on the longer working side (None/0: none, beyond the hard limit).
    ``upscale``: scale pictures smaller than the area up to it (crop-to-mask does, so a small region gets the
    model's full resolution); otherwise they are edited at their own size.
    """
    check_resolution(resolution, max_side)
    target = int(resolution or native_side(native))
    scale = math.sqrt(target * target / (height * width))
    if not upscale:
        scale = min(scale, 1.0)
    scale = min(scale, min(int(max_side or MAX_WORKING_SIDE), MAX_WORKING_SIDE) / max(height, width))
    if scale == 1.0:
        return WorkingSize(height, width, height, width, multiple)
    return WorkingSize(height, width, max(1, round(height * scale)), max(1, round(width * scale)), multiple)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[N,C,H,W]`` in 0..1 resized to ``size``: antialiased bicubic when shrinking (as PIL), bicubic up."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=shrink).clamp_(0.0, 1.0)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """IMAGE ``[B,H,W,C]`` resized to ``size`` (see :func:`resize`)."""
    if tuple(image.shape[1:3]) == tuple(size):
        return image
    return resize(image.permute(0, 3, 1, 2), size).permute(0, 2, 3, 1).contiguous()


def _smoothstep(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    t = ((x - low) / (high - low)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def change_map(low_input: torch.Tensor, low_edit: torch.Tensor) -> torch.Tensor:
    """``[N,1,h,w]`` in 0..1: how much the edit changed each working-resolution pixel (1 = edited).

    The absolute difference is averaged over a small window (a single pixel's difference is mostly the VAE's
    reconstruction noise) and the result is dilated by a pixel, so the detail of the old picture is not put
    back on the rim of an edited region.
    """
    diff = (low_edit - low_input).abs().mean(1, keepdim=True)
    k = 2 * CHANGE_RADIUS + 1
    local = F.avg_pool2d(F.pad(diff, (CHANGE_RADIUS,) * 4, mode="replicate"), k, stride=1)
    changed = _smoothstep(local, CHANGE_LOW, CHANGE_HIGH)
    return F.max_pool2d(changed, 3, stride=1, padding=1)


def restore_detail(original: torch.Tensor, low_input: torch.Tensor, low_edit: torch.Tensor) -> torch.Tensor:
    """The edit at the original's size with the original's fine detail back where the edit left it alone.

    ``original`` ``[N,3,H,W]``; ``low_input`` = ``resize(original, (h, w))``, the picture the model saw;
    ``low_edit`` ``[N,3,h,w]``, the model's output. Plain resizing returns ``resize(low_edit, (H, W))``, which
    lacks everything above the working resolution's frequencies. The detail that resizing removed is exactly
    ``original - resize(low_input, (H, W))``; adding it back where :func:`change_map` says the edit did not
    change the picture restores unedited regions to nearly the original, and leaves edited regions as plain
    resizing has them (the old detail does not belong to the new content).
    """
    size = tuple(original.shape[-2:])
    plain = resize(low_edit, size)
    detail = original - resize(low_input, size)
    keep = 1.0 - change_map(low_input, low_edit)
    keep = F.interpolate(keep, size=size, mode="bilinear", align_corners=False)
    return (plain + keep * detail).clamp_(0.0, 1.0)
