"""The pack's ComfyUI extension: the node list, and the setup ComfyUI needs before the first run."""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from ..pipeline_core import MODEL_CACHE
from . import clip_paths, memory, model_paths
from .controlnet import IP2PApplyControlNet
from .grid import IP2PImageGrid
from .instruction import IP2PInstruction
from .loader import IP2PModelLoader
from .lora import IP2PLoraLoader
from .sampler import IP2PSampler
from .scoring import IP2PClipScorerLoader, IP2PEditScore, IP2PPickBest
from .seed_plan import IP2PSeedPlan

log = logging.getLogger(__name__)

NODES: list[type[io.ComfyNode]] = [
    IP2PModelLoader, IP2PLoraLoader, IP2PInstruction, IP2PSampler, IP2PSeedPlan, IP2PImageGrid, IP2PApplyControlNet,
]
NODES += [IP2PClipScorerLoader, IP2PEditScore, IP2PPickBest]  # scoring (issue 11), apart so merges stay simple


def setup() -> None:
    """Register the model folder, hand the shared cache's modules to ComfyUI's memory manager, and let ComfyUI's
    "free memory" release their RAM. Idempotent."""
    first_time = not isinstance(MODEL_CACHE.residency, memory.ComfyResidency)
    folder = model_paths.register_model_folder()
    clip_paths.register_clip_folder()
    memory.install_residency(MODEL_CACHE)
    memory.release_ram_with_executor_cache(MODEL_CACHE)
    model_paths.provide_toy_sample()
    if first_time:
        log.info("ip2p: InstructPix2Pix models are read from %s (also checkpoints and diffusers)", folder)


class IP2PExtension(ComfyExtension):
    async def on_load(self) -> None:
        setup()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # ComfyUI 0.8's loader calls get_node_list but never on_load, so the setup runs here too (it is
        # idempotent): the folder must exist before the loader's dropdown is first built.
        setup()
        return list(NODES)
