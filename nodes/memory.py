"""The pack's models under ComfyUI's memory manager, like ComfyUI's own.

Each loaded module (unet, vae, text encoder) is wrapped in a ``ModelPatcher`` and loaded through
``comfy.model_management.load_models_gpu`` right before use, as core does for its plain modules (CLIP vision,
upscale models). So "Unload models", ``POST /free`` and ComfyUI's eviction to make room for native models move
our weights to the offload device; the next run's :meth:`ComfyResidency.load` brings them back. A diffusers
wrapper that keeps its modules to itself is invisible to ComfyUI: it cannot be unloaded and runs other models
out of memory.

RAM follows core's rule too. Core's models live in the executor's node-output cache: unloading moves them to
the offload device (a GPU user's next run copies them back, no disk read), and their RAM goes only when that
cache is reset, which ComfyUI does for ``POST /free {"free_memory": true}`` ("Unload Models and Execution
Cache"; plain "Unload Models" keeps it). Our weights live in the pack's model cache instead, so
:func:`release_ram_with_executor_cache` drops that cache at the same moment; the next run reads the model from
disk again, with the same weights. Eviction and "Unload Models" alone never drop it.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import comfy.model_management as mm
import comfy.model_patcher
import torch

from ..pipeline_core.models.cache import ModelCache, Residency
from ..pipeline_core.models.components import IP2PComponents
from ..pipeline_core.models.controlnet import CONTROLNET_CACHE

log = logging.getLogger(__name__)


class ModuleHolder(torch.nn.Module):
    """A plain container for one diffusers/transformers module, as ``ModelPatcher`` needs it.

    ``ModelPatcher`` writes ``model.device`` and a few bookkeeping attributes on the module it manages;
    diffusers and transformers define ``device`` as a read-only property, so their models cannot be handed to
    it directly ("property 'device' ... has no setter"). The holder's class name is what ComfyUI logs
    ("Requested to load IP2PUNet").
    """

    def __init__(self, module: torch.nn.Module, device: torch.device):
        super().__init__()
        self.module = module
        self.device = device

    def get_dtype(self) -> torch.dtype:  # ModelPatcher.model_dtype() asks for it
        return next(self.module.parameters()).dtype


class IP2PUNet(ModuleHolder):
    pass


class IP2PVAE(ModuleHolder):
    pass


class IP2PTextEncoder(ModuleHolder):
    pass


class IP2PTextEncoder2(ModuleHolder):
    pass


HOLDERS: dict[str, type[ModuleHolder]] = {
    "unet": IP2PUNet, "vae": IP2PVAE, "text_encoder": IP2PTextEncoder, "text_encoder_2": IP2PTextEncoder2,
}


class IP2PModelPatcher(comfy.model_patcher.ModelPatcher):
    """A ``ModelPatcher`` that moves its module whole.

    ComfyUI's partial ("lowvram") loading leaves some layers on the offload device and streams them in through
    ``comfy.ops`` layers; plain torch layers cannot do that and would fail with a device mismatch. So a
    partial load becomes a full one, and a partial unload frees nothing, which makes ComfyUI unload the whole
    module instead.
    """

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        return super().partially_load(device_to, max(extra_memory, self.model_size() + 1), force_patch_weights)

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        return 0

    def detach(self, unpatch_all=True):
        model = super().detach(unpatch_all)
        if unpatch_all:  # unpatch_all=False is ComfyUI re-registering a model that stays loaded
            log.info("ip2p: ComfyUI unloaded %s to %s", type(self.model).__name__, self.offload_device)
        return model


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


class ComfyResidency(Residency):
    """Residency that hands every module to ComfyUI's memory manager."""

    def offload_device(self, device: torch.device) -> torch.device:
        # Fresh weights wait where ComfyUI keeps unloaded models; the first load() moves them.
        return mm.unet_offload_device()

    def adopt(self, components: IP2PComponents) -> dict[str, IP2PModelPatcher]:
        patchers = {}
        for role, module in components.modules().items():
            holder = HOLDERS[role](module, _device_of(module))
            # Load onto the device the cache key names (ComfyUI's torch device), not vae_device(): the sampler
            # feeds every module tensors on components.device.
            patchers[role] = IP2PModelPatcher(
                holder, load_device=components.device, offload_device=mm.unet_offload_device()
            )
        return patchers

    def load(self, components: IP2PComponents, handle: Any, names: tuple[str, ...], memory_required: int = 0) -> None:
        # Already-loaded modules cost nothing here; unloaded ones are moved back, evicting others if needed.
        mm.load_models_gpu([handle[n] for n in names], memory_required=memory_required, force_full_load=True)

    def offload(self, components: IP2PComponents, handle: Any, names: tuple[str, ...]) -> None:
        # Low-VRAM mode: nothing to move by hand. Each load() asks ComfyUI for the room it needs, and its manager
        # evicts the modules an edit is done with (ours are its models) only if that room is short.
        pass

    def free_memory(self, device: torch.device) -> int | None:
        return mm.get_free_memory(device)

    def low_vram_forced(self) -> bool:
        # ComfyUI started with --lowvram / --novram (or set so for a small card) streams its own models too.
        return mm.vram_state in (mm.VRAMState.LOW_VRAM, mm.VRAMState.NO_VRAM)

    def allows_release(self) -> bool:
        # ComfyUI's manager holds the text encoders (their patchers move them); it offloads them itself.
        return False

    def modules_changed(self, handle: Any) -> None:
        # ModelPatcher measures its module once; LoRA adapters added since must count in ComfyUI's budget.
        for patcher in handle.values():
            patcher.size = 0

    def release(self, handle: Any) -> None:
        """The cache dropped this model: take it out of ComfyUI's list so its memory can really go."""
        patchers = list(handle.values())
        for loaded in list(mm.current_loaded_models):
            if any(loaded.model is p for p in patchers):
                loaded.model_unload()
                mm.current_loaded_models.remove(loaded)
        mm.soft_empty_cache()


def install_residency(cache: ModelCache) -> ComfyResidency:
    """Make ``cache`` register its models with ComfyUI. Idempotent; called when ComfyUI loads the pack."""
    if isinstance(cache.residency, ComfyResidency):
        return cache.residency
    if len(cache):
        # Models adopted by the previous residency are invisible to ComfyUI; they reload on next use.
        cache.clear()
    cache.residency = ComfyResidency()
    return cache.residency


_HOOKED = "ip2p_release_cache"  # attribute of our wrapper around PromptExecutor.reset: the cache it drops


def release_ram_with_executor_cache(cache: ModelCache) -> bool:
    """Drop ``cache``'s models whenever ComfyUI resets its executor cache. Idempotent; False if not possible.

    ComfyUI has no hook for "free memory"; its worker thread calls ``PromptExecutor.reset()`` for it (between
    prompts, right after ``unload_all_models()``, right before its ``gc.collect()``), and nowhere else but the
    executor's construction. So this wraps that one method, without changing what it does. Doing it there, not
    in the HTTP handler, means a model is never dropped under a running prompt.
    """
    try:
        import execution
    except ImportError:  # not inside a ComfyUI server (scripts, some tests): nothing to hook
        log.debug("ip2p: ComfyUI's execution module is not importable; models stay cached on free")
        return False
    executor = getattr(execution, "PromptExecutor", None)
    current = getattr(executor, "reset", None)
    if current is None:
        log.warning("ip2p: this ComfyUI has no PromptExecutor.reset; 'free memory' will not release our models' RAM")
        return False
    if hasattr(current, _HOOKED):
        setattr(current, _HOOKED, cache)
        return True

    @functools.wraps(current)
    def reset(self, *args, **kwargs):
        result = current(self, *args, **kwargs)
        dropped = getattr(reset, _HOOKED).clear()
        # ControlNets are held by conditionings in the executor cache just reset; drop ours with them.
        controlnets = CONTROLNET_CACHE.clear()
        if controlnets:
            log.info("ip2p: ComfyUI freed its caches: released %d ControlNet(s) from RAM", controlnets)
        if dropped:
            log.info("ip2p: ComfyUI freed its caches: released %s from RAM (the next run reloads from disk)",
                     ", ".join(key.describe() for key in dropped))
        return result

    setattr(reset, _HOOKED, cache)
    executor.reset = reset
    return True
