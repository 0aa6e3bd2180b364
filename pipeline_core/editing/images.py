"""Image conversions between ComfyUI's IMAGE layout, the VAE's tensors, and files.

ComfyUI IMAGE is ``[B, H, W, C]`` float in 0..1; the VAE wants ``[B, 3, H, W]`` in -1..1 with H and W
multiples of its scale factor. We pad (never crop or resize) to that multiple and crop the result back, so
the output has exactly the input's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """``[B,H,W,C]`` with C in {1, 2, 3, 4} as RGB.

    Alpha is dropped rather than mistaken for a fourth colour channel (diffusers takes a 4-channel image for
    a latent); grey is repeated to three channels.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"expected an IMAGE batch [batch, height, width, channels], got {shape}")
    b, h, w, c = images.shape
    if b == 0 or h == 0 or w == 0:
        raise InputError(f"the image batch is empty (shape {tuple(images.shape)})")
    if c in (1, 2):
        images = images[..., :1].expand(b, h, w, 3)
    elif c == 4:
        images = images[..., :3]
    elif c != 3:
        raise InputError(f"an image has {c} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
    if not torch.isfinite(images).all():
        raise InputError("the image contains NaN or infinite values")
    return images.float().clamp(0.0, 1.0)


def padding_for(height: int, width: int, multiple: int) -> tuple[int, int]:
    return (-height) % multiple, (-width) % multiple


def comfy_to_vae(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """IMAGE -> ``[B,3,H',W']`` in -1..1, padded on the bottom/right to a multiple of ``multiple``.

    Returns the padded tensor and the original (height, width). Reflection keeps the padded border looking
    like the picture, so the model does not see a hard edge there; tiny images fall back to replication.
    """
    images = to_rgb(images)
    h, w = images.shape[1:3]
    pad_h, pad_w = padding_for(h, w, multiple)
    x = images.permute(0, 3, 1, 2) * 2.0 - 1.0
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x.contiguous(), (h, w)


def vae_to_comfy(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B,3,H',W']`` in -1..1 -> IMAGE ``[B,h,w,3]`` in 0..1, cropped back to ``size``."""
    h, w = size
    x = x[:, :, :h, :w].float()
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()


def load_image(path: str | Path) -> torch.Tensor:
    """A picture file as a ``[1,H,W,3]`` IMAGE, honouring EXIF rotation as viewers do."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise InputError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: cannot be read as an image ({exc})") from None
    return torch.from_numpy(arr)[None]


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write one ``[H,W,3]`` IMAGE (0..1) as PNG/JPEG/WebP by the file's suffix."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (image.detach().cpu().float().clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path
