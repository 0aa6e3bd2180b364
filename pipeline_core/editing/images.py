"""Image conversions between ComfyUI's IMAGE layout, the VAE's tensors, and files.

ComfyUI IMAGE is ``[B, H, W, C]`` float in 0..1; the VAE wants ``[B, 3, H, W]`` in -1..1 with H and W
multiples of its scale factor. We pad (never crop or resize) to that multiple and crop the result back, so
the output has exactly the input's size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import limits
from ..errors import InputError
from .resolution import check_input_size

log = logging.getLogger(__name__)

# Integer pixels whose range is certain: 8- and 16-bit pictures as PIL, numpy and image readers hand them out.
# Other integer types (int16, int32, int64, ...) say nothing about their range, so they are refused, not guessed.
_INTEGER_RANGES = {torch.uint8: 255.0}
if hasattr(torch, "uint16"):  # torch >= 2.3
    _INTEGER_RANGES[torch.uint16] = 65535.0
# Float pictures may overshoot 0..1 a little (resampling, upscalers); clipping that needs no word.
_OVERSHOOT = 0.01


def to_unit_float(values: torch.Tensor, what: str = "image") -> torch.Tensor:
    """An IMAGE or MASK tensor of any dtype as float32 in 0..1.

    ComfyUI's IMAGE and MASK are floats in 0..1, but tensors from scripts and some custom nodes arrive as 8-bit
    (0..255) or 16-bit integers; clamping those as floats would turn almost every pixel white. uint8 is divided
    by 255, uint16 by 65535, bool is 0/1; other integer types are refused, naming the conversion to make. Floats
    far outside 0..1 are clipped with a warning (0..255 floats are the usual cause).
    """
    dtype = values.dtype
    if dtype == torch.bool:
        return values.float()
    if dtype in _INTEGER_RANGES:
        return values.float() / _INTEGER_RANGES[dtype]
    if not dtype.is_floating_point:
        raise InputError(
            f"the {what} tensor has dtype {str(dtype).removeprefix('torch.')}; ComfyUI {what}s are floats in 0..1 "
            "and the value range of this type is unknown. Convert it first: .float() / 255 for 8-bit values, "
            ".float() / 65535 for 16-bit ones (uint8 and uint16 tensors are converted automatically)"
        )
    values = values.float()
    if not torch.isfinite(values).all():
        raise InputError(f"the {what} contains NaN or infinite values; check the node that made it")
    low, high = values.min().item(), values.max().item()
    if low < -_OVERSHOOT or high > 1.0 + _OVERSHOOT:
        hint = "; it looks like 0..255 values: divide them by 255" if high > 2.0 else ""
        log.warning("ip2p: the %s has values from %.3g to %.3g; %ss are 0..1, so they were clipped to 0..1%s",
                    what, low, high, what, hint)
    return values.clamp(0.0, 1.0)


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """``[B,H,W,C]`` with C in {1, 2, 3, 4} as float RGB in 0..1 (see :func:`to_unit_float` for dtypes).

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
    return to_unit_float(images, "image")


def warn_if_tiny(height: int, width: int) -> bool:
    """Log a warning for a picture too small for any model to read; True if it is.

    It is still edited (padding makes any size valid), so a batch of thumbnails does not stop a workflow, but
    the user learns why the result looks like noise.
    """
    if min(height, width) >= limits.MIN_USEFUL_SIDE:
        return False
    log.warning(
        "ip2p: the picture is only %dx%d pixels; below %d px on a side a model sees too little to edit, so the "
        "result will be meaningless. Use a larger picture (the model's working size, e.g. 512 px for SD1.5, is best)",
        width, height, limits.MIN_USEFUL_SIDE,
    )
    return True


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
    """A picture file as a ``[1,H,W,3]`` IMAGE, honouring EXIF rotation as viewers do.

    The size is checked from the file's header, before the pixels are decoded, so a gigantic picture is refused
    at once instead of after filling the memory.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image file; give the picture's file name")
    try:
        with Image.open(path) as im:
            check_input_size(im.height, im.width)
            im = ImageOps.exif_transpose(im).convert("RGB")
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise InputError(f"{path}: no such image file; check the path") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: too large to read ({exc}); downscale it before editing") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(
            f"{path}: cannot be read as an image ({exc}); give a PNG, JPEG or WebP picture"
        ) from None
    return torch.from_numpy(arr)[None]


# Formats that store an 8-bit RGB picture as it is; the file's suffix picks one (as in ComfyUI's Save Image).
OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def check_output_path(path: str | Path) -> Path:
    """``path`` if a picture can be written there, else an :class:`InputError` saying what to change.

    Meant to run before any work (the CLI checks its outputs before a model is loaded): a bad name found only
    when saving throws away the whole edit.
    """
    text = str(path)
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise InputError(f"{path}: is a folder; give a file name inside it, e.g. {path / 'edited.png'}")
    suffix = path.suffix.lower()
    if not suffix:
        raise InputError(
            f"{path}: has no file extension, which picks the format; add one, e.g. {path}.png "
            f"(one of {', '.join(OUTPUT_SUFFIXES)})"
        )
    if suffix not in OUTPUT_SUFFIXES or suffix.lstrip(".") not in _pil_save_suffixes():
        raise InputError(
            f"{path}: {suffix} is not a picture format this can write; use one of {', '.join(OUTPUT_SUFFIXES)} "
            "(.png keeps every pixel exactly)"
        )
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # save_image creates missing folders; the first existing one must take them
    if not folder.is_dir():
        raise InputError(f"{path}: cannot be written, {folder} is a file, not a folder; choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot be written, the folder {folder} is not writable; choose another path")
    return path


def _pil_save_suffixes() -> set[str]:
    from PIL import Image

    Image.init()
    return {ext.lstrip(".") for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write one ``[H,W,3]`` IMAGE (0..1) as PNG/JPEG/WebP by the file's suffix."""
    from PIL import Image

    path = check_output_path(path)
    arr = (to_unit_float(image.detach().cpu()).numpy() * 255.0).round().astype(np.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
    except OSError as exc:
        raise InputError(f"{path}: could not be written ({exc}); choose another path or free some disk space") from exc
    return path
