"""RAM of the pack's models under ComfyUI's "free memory", in this process, against a real ComfyUI checkout.

ComfyUI's worker resets its executor cache for ``POST /free {"free_memory": true}`` ("Unload Models and
Execution Cache"): core's models lose their last reference there. Ours must go at the same moment, and only
then: plain unloading (eviction for another model, "Unload Models") keeps the CPU copy, so a GPU user's next
run needs no disk read. The server test (RSS going down) is in test_server.py.
"""

from __future__ import annotations

import pytest
import torch

from support import comfy_harness

comfy_harness.import_comfyui()  # skips this module, saying why, without COMFYUI_DIR

import comfy.model_management as mm  # noqa: E402
import execution  # noqa: E402

from ip2p_nodes.nodes import extension, memory  # noqa: E402
from ip2p_nodes.nodes.instruction import IP2PInstruction  # noqa: E402
from ip2p_nodes.nodes.loader import IP2PModelLoader  # noqa: E402
from ip2p_nodes.nodes.sampler import IP2PSampler  # noqa: E402
from ip2p_nodes.pipeline_core import MODEL_CACHE  # noqa: E402
from ip2p_nodes.pipeline_core.models.assets import TOY_MODEL_CHOICE  # noqa: E402

pytestmark = pytest.mark.comfyui


@pytest.fixture
def pack(monkeypatch):
    """The pack set up as ComfyUI sets it up; ComfyUI's executor and the shared cache restored afterwards."""
    monkeypatch.setattr(execution.PromptExecutor, "reset", execution.PromptExecutor.reset)
    previous = MODEL_CACHE.residency
    MODEL_CACHE.clear()
    extension.setup()
    yield
    MODEL_CACHE.clear()
    MODEL_CACHE.residency = previous


def edit_toy(seed: int = 3) -> torch.Tensor:
    model = IP2PModelLoader.execute(TOY_MODEL_CHOICE, "", "fp32")[0]
    cond = IP2PInstruction.execute(model, "make the circle red", "")[0]
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    return IP2PSampler.execute(model, cond, image, seed, 2, 3.0, 1.5, "auto")[0]


def ours_in_comfyui() -> list[str]:
    loaded = mm.current_loaded_models
    return [type(m.model.model).__name__ for m in loaded if isinstance(m.model, memory.IP2PModelPatcher)]


def test_executor_cache_reset_drops_our_models_and_the_next_run_reloads_the_same_picture(pack, caplog):
    first = edit_toy()
    loads = MODEL_CACHE.loads
    assert len(MODEL_CACHE) == 1 and ours_in_comfyui()

    execution.PromptExecutor(server=None)  # what ComfyUI's worker runs for "free memory": a reset executor cache
    assert len(MODEL_CACHE) == 0 and ours_in_comfyui() == []
    assert "ComfyUI freed its caches: released toy-ip2p.safetensors (fp32, cpu)" in caplog.text

    again = edit_toy()
    assert MODEL_CACHE.loads == loads + 1  # read from disk again ...
    assert torch.equal(again, first)  # ... with the same weights


def test_unloading_alone_keeps_the_cpu_copy(pack):
    """Eviction to make room, "Unload Models", an OOM: ComfyUI unloads, and the weights stay in RAM."""
    first = edit_toy()
    loads = MODEL_CACHE.loads
    mm.unload_all_models()
    assert ours_in_comfyui() == [] and len(MODEL_CACHE) == 1
    assert torch.equal(edit_toy(), first)
    assert MODEL_CACHE.loads == loads


def test_the_hook_is_installed_once_however_often_the_pack_is_set_up(pack):
    hooked = execution.PromptExecutor.reset
    extension.setup()
    extension.setup()
    assert execution.PromptExecutor.reset is hooked
    assert hooked.__wrapped__ is not None and not hasattr(hooked.__wrapped__, memory._HOOKED)



def test_low_vram_mode_follows_comfyuis_own_state_and_free_memory(pack, monkeypatch):
    from ip2p_nodes.pipeline_core.editing import vram

    residency = MODEL_CACHE.residency
    device = mm.get_torch_device()
    assert residency.free_memory(device) == mm.get_free_memory(device)
    assert not residency.low_vram_forced()
    normal = edit_toy()
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.LOW_VRAM)  # what `python main.py --lowvram` sets
    assert residency.low_vram_forced()
    model = MODEL_CACHE.get(IP2PModelLoader.execute(TOY_MODEL_CHOICE, "", "fp32")[0])
    assert vram.use_low_vram(model, "low", 16, 3) and not vram.use_low_vram(model, "normal", 16, 3)
    # On a CPU device the sampler stays in normal mode (RAM is not VRAM): the same picture as before.
    assert not vram.use_low_vram(model, "auto", 16, 3)
    assert torch.equal(edit_toy(), normal)
