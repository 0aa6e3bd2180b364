"""The process-wide model cache: one loaded copy of each (source, precision, device), shared by all nodes.

Where the modules live is delegated to a :class:`Residency`. Outside ComfyUI the default keeps them on their
device. Inside ComfyUI the nodes install one that registers them with ComfyUI's memory manager, so "Unload
models" and ComfyUI's own eviction reach them; the next run calls :meth:`Residency.load` and they come back.
Eviction only moves weights to the offload device (the CPU copy stays, so a GPU user's next run needs no disk
read); the memory itself goes when the cache drops a model (:meth:`ModelCache.evict`, :meth:`ModelCache.clear`),
which the nodes do when ComfyUI is asked to free its memory.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from . import cpu_pack
from .components import IP2PComponents
from .families.base import TextEncoding
from .loading import ModelSource, load_components
from .lora import LoraRef, LoraState, describe_stack
from .precision import Precision, resolve_precision
from .releasing import ReleasedModules, available_memory, check_mode, loading_lean

log = logging.getLogger(__name__)

MAX_CACHED_EMBEDDINGS = 64
MAX_LORA_VIEWS = 16  # LoRA stacks (file + strength combinations) remembered per base model, with their embeddings


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl, macOS and Windows have none
    except (OSError, AttributeError):
        return None


def return_memory_to_os(collect: bool = True) -> None:
    """Collect garbage, then have the C heap hand its free pages back to the OS.

    glibc keeps freed memory in its arenas for reuse, and a model's weights are mostly tensors below its mmap
    threshold (32 MB at most), so dropping a model lowers RSS by a fraction of its size, and every load/drop
    cycle leaves more behind. Measured with the SD1.5 UNet (bf16, 2 GB with VAE and text encoder), three
    load/drop cycles in one thread: RSS after each drop 1041, 2516, 2841 MiB without, 828, 862, 844 MiB with
    ``malloc_trim(0)`` (start: 730); after each load 2890, 3446, 3630 MiB without, 2867 MiB each time with.
    """
    if collect:
        gc.collect()  # tensors held in reference cycles (e.g. ComfyUI's patcher bookkeeping) go now, not later
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Residency:
    """Keeps modules where they must be. This default: they stay on the device they were loaded to."""

    def offload_device(self, device: torch.device) -> torch.device:
        """Where freshly loaded weights are placed before :meth:`load` is first called."""
        return device

    def adopt(self, components: IP2PComponents) -> Any:
        """Called once after loading; returns a handle passed back to :meth:`load` and :meth:`release`."""
        return None

    def load(self, components: IP2PComponents, handle: Any, names: tuple[str, ...], memory_required: int = 0) -> None:
        """Make sure the named modules (``unet``, ``vae``, ``text_encoder``[, ``text_encoder_2``]) are on the device."""
        for name in names:
            module = components.modules()[name]
            if next(module.parameters()).device != components.device:
                module.to(components.device)

    def offload(self, components: IP2PComponents, handle: Any, names: tuple[str, ...]) -> None:
        """Move the named modules off an accelerator while an edit does not need them (low-VRAM mode): to the
        CPU, where the next :meth:`load` finds them (diffusers' model CPU offload)."""
        if components.device.type == "cpu":
            return
        for name in names:
            module = components.modules()[name]
            if next(module.parameters()).device == components.device:
                module.to("cpu")

    def free_memory(self, device: torch.device) -> int | None:
        """Free memory on ``device`` in bytes, for low-VRAM mode's ``auto``; None where it is not known."""
        if device.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.mem_get_info(device)[0]
        return None

    def low_vram_forced(self) -> bool:
        """Whether every edit must run in low-VRAM mode (a manager set to it)."""
        return False

    def release(self, handle: Any) -> None:
        """Called when the cache drops the model."""

    def allows_release(self) -> bool:
        """Whether the cache may drop modules from memory (see :mod:`.releasing`); False where
        another memory manager holds the modules."""
        return True

    def modules_changed(self, handle: Any) -> None:
        """Called after weights were added to the modules (LoRA adapters): sizes known to a manager are stale."""


@dataclass(frozen=True)
class ModelKey:
    source: ModelSource
    precision: str  # resolved: fp32 / fp16 / bf16
    device: str
    # LoRA files and strengths applied on top, in order. The weights in memory are the base model's (this field
    # dropped); a stack only selects adapters on it, so a new strength never reads the base from disk again.
    loras: tuple[LoraRef, ...] = ()

    def describe(self) -> str:
        text = f"{self.source.name} ({self.precision}, {self.device})"
        return f"{text} + LoRA {describe_stack(self.loras)}" if self.loras else text

    @property
    def base(self) -> "ModelKey":
        """The key of the weights in memory: this one without its LoRA stack."""
        return replace(self, loras=()) if self.loras else self

    def with_lora(self, ref: LoraRef) -> "ModelKey":
        """This model with one more LoRA on top (IP2P Load LoRA nodes chain by calling this)."""
        return replace(self, loras=(*self.loras, ref))


class CachedModel:
    """A loaded model plus what is derived from it (text encodings), as handed out by the cache.

    With a LoRA stack (``key.loras``) it is a view of its base model: the same modules, with that stack's
    adapters switched on whenever it is used (:meth:`ensure_loaded`), and its own memo of text encodings.
    """

    def __init__(self, key: ModelKey, components: IP2PComponents, handle: Any, residency: Residency,
                 lora_state: LoraState | None = None, released: ReleasedModules | None = None):
        self.key = key
        self.components = components
        self.handle = handle
        self.residency = residency
        self._lora_state = lora_state if lora_state is not None else LoraState()
        self.released = released or ReleasedModules(lambda: "keep", lambda: False)
        self._views: OrderedDict[tuple[LoraRef, ...], CachedModel] = OrderedDict()
        self._embeddings: OrderedDict[str, TextEncoding] = OrderedDict()
        self._lock = threading.Lock()
        self.encode_calls = 0  # texts actually run through the text encoder; tests and logs read it

    @property
    def family(self):
        return self.components.spec

    @property
    def loras(self) -> tuple[LoraRef, ...]:
        return self.key.loras

    def with_loras(self, stack: tuple[LoraRef, ...]) -> "CachedModel":
        """This model with ``stack`` on top; every file is read and checked now, so a bad one fails here."""
        if not stack:
            return self
        with self._lock:
            view = self._views.get(stack)
            if view is not None:
                self._views.move_to_end(stack)
                return view
        adapters = len(self._lora_state.adapters)
        with self.released.lock:
            self.released.restore(self.components, self.components.modules())  # adapters go into real weights
            for ref in stack:
                self._lora_state.load(ref, self.components)
        if len(self._lora_state.adapters) != adapters:
            self.residency.modules_changed(self.handle)
        view = CachedModel(replace(self.key, loras=stack), self.components, self.handle, self.residency,
                           self._lora_state, self.released)
        with self._lock:
            view = self._views.setdefault(stack, view)
            while len(self._views) > MAX_LORA_VIEWS:
                self._views.popitem(last=False)
        return view

    def ensure_loaded(self, *names: str, memory_required: int = 0) -> None:
        """The named modules on the device, with this model's LoRA stack (or none) active on them.

        Views share modules, so the stack is set on every use: a graph that samples with two stacks of one base
        model gets each stack's output, in either order.
        """
        self.released.restore(self.components, names)
        self.residency.load(self.components, self.handle, names, memory_required)
        if any(name != "vae" for name in names):
            self._lora_state.activate(self.loras, self.components)

    def offload(self, *names: str) -> None:
        """Low-VRAM mode: ``names`` leave the device until the next :meth:`ensure_loaded` asks for them."""
        self.residency.offload(self.components, self.handle, tuple(n for n in names if n in self.components.modules()))

    def done_with(self, *names: str) -> None:
        """An edit no longer needs ``names`` (``unet``, ``vae``): in low memory mode they leave memory now."""
        if self.released.done_with(self.components, names, bool(self._lora_state.adapters)):
            return_memory_to_os(collect=False)

    def encode(self, text: str) -> TextEncoding:
        """``text`` as the family's UNet reads it, memoised per text (re-queuing a prompt encodes nothing)."""
        return self.encode_texts(text)[0]

    def encode_texts(self, *texts: str) -> list[TextEncoding]:
        """:meth:`encode` for several texts at once: a released text encoder is read back once for all."""
        out: dict[str, TextEncoding] = {}
        with self._lock:
            for text in texts:
                hit = self._embeddings.get(text)
                if hit is not None:
                    self._embeddings.move_to_end(text)
                    out[text] = hit
        missing = [t for t in dict.fromkeys(texts) if t not in out]
        if missing:
            with self.released.lock:
                self.ensure_loaded(*(name for name in self.components.modules() if name.startswith("text_encoder")))
                for text in missing:
                    out[text] = self.family.encode_text(self.components, text)
                if self.released.after_encoding(self.components, bool(self._lora_state.adapters)):
                    return_memory_to_os(collect=False)
            with self._lock:
                for text in missing:
                    self.encode_calls += 1
                    self._embeddings[text] = out[text]
                while len(self._embeddings) > MAX_CACHED_EMBEDDINGS:
                    self._embeddings.popitem(last=False)
        return [out[t] for t in texts]


Loader = Callable[[ModelSource, Precision, torch.device, torch.device], IP2PComponents]


def _default_loader(source: ModelSource, precision: Precision, device: torch.device,
                    place: torch.device) -> IP2PComponents:
    components = load_components(source, precision, place)
    components.device = device
    return components


class ModelCache:
    """Lock-guarded LRU of loaded models. ``get`` on a key already held loads nothing."""

    def __init__(self, max_models: int = 2, residency: Residency | None = None, loader: Loader = _default_loader,
                 memory: str = "auto"):
        self.max_models = max_models
        self.residency = residency or Residency()
        self._loader = loader
        # keep / auto (text encoders released when memory is tight) / low (one module in memory at a time); see
        # :mod:`.releasing`.
        self.memory = check_mode(memory)
        self._models: OrderedDict[ModelKey, CachedModel] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0  # how many times a model was actually read from disk

    def key_for(self, source: ModelSource, precision: str, device: torch.device | str,
                loras: tuple[LoraRef, ...] = ()) -> ModelKey:
        resolved = resolve_precision(precision, device)
        return ModelKey(source, resolved.name, str(torch.device(device)), tuple(loras))

    def get(self, key: ModelKey) -> CachedModel:
        """The model ``key`` names: its base from memory (read from disk if not held), its LoRA stack on top."""
        return self._get_base(key.base).with_loras(key.loras)

    def _get_base(self, key: ModelKey) -> CachedModel:
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                self._models.move_to_end(key)
                return model
            device = torch.device(key.device)
            precision = resolve_precision(key.precision, device)
            log.info("ip2p: loading %s", key.describe())
            allowed = self.residency.allows_release()
            with loading_lean(self.memory, allowed, key.source) as deferred:
                components = self._loader(key.source, precision, device, self.residency.offload_device(device))
            self.loads += 1
            if cpu_pack.should_pack(components.unet, self.memory, available_memory()):
                log.info("ip2p: %d UNet convolutions run on prepacked weights (bf16 on a CPU)",
                         cpu_pack.pack_convolutions(components.unet))
            model = CachedModel(key, components, self.residency.adopt(components), self.residency,
                                released=ReleasedModules(lambda: self.memory,
                                                         lambda: self.residency.allows_release(), deferred))
            self._models[key] = model
            dropped = False
            while len(self._models) > self.max_models:
                old_key, old = self._models.popitem(last=False)
                log.info("ip2p: dropping %s from the model cache", old_key.describe())
                self.residency.release(old.handle)
                del old
                dropped = True
            # Loading leaves hundreds of MB of freed buffers (the file's tensors before the cast) in the heap.
            return_memory_to_os(collect=dropped)
            return model

    def evict(self, key: ModelKey) -> bool:
        with self._lock:
            model = self._models.pop(key.base, None)
        if model is None:
            return False
        self.residency.release(model.handle)
        del model
        return_memory_to_os()
        return True

    def clear(self) -> list[ModelKey]:
        """Drop every model and give its memory back to the OS; returns the keys dropped.

        The next :meth:`get` of a dropped key reads the model from disk again, with the same weights.
        """
        with self._lock:
            models, self._models = list(self._models.values()), OrderedDict()
        keys = [m.key for m in models]
        while models:  # leaves no loop variable holding the last model
            self.residency.release(models.pop().handle)
        if keys:
            return_memory_to_os()
        return keys

    def __contains__(self, key: ModelKey) -> bool:
        with self._lock:
            return key.base in self._models

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)


MODEL_CACHE = ModelCache()
"""The one cache the nodes and the CLI share. Tests build their own or call ``clear()``."""
