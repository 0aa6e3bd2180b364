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


def read_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, floating-point ones cast to ``dtype`` as each is read."""
    state = {}
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        start = 8 + header_size
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(raw.numpy()) != end - begin:
                raise ValueError(f"{path.name}: truncated at tensor {name}")
            tensor = raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


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
                       load: Callable[[nn.Module, dict], None] = assign_strict) -> nn.Module:
    """The module of a diffusers subfolder (``unet``, ``vae``, ``text_encoder``...) in ``dtype``.

    ``build(config)`` makes the module from its ``config.json`` (called on the meta device); ``load`` fills it.
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
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_safetensors(file, dtype))
    load(module, state)
    return module
