"""Weights from a diffusers folder straight into their target dtype: one tensor in full precision at a time.

diffusers' and transformers' ``from_pretrained`` memory-map the ``.safetensors`` file and cast from the mapping.
Every page of the mapping they read stays in the process's resident set until the model is built, so loading an
fp32 folder (what timbrooks/instruct-pix2pix ships) in bf16 peaked at the whole fp32 file *plus* the bf16 copy:
6.0 GB against 3.0 GB resident afterwards for SD1.5 (``benchmarks/peak_memory.py``). Here each tensor is read
with plain file reads (the page cache is not the process's memory), cast, and its full-precision buffer freed
before the next; the modules are built on the meta device and adopt the cast tensors (``assign=True``), so no
random initialisation and no second copy exist either.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import struct
from pathlib import Path
from typing import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

# safetensors' dtype names (its format spec); float8 types only where this torch has them.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
    **{name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, attr)},
}
# The file names diffusers and transformers write (unsharded, then sharded with an index), no variant.
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


# Subfolder names whose modules a load builds without reading (memory-tight mode, :mod:`.releasing`), and the set
# that records which were. A context variable, so a load in another thread is not affected.
_DEFERRED: contextvars.ContextVar[tuple[frozenset, set] | None] = contextvars.ContextVar("ip2p_deferred", default=None)


@contextlib.contextmanager
def deferring(names, record: set):
    """Within: :func:`load_folder_module` builds the modules of subfolders ``names`` on the meta device only."""
    token = _DEFERRED.set((frozenset(names), record))
    try:
        yield
    finally:
        _DEFERRED.reset(token)


# Bytes read per file call when a tensor is cast or re-laid out on its way in: the only temporary buffer of a
# load, reused from tensor to tensor (the SD1.5 UNet's largest fp32 tensor alone is 59 MB).
READ_CHUNK = 16 * 1024 * 1024


def read_safetensors(path: Path, dtype: torch.dtype, channels_last: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, floating-point ones cast to ``dtype`` as each is read.

    Each tensor is allocated once, in its final dtype (and, with ``channels_last``, 4-D ones in that memory
    format, which oneDNN's bf16 convolutions want on CPU), and filled from the file a few rows at a time
    through one reused buffer. So no full-precision copy of a tensor ever exists, and no tensor is converted
    after loading: a whole-module ``to(memory_format=...)`` afterwards reallocated every convolution weight and
    left the C heap fragmented, 0.1-0.6 GB over the loaded size at the peak for SD1.5 in bf16 (varying from run
    to run with the allocator's arenas).
    """
    state = {}
    buffer = torch.empty(0, dtype=torch.uint8)  # rows as stored in the file
    staged = torch.empty(0, dtype=dtype)  # the same rows cast, where the layout changes too
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        start = 8 + header_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            stored, shape = _DTYPES[info["dtype"]], list(info["shape"])
            target = dtype if stored.is_floating_point else stored
            layout = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
            tensor = torch.empty(shape, dtype=target, memory_format=layout)
            f.seek(start + begin)
            if end == begin:
                pass
            elif target == stored and layout == torch.contiguous_format:
                _read_exactly(f, tensor.view(-1).view(torch.uint8), path, name)
            else:
                rows = shape[0] if shape else 1
                row_bytes = (end - begin) // rows
                per_read = min(rows, max(1, READ_CHUNK // row_bytes))
                if buffer.numel() < per_read * row_bytes:
                    buffer = torch.empty(per_read * row_bytes, dtype=torch.uint8)
                # A cast into a different layout makes torch allocate a temporary per copy; freed between the
                # tensors being read, those fragmented the heap (RSS up to 0.4 GB over the tensors, in 1 run of
                # 5). Casting into a reused contiguous buffer first, then re-laying out, allocates nothing.
                restage = target != stored and layout != torch.contiguous_format
                row_elems = (end - begin) // rows // stored.itemsize
                if restage and staged.numel() < per_read * row_elems:
                    staged = torch.empty(per_read * row_elems, dtype=target)
                rows_view = tensor.view(1) if not shape else tensor
                for row in range(0, rows, per_read):
                    n = min(per_read, rows - row)
                    chunk = buffer[: n * row_bytes]
                    _read_exactly(f, chunk, path, name)
                    source = chunk.view(stored)
                    if restage:
                        source = staged[: n * row_elems].copy_(source)
                    rows_view[row : row + n].copy_(source.view([n, *shape[1:]]))
            state[name] = tensor
    return state


def _read_exactly(f, into: torch.Tensor, path: Path, name: str) -> None:
    if f.readinto(into.numpy()) != into.numel():
        raise ValueError(f"{path.name}: truncated at tensor {name}")


def weight_files(folder: Path) -> list[Path] | None:
    """The folder's safetensors weights (one file, or the shards its index names); None if it has none."""
    for stem in _WEIGHT_NAMES:
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    return None


def assign_strict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Adopt ``state``'s tensors (no copy); strict, so a folder of another architecture names what does not fit."""
    module.load_state_dict(state, strict=True, assign=True)


def load_folder_module(folder: Path, dtype: torch.dtype, build: Callable[[dict], nn.Module],
                       fallback: Callable[[], nn.Module],
                       load: Callable[[nn.Module, dict], None] = assign_strict,
                       channels_last: bool = False) -> nn.Module:
    """The module of a diffusers subfolder (``unet``, ``vae``, ``text_encoder``...) in ``dtype``.

    ``build(config)`` makes the module from its ``config.json`` (called on the meta device); ``load`` fills it
    (``channels_last``: with its 4-D weights already in that memory format).
    Folders whose weights are not plain safetensors (``.bin``, variants only) go through ``fallback``, the
    library's own ``from_pretrained``, which copes with every layout it writes.
    """
    files = weight_files(folder)
    if files is None:
        log.info("ip2p: %s has no .safetensors weights; loading it with its library's from_pretrained", folder)
        return fallback()
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        module = build(config)
    deferred = _DEFERRED.get()
    if deferred is not None and folder.name in deferred[0]:
        deferred[1].add(folder.name)  # read later, when first used (:func:`.releasing.read_back`)
        return module
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_safetensors(file, dtype, channels_last))
    load(module, state)
    return module
