"""Memory-tight modes: modules dropped from memory when not in use, read back from their files when needed.

A cached model encodes each text once (:meth:`CachedModel.encode` memoises the embeddings), so once a prompt is
encoded its text encoders only hold memory while the UNet and VAE work: 246 MB of SD1.5's 2.1 GB in bf16, 1.6
GB of SDXL's 5.1 GB in fp16. Further, an edit needs the VAE to encode its input, then only the UNet, then only
the VAE again: with one module in memory at a time, a fresh process doing load + one SD1.5 edit peaks at the
UNet + its activations instead of the whole model (``benchmarks/peak_memory.py``): the CPU counterpart of
diffusers' model offload, with the disk (in practice the OS page cache) in place of CPU RAM.

A released module keeps its object, config and tokenizer; its tensors move to the meta device (no memory) and
are read back, tensor by tensor, in the same dtype and layout, so nothing it computes changes.

Modes (``ModelCache(memory=...)``, ``ip2p-edit edit --memory``):

- ``keep``: everything stays in memory;
- ``auto`` (default): the text encoders are released after an encoding when the memory the system has
  available (``MemAvailable``) is less than the model's weights, i.e. when a second copy would not fit;
- ``low``: one module in memory at a time. Nothing is read at load; the text encoders are read to encode and
  released after, the VAE after encoding the input, the UNet after sampling, the VAE after decoding. Each edit
  call reads its UNet again (SD1.5 in bf16: 1.7 GB, 1.1-1.6 s from the page cache), so it is for machines where
  memory, not time, is short.

Only modules that can be read back alone are released: a diffusers folder's subfolders with safetensors weights.
Modules of a single-file checkpoint (the whole file would be read again) and modules carrying LoRA adapters (the
adapters would be lost) are kept, whatever the mode.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Callable

import torch

from . import cpu_pack
from .components import IP2PComponents
from .weights import assign_strict, deferring, read_safetensors, weight_files

log = logging.getLogger(__name__)

MODES = ("auto", "keep", "low")
DEFERRED_AT_LOAD = frozenset({"unet", "vae", "text_encoder", "text_encoder_2"})  # low mode: read when first used


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown memory mode {mode!r}; choose one of: {', '.join(MODES)}")
    return mode


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (``MemAvailable``), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def weights_bytes(components: IP2PComponents) -> int:
    return sum(t.numel() * t.element_size() for m in components.modules().values()
               for t in (*m.parameters(), *m.buffers()) if not t.is_meta)


def text_encoder_names(components: IP2PComponents) -> list[str]:
    return [name for name in components.modules() if name.startswith("text_encoder")]


def module_folder(components: IP2PComponents, name: str) -> Path | None:
    """The diffusers subfolder ``name`` is read back from, or None if it cannot be read back alone."""
    source = components.source
    if source is None or source.kind != "diffusers":
        return None
    folder = Path(source.location) / name
    return folder if weight_files(folder) else None


def read_back(components: IP2PComponents, name: str) -> None:
    """Fill the released module ``name`` from its folder, as :mod:`.families.base` loaded it the first time."""
    from .families.base import fix_position_ids, uses_channels_last
    from .ldm_format import load_text_encoder

    folder = module_folder(components, name)
    if folder is None:  # the folder changed on disk since the load
        raise FileNotFoundError(f"{components.source.location}/{name}: the weights are gone; load the model again")
    module = components.modules()[name]
    is_text = name.startswith("text_encoder")
    dtype = components.precision.text_encoder if is_text else getattr(components.precision, name)
    layout = not is_text and uses_channels_last(components.device, dtype)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        state.update(read_safetensors(file, dtype, channels_last=layout))
    if is_text:
        load_text_encoder(module, state)
        fix_position_ids(module)
    else:
        assign_strict(module, state)
    module.eval().requires_grad_(False)


class ReleasedModules:
    """Which of one model's modules are out of memory; releases and reads them back. Shared by its LoRA views."""

    def __init__(self, mode: Callable[[], str], allowed: Callable[[], bool], released: set[str] = frozenset()):
        self._mode = mode  # read at each use: the cache's setting may change between runs
        self._allowed = allowed  # False where another memory manager (ComfyUI's) holds the modules
        self.lock = threading.RLock()  # held across restore + use + release: one module, many threads
        self.released = set(released)
        self.releases = 0  # how many times text encoders were dropped after encoding; tests and logs read it

    @property
    def text_encoders_released(self) -> bool:
        return any(name.startswith("text_encoder") for name in self.released)

    def restore(self, components: IP2PComponents, names) -> None:
        """Read the released modules among ``names`` back (a no-op for modules in memory)."""
        with self.lock:
            for name in [n for n in names if n in self.released]:
                read_back(components, name)
                self.released.discard(name)
                log.info("ip2p: read the %s of %s from disk", name, components.source.name)

    def after_encoding(self, components: IP2PComponents, has_adapters: bool) -> bool:
        """Release the text encoders if the mode asks for it and they can be read back alone; True if done."""
        with self.lock:
            mode = self._mode()
            if mode == "auto":
                available = available_memory()
                if available is None or available >= weights_bytes(components):
                    return False
            elif mode != "low":
                return False
            names = text_encoder_names(components)
            if self._release(components, names, has_adapters, all_or_none=True):
                self.releases += 1
                log.info("ip2p: released the text encoder of %s after encoding (%s)", components.source.name,
                         "memory mode low" if mode == "low" else "memory is tight")
                return True
            return False

    def done_with(self, components: IP2PComponents, names, has_adapters: bool) -> bool:
        """In low mode, release ``names`` now that an edit is done with them; True if any was released."""
        with self.lock:
            if self._mode() != "low":
                return False
            return self._release(components, [n for n in names if n in components.modules()], has_adapters)

    def _release(self, components: IP2PComponents, names: list[str], has_adapters: bool,
                 all_or_none: bool = False) -> bool:
        if not self._allowed():
            return False
        # LoRA adapters live in the UNet and text encoders; released, they would be gone (the VAE has none).
        names = [n for n in names if n not in self.released and not (has_adapters and n != "vae")]
        readable = [n for n in names if module_folder(components, n)]
        if not readable or (all_or_none and len(readable) != len(names)):
            if names:
                log.debug("ip2p: keeping %s of %s (not readable back alone)", names, components.source.name)
            return False
        for name in readable:
            module = components.modules()[name]
            cpu_pack.unpack_convolutions(module)  # a packed copy would outlive the weights it was made of
            module.to("meta")
        self.released.update(readable)
        return True


@contextlib.contextmanager
def loading_lean(mode: str, allowed: bool, source):
    """Around a model load: in low mode, the modules of :data:`DEFERRED_AT_LOAD` are built, not read.

    Yields the set of names that were deferred (filled once the load returns)."""
    deferred: set[str] = set()
    if mode != "low" or not allowed or getattr(source, "kind", None) != "diffusers":
        yield deferred
        return
    with deferring(DEFERRED_AT_LOAD, deferred):
        yield deferred
