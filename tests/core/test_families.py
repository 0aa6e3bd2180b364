"""Model families: SD1.5 vs SDXL-IP2P vs CosXL Edit told apart from folders and single files, loaded offline,
written back in the layout ComfyUI reads, and sampled only with schedulers that fit them."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ip2p_nodes.pipeline_core import ModelSource, SeedPlan, edit, encode_instruction
from ip2p_nodes.pipeline_core.editing.resolution import working_size
from ip2p_nodes.pipeline_core.errors import InputError, ModelLoadError
from ip2p_nodes.pipeline_core.models import families, ldm_sdxl
from ip2p_nodes.pipeline_core.models.loading import load_components, save_single_file
from ip2p_nodes.pipeline_core.models.precision import resolve_precision
from support import tiny_sdxl

FP32 = resolve_precision("fp32", "cpu")
CONFIGS = Path(__file__).parents[2] / "pipeline_core" / "models" / "configs"


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a network connection fails loudly (and is recorded)."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in this test (tried {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return attempts


def _folder_family(folder: Path) -> str:
    read = lambda *p: json.loads(folder.joinpath(*p).read_text())  # noqa: E731
    return families.detect_folder(folder.name, read("model_index.json"), read("unet", "config.json"),
                                  read("scheduler", "scheduler_config.json")).name


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = {k for k in sa if not k.endswith("position_ids")}
    return keys == {k for k in sb if not k.endswith("position_ids")} and all(torch.equal(sa[k], sb[k]) for k in keys)


# ---------------------------------------------------------------------------------------------- detection


def test_folders_are_told_apart(tiny_folder, sdxl_folder, cosxl_folder):
    assert _folder_family(tiny_folder) == "sd15"
    assert _folder_family(sdxl_folder) == "sdxl"
    assert _folder_family(cosxl_folder) == "cosxl"


def test_folder_marked_is_cosxl_edit_samples_as_cosxl(tmp_path, sdxl_folder):
    """diffusers does not save ``is_cosxl_edit``; a folder whose scheduler was left at SDXL's can say it in
    model_index.json, and then gets CosXL's EDM v-prediction scheduler and image-latent scaling."""
    folder = shutil.copytree(sdxl_folder, tmp_path / "marked")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "is_cosxl_edit": True}))
    comps = load_components(ModelSource("diffusers", str(folder)), FP32, "cpu")
    assert comps.family == "cosxl"
    assert comps.scheduler_config["_class_name"] == "EDMEulerScheduler"
    assert comps.scheduler_config["prediction_type"] == "v_prediction"
    assert comps.spec.image_latent_scale(comps) == pytest.approx(0.13025)


def test_real_size_single_files_are_told_apart_by_shape_and_edm_keys():
    """Detection reads shapes and the edm_vpred keys only: real-size layouts on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {n: json.loads((CONFIGS / "cosxl" / f"{n}.json").read_text())
           for n in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")}
    with torch.device("meta"):
        mods = (UNet2DConditionModel.from_config(cfg["unet"]), AutoencoderKL.from_config(cfg["vae"]),
                CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])))
    cosxl = ldm_sdxl.to_ldm_state_dict(*mods, cfg["scheduler"])
    sdxl = {k: v for k, v in cosxl.items() if not k.startswith("edm_vpred.")}
    assert families.detect_checkpoint(cosxl, "cosxl_edit.safetensors").name == "cosxl"
    assert families.detect_checkpoint(sdxl, "sdxl-ip2p.safetensors").name == "sdxl"
    facts = families.checkpoint_facts(sdxl)
    assert facts == {"in_channels": 8, "context_dim": 2048, "adm_channels": 2816}


def test_unknown_sdxl_like_file_names_channels_and_context_dim(tmp_path):
    """An 8-channel UNet under SDXL's text encoders whose cross-attention does not read them (context 96, not
    32 + 48): no family claims it, and the error says what was found."""
    tiny = tiny_sdxl.make_components(seed=1)
    from diffusers import UNet2DConditionModel

    odd = UNet2DConditionModel(**{**tiny_sdxl.unet_config(), "cross_attention_dim": 96})
    path = tmp_path / "odd.safetensors"
    save_file(ldm_sdxl.to_ldm_state_dict(odd, tiny.vae, tiny.text_encoder, tiny.text_encoder_2), str(path))
    with pytest.raises(ModelLoadError) as err:
        load_components(ModelSource("single_file", str(path)), FP32, "cpu")
    message = str(err.value)
    assert "odd.safetensors" in message and "input channels 8" in message and "context dim 96" in message
    assert "CosXL Edit" in message and "SDXL InstructPix2Pix" in message  # what is supported


def test_unknown_folder_names_channels_and_context_dim():
    with pytest.raises(ModelLoadError, match=r"input channels 8, cross-attention dim 1024"):
        families.detect_folder("weird", {"text_encoder_3": ["x", "y"]}, {"in_channels": 8, "cross_attention_dim": 1024},
                               {})


# ---------------------------------------------------------------------------------------------- single files


@pytest.mark.parametrize("folder_fixture,family", [("sdxl_folder", "sdxl"), ("cosxl_folder", "cosxl")])
def test_single_file_written_from_a_folder_loads_offline_as_the_same_model(request, tmp_path, no_network,
                                                                           folder_fixture, family):
    folder = request.getfixturevalue(folder_fixture)
    source = load_components(ModelSource("diffusers", str(folder)), FP32, "cpu")
    path = save_single_file(source, tmp_path / f"{family}.safetensors", tokenizer_dir=folder / "_tok")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert (ldm_sdxl.EDM_SIGMA_MAX in keys) == (family == "cosxl")
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in keys)
    loaded = load_components(ModelSource("single_file", str(path)), FP32, "cpu")
    assert loaded.family == family
    for role in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert _states_equal(getattr(loaded, role), getattr(source, role)), role
    assert loaded.scheduler_config["_class_name"] == source.scheduler_config["_class_name"]
    if family == "cosxl":
        assert loaded.scheduler_config["sigma_max"] == pytest.approx(120.0)
        assert loaded.scheduler_config["sigma_min"] == pytest.approx(0.002)
    assert loaded.tokenizer_2.pad_token_id == 0 and loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id
    assert no_network == []


def test_single_sdxl_file_finds_both_tokenizers_in_one_local_clip_folder(tmp_path, sdxl_folder, no_network):
    """A file with no tokenizer of its own (as every real SDXL file): CLIP-L's and CLIP-G's tokenizers both come
    from the one SD1 tokenizer folder (ComfyUI's comfy/sd1_tokenizer); CLIP-G's pads with id 0."""
    source = load_components(ModelSource("diffusers", str(sdxl_folder)), FP32, "cpu")
    path = save_single_file(source, tmp_path / "no-tokenizer.safetensors")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_components(ModelSource("single_file", str(path)), FP32, "cpu")
    loaded = load_components(ModelSource("single_file", str(path), tokenizer_dir=str(sdxl_folder / "_tok")), FP32,
                             "cpu")
    ids = loaded.tokenizer_2("a b", padding="max_length", max_length=77).input_ids
    assert ids[-1] == 0 and loaded.tokenizer("a b", padding="max_length", max_length=77).input_ids[-1] != 0
    assert no_network == []


def test_sdxl_file_without_embedded_configs_reads_with_the_shipped_real_size_configs(tmp_path, sdxl_folder):
    """No metadata (a real file): the shipped SDXL configs are used, so tiny weights must not fit them."""
    source = load_components(ModelSource("diffusers", str(sdxl_folder)), FP32, "cpu")
    path = tmp_path / "sdxl-ip2p.safetensors"
    save_file(source.spec.checkpoint_state(source.modules(), source.scheduler_config), str(path))
    with pytest.raises(ModelLoadError, match="do not fit an SDXL InstructPix2Pix model"):
        load_components(ModelSource("single_file", str(path), tokenizer_dir=str(sdxl_folder / "_tok")), FP32, "cpu")


def test_save_single_file_from_bare_modules_picks_the_family(tmp_path):
    tiny = tiny_sdxl.make_components(seed=2)
    mods = (tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2)
    for name, kwargs in (("sdxl", {}), ("cosxl", {"scheduler_config": tiny_sdxl.COSXL_SCHEDULER_CONFIG}),
                         ("cosxl", {"family": "cosxl"})):
        path = save_single_file(mods, tmp_path / f"{name}.safetensors", **kwargs)
        with safe_open(str(path), "pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        assert families.detect_checkpoint(state, path.name).name == name


# ---------------------------------------------------------------------------------------------- sampling


def test_cosxl_scheduler_names_map_to_edm_schedulers(cosxl_model):
    c = cosxl_model.components
    spec = c.spec
    made = {name: spec.make_scheduler(name, c.scheduler_config) for name in ("auto", "euler", "dpmpp_2m",
                                                                             "dpmpp_2m_karras")}
    assert type(made["auto"]).__name__ == type(made["euler"]).__name__ == "EDMEulerScheduler"
    assert made["euler"].config.sigma_schedule == "exponential"  # ComfyUI's "normal" for continuous EDM
    assert type(made["dpmpp_2m"]).__name__ == "EDMDPMSolverMultistepScheduler"
    assert made["dpmpp_2m"].config.sigma_schedule == "exponential"
    assert made["dpmpp_2m_karras"].config.sigma_schedule == "karras"
    for s in made.values():
        assert s.config.prediction_type == "v_prediction" and s.config.sigma_data == 1.0
        assert s.config.sigma_max == pytest.approx(120.0)
    for name in ("euler_ancestral", "ddim", "unipc"):
        with pytest.raises(InputError, match=r"CosXL Edit.*auto, euler, dpmpp_2m, dpmpp_2m_karras"):
            spec.make_scheduler(name, c.scheduler_config)


def test_cosxl_edit_refuses_a_scheduler_it_cannot_honour_before_any_work(cosxl_model):
    cond = encode_instruction(cosxl_model, "make it red")
    with pytest.raises(InputError, match="euler_ancestral"):
        edit(cosxl_model, cond, torch.rand(1, 32, 32, 3), SeedPlan.single(1), steps=2, scheduler="euler_ancestral")


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "dpmpp_2m_karras"])
def test_cosxl_samples_with_dpmpp(cosxl_model, scheduler):
    cond = encode_instruction(cosxl_model, "make it red")
    img = torch.rand(1, 32, 40, 3, generator=torch.Generator().manual_seed(0))
    out = edit(cosxl_model, cond, img, SeedPlan.single(1), steps=3, text_guidance=5.0, scheduler=scheduler).images
    assert out.shape == (1, 32, 40, 3) and torch.isfinite(out).all()


def test_sdxl_auto_is_the_folders_euler_and_defaults_are_the_cards(sdxl_model, cosxl_model):
    c = sdxl_model.components
    assert c.spec.resolve_scheduler("auto", c.scheduler_config) == "euler"
    assert c.spec.default_guidance == (3.0, 1.5)
    assert cosxl_model.components.spec.default_guidance == (5.0, 1.5)
    shipped = {f: json.loads((CONFIGS / f / "unet.json").read_text())["sample_size"] * 8 for f in ("sdxl", "cosxl")}
    assert shipped == {"sdxl": 768, "cosxl": 1024}  # single files: SDXL-IP2P-768 at 768², CosXL at 1024²


def test_size_ids_reach_a_bf16_unet_unrounded(sdxl_folder, monkeypatch):
    """Original size (the picture's own), crop (0, 0), target (the working size) go to the UNet in float32: in
    bf16, 1023 would become 1024 before the UNet embeds it."""
    from ip2p_nodes.pipeline_core import ModelCache

    cache = ModelCache()
    model = cache.get(cache.key_for(ModelSource("diffusers", str(sdxl_folder)), "bf16", "cpu"))
    unet = model.components.unet
    seen, forward = [], unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: seen.append(k["added_cond_kwargs"]) or forward(*a, **k))
    img = torch.rand(1, 1023, 777, 3, generator=torch.Generator().manual_seed(0))
    out = edit(model, encode_instruction(model, "make it red"), img, SeedPlan.single(1), steps=1,
               working_resolution=64)
    assert out.images.shape == (1, 1023, 777, 3)
    time_ids = seen[0]["time_ids"]
    assert time_ids.dtype == torch.float32
    work = working_size(1023, 777, model.components.working_resolution, 64)  # 73 x 56
    assert time_ids.tolist() == [[1023.0, 777.0, 0.0, 0.0, work.content_height, work.content_width]] * 3


def test_sdxl_folder_without_tokenizer_2_pads_clip_g_with_id_zero(tmp_path, sdxl_folder):
    """A folder fetched without tokenizer_2/ (older download patterns) still gets CLIP-G's padding right."""
    folder = shutil.copytree(sdxl_folder, tmp_path / "no-tok2")
    shutil.rmtree(folder / "tokenizer_2")
    comps = load_components(ModelSource("diffusers", str(folder)), FP32, "cpu")
    full = load_components(ModelSource("diffusers", str(sdxl_folder)), FP32, "cpu")
    text = "a b"
    assert comps.tokenizer_2(text, padding="max_length", max_length=77).input_ids == full.tokenizer_2(
        text, padding="max_length", max_length=77).input_ids
    assert comps.tokenizer_2.pad_token_id == 0
