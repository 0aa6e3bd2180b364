"""IP2P Apply ControlNet called as ComfyUI calls it (COMFYUI_DIR): its choices, the edit it makes, its cache,
chaining, and its errors. The workflow that uses it runs on a real server in test_workflows.py."""

from __future__ import annotations

import pytest
import torch

from support import comfy_harness, tiny_controlnet

comfy_harness.import_comfyui()  # skips this module, saying why, without COMFYUI_DIR

import folder_paths  # noqa: E402

from ip2p_nodes.nodes.controlnet import IP2PApplyControlNet  # noqa: E402
from ip2p_nodes.nodes.instruction import IP2PInstruction  # noqa: E402
from ip2p_nodes.nodes.loader import IP2PModelLoader, cached_model  # noqa: E402
from ip2p_nodes.nodes.sampler import IP2PSampler  # noqa: E402
from ip2p_nodes.pipeline_core import SeedPlan, edit  # noqa: E402
from ip2p_nodes.pipeline_core.editing.control import add_control, make_control  # noqa: E402
from ip2p_nodes.pipeline_core.errors import InputError, ModelLoadError  # noqa: E402
from ip2p_nodes.pipeline_core.models.controlnet import CONTROLNET_CACHE, load_controlnet  # noqa: E402

pytestmark = pytest.mark.comfyui

TINY = "tiny-ip2p.safetensors"
CONTROLNET = "tiny_canny_fp16.safetensors"


@pytest.fixture
def env(comfy_env, tmp_path, monkeypatch, tiny_single_file, tiny_folder):
    """The comfy_env folders plus ComfyUI's controlnet folder with a tiny ControlNet in the original layout."""
    folder = tmp_path / "models" / "controlnet"
    controlnet = tiny_controlnet.make_controlnet(tiny_controlnet.unet_config_of(tiny_folder))
    tiny_controlnet.write_original_file(controlnet, folder / CONTROLNET)
    (folder / "notes.txt").write_text("not a model")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnet",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    comfy_harness.copy_into(tiny_single_file, comfy_env["instructpix2pix"], TINY)
    CONTROLNET_CACHE.clear()
    yield {**comfy_env, "controlnet": folder}
    CONTROLNET_CACHE.clear()


def _hint(h=40, w=56, seed=1):
    g = torch.Generator().manual_seed(seed)
    blocks = (torch.rand(1, 1, h // 8, w // 8, generator=g) > 0.7).float()
    return torch.nn.functional.interpolate(blocks, scale_factor=8).permute(0, 2, 3, 1).expand(1, h, w, 3)


def test_the_dropdown_lists_the_controlnet_files(env):
    [control_net] = [i for i in IP2PApplyControlNet.GET_SCHEMA().inputs if i.id == "control_net"]
    assert control_net.options == [CONTROLNET]


def test_the_node_steers_the_samplers_edit_as_the_core_does_and_loads_the_file_once(env):
    model = IP2PModelLoader.execute(TINY, "", "fp32")[0]
    cond = IP2PInstruction.execute(model, "make it winter", "")[0]
    image, hint = comfy_harness.picture(40, 56), _hint()
    controlled = IP2PApplyControlNet.execute(cond, CONTROLNET, hint, 0.8, 0.0, 1.0)[0]
    again = IP2PApplyControlNet.execute(cond, CONTROLNET, hint, 0.8, 0.0, 1.0)[0]
    assert CONTROLNET_CACHE.loads == 1 and again.controls[0].controlnet is controlled.controls[0].controlnet
    assert cond.controls == ()  # the instruction's own output is not changed for other branches of the graph

    steered = IP2PSampler.execute(model, controlled, image, 5, 2, 7.5, 1.5, "euler_ancestral")[0]
    plain = IP2PSampler.execute(model, cond, image, 5, 2, 7.5, 1.5, "euler_ancestral")[0]
    core_model = cached_model(model)
    core = edit(core_model, add_control(cond, make_control(
        load_controlnet(env["controlnet"] / CONTROLNET, core_model), hint, 0.8)), image, SeedPlan.single(5), steps=2,
        text_guidance=7.5, image_guidance=1.5, scheduler="euler_ancestral")
    assert torch.equal(steered.cpu(), core.images)
    assert (steered - plain).abs().max() > 0.02

    off = IP2PApplyControlNet.execute(cond, CONTROLNET, hint, 0.0, 0.0, 1.0)[0]
    assert torch.equal(IP2PSampler.execute(model, off, image, 5, 2, 7.5, 1.5, "euler_ancestral")[0], plain)


def test_comfyuis_free_memory_drops_the_loaded_controlnets(env, monkeypatch, caplog):
    import execution

    from ip2p_nodes.nodes import extension

    monkeypatch.setattr(execution.PromptExecutor, "reset", execution.PromptExecutor.reset)
    extension.setup()  # hooks the executor's reset, as when ComfyUI loads the pack
    model = IP2PModelLoader.execute(TINY, "", "fp32")[0]
    cond = IP2PInstruction.execute(model, "make it winter", "")[0]
    IP2PApplyControlNet.execute(cond, CONTROLNET, _hint(), 1.0, 0.0, 1.0)
    assert len(CONTROLNET_CACHE) == 1
    execution.PromptExecutor(server=None)  # what ComfyUI's worker runs for "free memory"
    assert len(CONTROLNET_CACHE) == 0
    assert "released 1 ControlNet(s) from RAM" in caplog.text


def test_apply_controlnet_nodes_chain(env):
    model = IP2PModelLoader.execute(TINY, "", "fp32")[0]
    cond = IP2PInstruction.execute(model, "make it winter", "")[0]
    first = IP2PApplyControlNet.execute(cond, CONTROLNET, _hint(seed=1), 1.0, 0.0, 0.5)[0]
    both = IP2PApplyControlNet.execute(first, CONTROLNET, _hint(seed=2), 0.5, 0.5, 1.0)[0]
    assert [(c.strength, c.start, c.end) for c in both.controls] == [(1.0, 0.0, 0.5), (0.5, 0.5, 1.0)]


def test_a_missing_or_wrong_file_is_named_in_the_error(env, tiny_single_file):
    model = IP2PModelLoader.execute(TINY, "", "fp32")[0]
    cond = IP2PInstruction.execute(model, "make it winter", "")[0]
    with pytest.raises(ModelLoadError, match="gone.safetensors: not found in the controlnet folders"):
        IP2PApplyControlNet.execute(cond, "gone.safetensors", _hint(), 1.0, 0.0, 1.0)
    comfy_harness.copy_into(tiny_single_file, env["controlnet"], "not_a_controlnet.safetensors")
    with pytest.raises(InputError, match="not_a_controlnet.safetensors: a full Stable Diffusion checkpoint"):
        IP2PApplyControlNet.execute(cond, "not_a_controlnet.safetensors", _hint(), 1.0, 0.0, 1.0)
    with pytest.raises(InputError, match="expected IP2P conditioning"):
        IP2PApplyControlNet.execute("make it winter", CONTROLNET, _hint(), 1.0, 0.0, 1.0)
