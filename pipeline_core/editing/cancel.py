"""Cancel inside a model call: a caller's check run before each block of the UNet and the VAE while an edit runs.

Progress is reported once per sampler step, but one step is one UNet call over a whole batch times its guidance
passes: a 12-item sweep at 512² on a CPU spends about a minute in it, and a Cancel checked only between steps
would keep the user waiting that long. Forward pre-hooks on the UNet's down, mid and up blocks (and the VAE's
encoder and decoder blocks, seconds each at 512² on a CPU) run the check about ten times per call instead.

A check cancels by raising (ComfyUI's ``throw_exception_if_processing_interrupted`` raises
``InterruptProcessingException``; the CLI's Ctrl-C raises ``KeyboardInterrupt`` by itself). A block's forward only
reads the model, so an exception between blocks leaves the weights as they were; the hooks are removed on every
way out, so the cached model is the one the next edit would have had without the cancel.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import nn

CancelCheck = Callable[[], None]
"""check_cancel(): returns to go on, raises to cancel. Runs often (before every UNet block), so it must be cheap."""


def checked_blocks(unet: nn.Module, vae: nn.Module) -> list[nn.Module]:
    """The blocks the check runs before: the UNet's down, mid and up blocks and the VAE's encoder/decoder blocks.

    Blocks rather than every layer: about a tenth of a call apart is soon enough for a person, and a handful of
    Python calls per UNet call cost nothing next to it.
    """
    mid = [unet.mid_block] if unet.mid_block is not None else []
    return [*unet.down_blocks, *mid, *unet.up_blocks, *vae.encoder.down_blocks, *vae.decoder.up_blocks]


@contextmanager
def cancel_points(modules: Iterable[nn.Module], check: CancelCheck | None) -> Iterator[None]:
    """Run ``check`` before the forward of each of ``modules`` inside the ``with``; nothing at all when it is None."""
    if check is None:
        yield
        return
    owner = threading.get_ident()

    def before_block(_module: nn.Module, _args) -> None:
        # The model cache shares modules between callers: another thread's edit of the same model must not run
        # (and be cancelled by) this edit's check.
        if threading.get_ident() == owner:
            check()

    handles = []
    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(before_block))
        yield
    finally:
        for handle in handles:
            handle.remove()
