"""Choosing dtypes per device: fast where the hardware is fast, fp32 where a module would overflow."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import InputError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_NAMED = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """dtypes of the three modules. The SD VAE overflows in fp16 (NaN/black images), so it stays fp32 then."""

    unet: torch.dtype
    text_encoder: torch.dtype
    vae: torch.dtype

    @property
    def name(self) -> str:
        return {v: k for k, v in _NAMED.items()}[self.unet]


def cpu_runs_bf16_fast() -> bool:
    """True where the CPU has native bf16 matrix instructions (AMX or AVX512-BF16).

    On such CPUs bf16 is about 3x faster than fp32 for the UNet (shared/REFERENCE.md §6); elsewhere bf16 is
    emulated and slower than fp32.
    """
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a probe missing from this torch build means "unknown": fall back to fp32
            log.debug("CPU capability probe %s failed", probe, exc_info=True)
    return False


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """Turn the user's choice (auto / fp32 / fp16 / bf16) into per-module dtypes for ``device``."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type in ("cuda", "mps", "xpu"):
            precision = "fp16"
        elif device.type == "cpu" and cpu_runs_bf16_fast():
            precision = "bf16"
        else:
            precision = "fp32"
    dtype = _NAMED[precision]
    if dtype == torch.float16 and device.type == "cpu":
        raise InputError("fp16 is not supported on the CPU; use bf16 (fast on CPUs with AMX/AVX512-BF16) or fp32")
    vae = torch.float32 if dtype == torch.float16 else dtype
    return Precision(unet=dtype, text_encoder=dtype, vae=vae)
