"""The four nodes called as ComfyUI calls them, in this process, against a real ComfyUI checkout (COMFYUI_DIR).

Covers what a user meets on the canvas: the loader's choices and refusals, errors on bad input, pictures of
any size and channel count, seed plans, Cancel, and the models' life under ComfyUI's memory manager
("Unload models", eviction). Registration is checked through ComfyUI's own custom-node loader.
"""

from __future__ import annotations

import asyncio
import math
import socket
import sys
from pathlib import Path

import pytest
import torch

from support import comfy_harness, lora_files, tiny_models
from support.comfy_harness import picture

comfy_harness.import_comfyui()  # skips this module, saying why, without COMFYUI_DIR

import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from ip2p_nodes.nodes import extension, memory, model_paths  # noqa: E402
from ip2p_nodes.nodes.instruction import IP2PInstruction  # noqa: E402
from ip2p_nodes.nodes.loader import IP2PModelLoader  # noqa: E402
from ip2p_nodes.nodes.lora import IP2PLoraLoader  # noqa: E402
from ip2p_nodes.nodes.sampler import IP2PSampler  # noqa: E402
from ip2p_nodes.nodes.seed_plan import IP2PSeedPlan  # noqa: E402
from ip2p_nodes.pipeline_core import MODEL_CACHE  # noqa: E402
from ip2p_nodes.pipeline_core.errors import InputError, ModelLoadError  # noqa: E402
from ip2p_nodes.pipeline_core.models.loading import save_single_file  # noqa: E402
from ip2p_nodes.pipeline_core.training.toy import TOY_MODEL_CHOICE, toy_model_path  # noqa: E402

pytestmark = pytest.mark.comfyui

OUR_NODE_IDS = {"IP2PModelLoader", "IP2PLoraLoader", "IP2PInstruction", "IP2PSampler", "IP2PSeedPlan",
                "IP2PImageGrid", "IP2PApplyControlNet", "IP2PClipScorerLoader", "IP2PEditScore", "IP2PPickBest"}
TINY = "tiny-ip2p.safetensors"


def run(model, image, instruction="make it look like winter", seed=5, steps=2, s_t=7.5, s_i=1.5, plan=None):
    cond = IP2PInstruction.execute(model, instruction, "")[0]
    return IP2PSampler.execute(model, cond, image, seed, steps, s_t, s_i, "euler_ancestral", plan)


def ours_in_comfyui() -> dict[str, memory.IP2PModelPatcher]:
    """Our modules in ComfyUI's list of loaded models, by holder class name."""
    return {type(lm.model.model).__name__: lm.model for lm in mm.current_loaded_models
            if isinstance(lm.model, memory.IP2PModelPatcher)}


# -- loader ------------------------------------------------------------------------------------------------------


def test_loader_offers_ip2p_checkpoint_and_diffusers_models_and_loads_each(comfy_env, tiny_single_file, tiny_folder):
    comfy_harness.copy_into(tiny_single_file, comfy_env["instructpix2pix"], TINY)
    comfy_harness.copy_into(tiny_single_file, comfy_env["checkpoints"], "other.safetensors")
    comfy_harness.copy_into(tiny_folder, comfy_env["diffusers"], "tiny-folder")
    (comfy_env["checkpoints"] / "notes.txt").write_text("not a model")

    options = IP2PModelLoader.GET_SCHEMA().inputs[0].options
    # The user's own models first (a new loader node defaults to one of them), the embedded toy model last.
    assert options == [TINY, "other.safetensors", "tiny-folder", TOY_MODEL_CHOICE]

    single = IP2PModelLoader.execute(TINY, "", "fp32")[0]
    assert single.source.kind == "single_file"
    # Single files get ComfyUI's own SD1 tokenizer files, so a real SD1.5 IP2P checkpoint needs no download.
    assert single.source.tokenizer_dir == str(comfy_harness.comfyui_dir() / "comfy" / "sd1_tokenizer")
    folder = IP2PModelLoader.execute("tiny-folder", "", "fp32")[0]
    assert folder.source.kind == "diffusers" and Path(folder.source.location).name == "tiny-folder"
    assert single in MODEL_CACHE and folder in MODEL_CACHE


def test_model_folder_appends_to_an_extra_model_paths_entry(comfy_env, tmp_path, tiny_single_file):
    # extra_model_paths.yaml is applied before packs load and creates the key with no extension filter.
    user_folder = tmp_path / "nas" / "ip2p"
    comfy_harness.copy_into(tiny_single_file, user_folder, "from-yaml.safetensors")
    (user_folder / "readme.md").write_text("x")
    comfy_harness.copy_into(tiny_single_file, comfy_env["instructpix2pix"], TINY)
    folder_paths.folder_names_and_paths[model_paths.IP2P_FOLDER] = ([str(user_folder)], set())

    extension.setup()
    extension.setup()  # idempotent: ComfyUI may build the node list more than once

    paths, extensions = folder_paths.folder_names_and_paths[model_paths.IP2P_FOLDER]
    assert paths == [str(user_folder), str(comfy_env["instructpix2pix"])]
    assert ".safetensors" in extensions
    assert model_paths.list_choices() == ["from-yaml.safetensors", TINY, TOY_MODEL_CHOICE]


def test_loader_refuses_a_4_channel_checkpoint_naming_the_file(comfy_env):
    unet, vae, te, _ = tiny_models.make_components(in_channels=4)
    save_single_file((unet, vae, te), comfy_env["checkpoints"] / "sd15-plain.safetensors")
    with pytest.raises(ModelLoadError, match=r"sd15-plain\.safetensors: UNet has 4 input channels") as err:
        IP2PModelLoader.execute("sd15-plain.safetensors", "", "fp32")
    assert "pick an IP2P checkpoint" in str(err.value)


def test_with_no_model_of_their_own_the_loader_offers_the_toy_model_and_it_edits_the_sample(comfy_env):
    from ip2p_nodes.pipeline_core.editing.images import load_image
    from ip2p_nodes.pipeline_core.training.evaluation import rule_check
    from ip2p_nodes.pipeline_core.training.toy import SAMPLE_INSTRUCTION, sample_image_path, sample_triplet

    options = IP2PModelLoader.GET_SCHEMA().inputs[0].options
    assert options == [TOY_MODEL_CHOICE]  # the only entry, hence the default of a new loader node

    model = IP2PModelLoader.execute(TOY_MODEL_CHOICE, "", "auto")[0]
    assert model.source.kind == "single_file" and Path(model.source.location) == toy_model_path()
    # Its own word-level vocabulary, not ComfyUI's SD1 tokenizer: "circle" is one token.
    tokenizer = MODEL_CACHE.get(model).components.tokenizer
    assert len(tokenizer("circle", add_special_tokens=False).input_ids) == 1

    sample = load_image(sample_image_path())
    edited = run(model, sample, SAMPLE_INSTRUCTION, seed=42, steps=20, s_t=3.0, s_i=1.5)[0]
    assert edited.shape == sample.shape == (1, 32, 32, 3)
    ok, why = rule_check(sample_triplet(), edited[0].numpy())
    assert ok, why


def test_loader_with_nothing_picked_says_where_to_put_a_model(comfy_env):
    with pytest.raises(ModelLoadError, match=r"no model picked: copy an InstructPix2Pix checkpoint .*"
                                             r"models/instructpix2pix.*then refresh \(R\) and pick it"):
        IP2PModelLoader.execute("", "", "auto")


def test_typing_toy_loads_the_embedded_model_as_the_choice_does(comfy_env):
    assert IP2PModelLoader.execute("", "toy", "fp32")[0] == IP2PModelLoader.execute(TOY_MODEL_CHOICE, "", "fp32")[0]


def test_a_typed_path_that_does_not_exist_is_not_looked_up_on_the_hub(comfy_env, monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("the network was used"))
    with pytest.raises(ModelLoadError, match=r"models/ip2p: no such file or folder .*not looked up on the Hugging "
                                             r"Face Hub.*Check the path"):
        IP2PModelLoader.execute("", "models/ip2p", "fp32")


def test_loader_reports_a_vanished_file(comfy_env):
    with pytest.raises(ModelLoadError, match=r"gone\.safetensors: not found in the model folders.*refresh \(R\) and "
                                             r"pick another model"):
        IP2PModelLoader.execute("gone.safetensors", "", "fp32")


def test_single_file_loads_offline_with_comfyuis_own_tokenizer(comfy_env, monkeypatch):
    """A checkpoint without tokenizer files (like the real one) uses comfy/sd1_tokenizer; no network is touched."""
    from transformers import CLIPTextConfig, CLIPTextModel

    unet, vae, _, _ = tiny_models.make_components(seed=1)
    torch.manual_seed(1)
    # CLIP-L's vocabulary size, so ComfyUI's SD1 tokenizer fits; everything else tiny.
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406,
                                      eos_token_id=49407, pad_token_id=49407))
    save_single_file((unet, vae, te), comfy_env["instructpix2pix"] / "no-tokenizer.safetensors")

    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in this test (tried {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))

    key = IP2PModelLoader.execute("no-tokenizer.safetensors", "", "fp32")[0]
    tokenizer = MODEL_CACHE.get(key).components.tokenizer
    assert len(tokenizer) == 49408
    assert tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]  # CLIP-L's real ids for "a cat"
    image, _, _ = run(key, picture(), steps=1)
    assert image.shape == (1, 37, 53, 3)
    assert attempts == []


# -- instruction ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n "])
def test_empty_instruction_is_refused_with_an_example(tiny, text):
    with pytest.raises(InputError, match="instruction is empty.*e.g."):
        IP2PInstruction.execute(tiny, text, "")


def test_conditioning_from_another_model_is_refused(tiny, comfy_env, tiny_folder):
    comfy_harness.copy_into(tiny_folder, comfy_env["diffusers"], "tiny-folder")
    other = IP2PModelLoader.execute("tiny-folder", "", "fp32")[0]
    cond = IP2PInstruction.execute(other, "make it red", "")[0]
    with pytest.raises(InputError, match="connect the same model to both nodes"):
        IP2PSampler.execute(tiny, cond, picture(), 1, 2, 7.5, 1.5, "euler_ancestral", None)


# -- LoRA ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def lora_in_folder(comfy_env, tiny_folder, tmp_path):
    """A random LoRA for the tiny model in models/loras, in diffusers format and as a kohya copy in a subfolder."""
    lora = lora_files.write_diffusers_lora(tiny_folder, tmp_path / "made", seed=4)
    comfy_harness.copy_into(lora.path, comfy_env["loras"], "style.safetensors")
    (comfy_env["loras"] / "kohya").mkdir()
    lora_files.write_kohya_lora(lora, comfy_env["loras"] / "kohya" / "style-kohya.safetensors")
    return lora


def test_lora_node_lists_the_loras_folder_and_chains(tiny, lora_in_folder):
    from ip2p_nodes.pipeline_core import LoraRef, SeedPlan, edit, encode_instruction

    choices = IP2PLoraLoader.GET_SCHEMA().inputs[1].options
    assert set(choices) == {"style.safetensors", "kohya/style-kohya.safetensors"}
    base_image = run(tiny, picture())[0]
    styled = IP2PLoraLoader.execute(tiny, "style.safetensors", 0.8)[0]
    stacked = IP2PLoraLoader.execute(styled, "kohya/style-kohya.safetensors", -0.3)[0]
    assert [ref.strength for ref in stacked.loras] == [0.8, -0.3]
    image = run(stacked, picture())[0]
    assert not torch.equal(image, base_image)
    # The node's picture is the API's picture for the same stack (the kohya copy is the same LoRA: 0.8 - 0.3).
    model = MODEL_CACHE.get(tiny.with_lora(LoraRef.of(lora_in_folder.path, 0.5)))
    api = edit(model, encode_instruction(model, "make it look like winter"), picture(), SeedPlan.single(5), steps=2,
               text_guidance=7.5, image_guidance=1.5, scheduler="euler_ancestral").images
    assert (image - api).abs().max().item() < 1e-5


def test_new_lora_strengths_reuse_the_loaded_base_and_unload_keeps_them_working(tiny, lora_in_folder):
    run(tiny, picture(16, 16), steps=1)
    unet_size = ours_in_comfyui()["IP2PUNet"].model_size()
    loads = MODEL_CACHE.loads
    outs = [run(IP2PLoraLoader.execute(tiny, "style.safetensors", s)[0], picture())[0] for s in (1.0, 0.5, 1.0)]
    assert MODEL_CACHE.loads == loads, "a strength change must not read the base weights again"
    assert ours_in_comfyui()["IP2PUNet"].model_size() > unet_size, "ComfyUI's budget counts the adapters"
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])
    assert torch.equal(run(IP2PLoraLoader.execute(tiny, "style.safetensors", 0.0)[0], picture())[0],
                       run(tiny, picture())[0])
    mm.unload_all_models()  # the adapters live in the modules, so they leave and come back with them
    assert torch.equal(run(IP2PLoraLoader.execute(tiny, "style.safetensors", 1.0)[0], picture())[0], outs[0])


def test_lora_node_refuses_a_lora_of_another_model_before_sampling(tiny, comfy_env, sdxl_folder, tmp_path):
    lora = lora_files.write_diffusers_lora(sdxl_folder, tmp_path / "xl", sdxl=True)
    comfy_harness.copy_into(lora.path, comfy_env["loras"], "xl.safetensors")
    with pytest.raises(InputError, match=r"xl\.safetensors: \d+ of its \d+ LoRA layers fit this SD1\.x"):
        IP2PLoraLoader.execute(tiny, "xl.safetensors", 1.0)
    assert run(tiny, picture(16, 16), steps=1)[0].shape == (1, 16, 16, 3)


def test_instruction_encoded_without_the_lora_still_samples_with_it(tiny, lora_in_folder):
    styled = IP2PLoraLoader.execute(tiny, "style.safetensors", 1.0)[0]
    cond = IP2PInstruction.execute(tiny, "make it look like winter", "")[0]
    image = IP2PSampler.execute(styled, cond, picture(), 5, 2, 7.5, 1.5, "euler_ancestral", None)[0]
    assert not torch.equal(image, run(tiny, picture())[0])


# -- sampler -------------------------------------------------------------------------------------------------------


def test_odd_size_rgba_and_grey_pictures_come_out_at_the_input_size(tiny):
    rgb = picture(37, 53)
    image, latent, labels = run(tiny, rgb)
    assert image.shape == (1, 37, 53, 3)
    assert latent["samples"].shape == (1, 4, 5, 7)  # the padded 40x56 area in VAE space
    assert labels == "seed 5 · text 7.5 · image 1.5"

    # Alpha is not a colour: an RGBA picture edits exactly like its RGB part.
    rgba = torch.cat([rgb, torch.rand(1, 37, 53, 1)], dim=-1)
    assert torch.equal(run(tiny, rgba)[0], image)
    # Grey is grey in all three channels.
    grey = picture(37, 53, c=1, seed=3)
    out = run(tiny, grey)[0]
    assert out.shape == (1, 37, 53, 3)
    assert torch.equal(out, run(tiny, grey.expand(-1, -1, -1, 3))[0])


def test_an_8_bit_image_is_edited_as_the_picture_not_as_white(tiny):
    eight_bit = (picture(24, 32) * 255).round().to(torch.uint8)
    assert torch.equal(run(tiny, eight_bit)[0], run(tiny, eight_bit.float() / 255)[0])


def test_integer_image_of_unknown_range_is_refused_with_the_conversion_to_make(tiny):
    with pytest.raises(InputError, match=r"dtype int64;.*\.float\(\) / 255 for 8-bit values"):
        run(tiny, torch.full((1, 24, 32, 3), 100, dtype=torch.int64))


def test_sampler_takes_integral_float_steps_and_seed(tiny):
    assert torch.equal(run(tiny, picture(24, 32), seed=5.0, steps=2.0)[0], run(tiny, picture(24, 32))[0])


@pytest.mark.parametrize("seed,match", [
    (2**70, r"seed must be between 0 and 18446744073709551615, got \d+ — pick a seed"),
    (2.5, r"seed must be a whole number, got 2\.5"),
])
def test_sampler_refuses_a_seed_torch_cannot_take_naming_the_range(tiny, seed, match):
    with pytest.raises(InputError, match=match):
        run(tiny, picture(24, 32), seed=seed)


def test_seed_plan_takes_an_integral_float_count_and_refuses_what_torch_cannot_take():
    plan, report = IP2PSeedPlan.execute(7, 3.0, "increment", "", "")
    assert [item.seed for item in plan.items] == [7, 8, 9]
    with pytest.raises(InputError, match=r"count \(how many seeds\) must be a whole number, got 2\.5"):
        IP2PSeedPlan.execute(0, 2.5, "increment", "", "")
    with pytest.raises(InputError, match=r"seed must be between 0 and 18446744073709551615, got \d+ — pick a seed"):
        IP2PSeedPlan.execute(2**70, 2, "increment", "", "")


def test_a_one_pixel_picture_is_edited_with_a_warning(tiny, caplog):
    assert run(tiny, picture(1, 1))[0].shape == (1, 1, 1, 3)
    assert "only 1x1 pixels; below 16 px on a side" in caplog.text


def test_plan_with_guidance_lists_gives_every_combination_with_labels(tiny):
    plan, report = IP2PSeedPlan.execute(10, 2, "increment", "5, 9", "")
    assert report.splitlines() == [
        "#0 seed=10 text_guidance=5", "#1 seed=10 text_guidance=9",
        "#2 seed=11 text_guidance=5", "#3 seed=11 text_guidance=9",
    ]
    images = picture(24, 40, batch=2, seed=1)
    out, latent, labels = run(tiny, images, plan=plan)
    assert out.shape == (8, 24, 40, 3) and latent["samples"].shape[0] == 8
    lines = labels.splitlines()
    assert lines[:2] == ["input 1 · seed 10 · text 5 · image 1.5", "input 1 · seed 10 · text 9 · image 1.5"]
    assert lines[7] == "input 2 · seed 11 · text 9 · image 1.5"
    # Any item is re-made from its own label alone, outside the batch.
    alone = run(tiny, images[1:], seed=11, s_t=9.0)[0]
    assert (alone[0] - out[7]).abs().max().item() < 1e-5


def test_random_plan_reruns_every_queue_and_reports_the_drawn_seeds():
    plans = [IP2PSeedPlan.execute(0, 3, "random", "", "") for _ in range(2)]
    for plan, report in plans:
        assert report.splitlines() == [f"#{i} seed={item.seed}" for i, item in enumerate(plan.items)]
    assert [i.seed for i in plans[0][0].items] != [i.seed for i in plans[1][0].items]
    # ComfyUI re-runs a node whose fingerprint differs from the last one; NaN never equals itself.
    fingerprint = IP2PSeedPlan.fingerprint_inputs(seed=0, count=3, mode="random", text_guidance_values="",
                                                  image_guidance_values="")
    assert math.isnan(fingerprint)
    assert IP2PSeedPlan.fingerprint_inputs(mode="increment") == IP2PSeedPlan.fingerprint_inputs(mode="increment")


@pytest.mark.parametrize("text,reason", [
    ("5, seven", "'seven' is not a number"),
    ("7.5; 45", "45 is outside the useful range"),
])
def test_bad_guidance_list_text_is_refused_with_its_reason(text, reason):
    with pytest.raises(InputError, match=reason):
        IP2PSeedPlan.execute(0, 2, "increment", text, "")
    with pytest.raises(InputError, match=reason):
        IP2PSeedPlan.execute(0, 2, "increment", "", text)


def test_cancel_stops_inside_the_next_unet_call_and_the_next_run_works(tiny, monkeypatch):
    image = picture(24, 32)
    reference = run(tiny, image, steps=6)[0]

    reported, unet_calls, armed = [], {"started": 0, "finished": 0}, [True]
    unet = MODEL_CACHE.get(tiny).components.unet
    handles = [
        unet.register_forward_pre_hook(lambda *a: unet_calls.__setitem__("started", unet_calls["started"] + 1)),
        unet.register_forward_hook(lambda *a: unet_calls.__setitem__("finished", unet_calls["finished"] + 1)),
    ]

    def progress_hook(value, total, preview, prompt_id=None, node_id=None):
        reported.append((value, total))
        if value == 3 and armed[0]:
            mm.interrupt_current_processing()  # what the Cancel button does

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", progress_hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(tiny, image, steps=6)
        # Cancel came after step 3: step 4's UNet call began and stopped at its first block, not at its end.
        assert reported == [(1, 6), (2, 6), (3, 6)]
        assert unet_calls == {"started": 4, "finished": 3}
        assert not mm.processing_interrupted()
    finally:
        for handle in handles:
            handle.remove()
        armed[0] = False
    assert not any(m._forward_pre_hooks for m in unet.down_blocks)
    assert torch.equal(run(tiny, image, steps=6)[0], reference)


# -- ComfyUI memory manager -----------------------------------------------------------------------------------------


def test_unload_models_releases_our_modules_and_the_next_run_reloads_them(tiny, caplog):
    first = run(tiny, picture())[0]
    loaded = ours_in_comfyui()
    assert set(loaded) == {"IP2PUNet", "IP2PVAE", "IP2PTextEncoder"}
    assert all(p.loaded_size() == p.model_size() > 0 for p in loaded.values())

    mm.unload_all_models()  # "Unload models" / POST /free
    assert ours_in_comfyui() == {}
    assert all(p.loaded_size() == 0 for p in loaded.values())
    assert "ComfyUI unloaded IP2PUNet" in caplog.text

    again = run(tiny, picture())[0]
    assert {"IP2PUNet", "IP2PVAE"} <= set(ours_in_comfyui())  # the text encoding was cached, the rest reloaded
    assert torch.equal(again, first)


def test_a_model_dropped_from_the_cache_leaves_comfyuis_list(tiny):
    run(tiny, picture(16, 16), steps=1)
    assert ours_in_comfyui()
    assert MODEL_CACHE.evict(tiny)
    assert ours_in_comfyui() == {}


def test_partial_loads_move_whole_modules(tiny):
    """Plain torch layers cannot run half-offloaded, so ComfyUI's lowvram partial load must load them fully."""
    run(tiny, picture(16, 16), steps=1)
    patcher = ours_in_comfyui()["IP2PUNet"]
    assert patcher.partially_unload(patcher.offload_device, memory_to_free=1) == 0
    patcher.detach()
    assert patcher.loaded_size() == 0
    patcher.partially_load(patcher.load_device, extra_memory=1)
    assert patcher.loaded_size() == patcher.model_size()
    assert not patcher.model.model_lowvram


# -- registration through ComfyUI's loader --------------------------------------------------------------------------


def test_comfyui_custom_node_loader_registers_exactly_our_nodes(tmp_path, comfy_env, monkeypatch):
    import nodes as comfy_nodes

    assert Path(comfy_nodes.__file__).resolve() == comfy_harness.comfyui_dir() / "nodes.py"
    for name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "LOADED_MODULE_DIRS"):
        monkeypatch.setattr(comfy_nodes, name, dict(getattr(comfy_nodes, name)))
    before = set(comfy_nodes.NODE_CLASS_MAPPINGS)

    # Any folder name works (users rename clones); this one cannot be imported by name, only relatively.
    pack = comfy_harness.link_pack(tmp_path / "custom_nodes", "ComfyUI-IP2P.renamed-clone")
    assert asyncio.run(comfy_nodes.load_custom_node(str(pack), ignore=before))

    assert set(comfy_nodes.NODE_CLASS_MAPPINGS) - before == OUR_NODE_IDS
    assert {k: comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS[k] for k in OUR_NODE_IDS} == {
        "IP2PModelLoader": "IP2P Load Model",
        "IP2PLoraLoader": "IP2P Load LoRA",
        "IP2PInstruction": "IP2P Instruction",
        "IP2PSampler": "IP2P Dual-Guidance Sampler",
        "IP2PSeedPlan": "IP2P Seed Batch",
        "IP2PImageGrid": "IP2P Labelled Grid",
        "IP2PApplyControlNet": "IP2P Apply ControlNet",
        "IP2PClipScorerLoader": "IP2P Load CLIP Scorer",
        "IP2PEditScore": "IP2P Edit Score",
        "IP2PPickBest": "IP2P Pick Best",
    }
    for node_id in OUR_NODE_IDS:
        schema = comfy_nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()
        assert schema.category == "InstructPix2Pix" and schema.description
        missing = [i.id for i in schema.inputs if not i.tooltip]
        missing += [o.display_name for o in schema.outputs if not o.tooltip]
        assert missing == [], f"{node_id}: no tooltip on {missing}"
    # The pack's setup ran in the loaded copy: the model folder is registered.
    assert model_paths.IP2P_FOLDER in folder_paths.folder_names_and_paths
    assert sys.modules["nodes"] is comfy_nodes


def test_loading_the_pack_provides_the_toy_demo_picture_once_and_never_overwrites(tmp_path):
    comfy_harness.import_comfyui()
    import folder_paths

    from ip2p_nodes.pipeline_core.training.toy import SAMPLE_IMAGE_NAME, sample_image_path

    previous = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        assert model_paths.provide_toy_sample() == tmp_path / SAMPLE_IMAGE_NAME
        assert (tmp_path / SAMPLE_IMAGE_NAME).read_bytes() == sample_image_path().read_bytes()
        (tmp_path / SAMPLE_IMAGE_NAME).write_bytes(b"the user's own file")
        assert model_paths.provide_toy_sample() is None
        assert (tmp_path / SAMPLE_IMAGE_NAME).read_bytes() == b"the user's own file"
    finally:
        folder_paths.set_input_directory(previous)
