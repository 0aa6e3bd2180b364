"""Convolution weights prepacked once for oneDNN, instead of re-laid out on every call (bf16 on a CPU).

PyTorch's CPU convolution hands oneDNN the weight in the module's own layout, and oneDNN reorders it into its
blocked format on every call. At the small spatial sizes of a UNet's deep levels the reorder costs more than the
arithmetic: a 1280-channel 3x3 convolution on a 4x4 latent of 3 rows (one SD1.5 edit at 256 px) took 4.9 ms
plain and 2.0 ms on a prepacked weight; a whole SD1.5 UNet call 0.82 s and 0.69 s, with a bit-identical output
(``benchmarks/speed.py --sections levers``). The prepacked weight is what ``torch.compile``'s ``freezing`` makes,
without compiling anything.

The packed copy is memory beside the module's own weight (SD1.5: 589 M convolution parameters, 1.2 GB in bf16),
so it is made only where memory allows it (:func:`should_pack`), and never in ``--memory low``. A module's
packed weight is remade whenever its weight is another tensor or was changed in place (peft's LoRA adapters run
beside the base convolution and leave its weight alone). A weight made under ``torch.inference_mode`` (ComfyUI
runs every node in it) has no version counter, so only its replacement is seen there: nothing in the pack
writes into a loaded weight in place.
"""

from __future__ import annotations

import logging
import types
import weakref

import torch
from torch import nn

log = logging.getLogger(__name__)


def available() -> bool:
    """Whether this torch build has the oneDNN ops (CPU builds with mkldnn: x86 Linux/Windows wheels)."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_reorder_convolution_weight") and hasattr(ops, "_convolution_pointwise"))
    except (RuntimeError, AttributeError):
        return False


def conv_weight_bytes(module: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in module.modules() if _packable(m))


def should_pack(unet: nn.Module, memory_mode: str, available_memory: int | None) -> bool:
    """Pack a bf16 CPU UNet's convolutions unless memory is the user's concern (``low``) or short (``auto``
    with less available than twice the copy)."""
    weight = next(unet.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.is_meta or not available():
        return False
    if memory_mode == "low":
        return False
    if memory_mode == "auto":
        return available_memory is not None and available_memory > 2 * conv_weight_bytes(unet)
    return True


def _packable(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
            and m.weight.dtype == torch.bfloat16)


def _packed_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if (x.device.type != "cpu" or x.dtype != w.dtype or w.is_meta or w.device.type != "cpu"
            or not x.is_contiguous(memory_format=torch.channels_last)):
        # On an input in the default layout (SD1.5's 16 attention proj_out 1x1 convolutions) the packed op can
        # round the last bit differently from the plain convolution; channels_last inputs (the other 82, every
        # 3x3 one) match it bit for bit, and packing only those is as fast (a 256 px UNet call 1.57 s against
        # 1.60 s packing all, 1.77 s plain).
        return nn.Conv2d.forward(self, x)
    if torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):
        # oneDNN's packed op has no backward: a forward that gradients flow through (training) runs plain.
        return nn.Conv2d.forward(self, x)
    # A weak reference, not id(): a freed weight's id and address can be reused by the next one.
    version = None if w.is_inference() else w._version
    packed = self.__dict__.get("_ip2p_packed")
    # oneDNN picks the packed layout for the input's shape: a weight packed for one edit's 3 rows and used on a
    # sweep's 36 is repacked once for them.
    shape = tuple(x.shape)
    if packed is None or packed[0]() is not w or packed[1] != version or packed[2] != shape:
        weight = torch.ops.mkldnn._reorder_convolution_weight(
            w, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(shape))
        packed = self.__dict__["_ip2p_packed"] = (weakref.ref(w), version, shape, weight)
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed[3], self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
        "none", [], "")


def pack_convolutions(module: nn.Module) -> int:
    """Make every plain bf16 ``Conv2d`` of ``module`` run on a prepacked weight (made at its first call);
    returns how many. Idempotent."""
    count = 0
    for m in module.modules():
        if _packable(m) and "forward" not in m.__dict__:
            m.forward = types.MethodType(_packed_forward, m)
            count += 1
    return count


def unpack_convolutions(module: nn.Module) -> None:
    """Back to the plain convolutions; the packed copies are freed."""
    for m in module.modules():
        if m.__dict__.get("forward") is not None and getattr(m.forward, "__func__", None) is _packed_forward:
            del m.forward
            m.__dict__.pop("_ip2p_packed", None)
