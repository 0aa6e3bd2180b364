"""The SDXL/CosXL single-file layout as ComfyUI's own code reads it (COMFYUI_DIR tier; skips without a checkout).

Built on the meta device from the shipped real-architecture configs: ComfyUI recognises SDXL only by the real
UNet's shapes, and its detection reads shapes and the ``edm_vpred.*`` values, never the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support import comfy_harness

comfy_harness.import_comfyui()  # skips this module, saying why, without COMFYUI_DIR

import comfy.model_base  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.utils  # noqa: E402

from ip2p_nodes.pipeline_core.models import ldm_sdxl  # noqa: E402

CONFIGS = Path(__file__).parents[2] / "pipeline_core" / "models" / "configs"


def _real_size_state(family: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {n: json.loads((CONFIGS / family / f"{n}.json").read_text())
           for n in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te1 = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    return unet, ldm_sdxl.to_ldm_state_dict(unet, vae, te1, te2, cfg["scheduler"])


@pytest.mark.parametrize("family,model_type", [("sdxl", comfy.model_base.ModelType.EPS),
                                               ("cosxl", comfy.model_base.ModelType.V_PREDICTION_EDM)])
def test_comfyui_detects_sdxl_ip2p_and_cosxl(family, model_type):
    _, state = _real_size_state(family)
    config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    assert type(config).__name__ == "SDXL_instructpix2pix"
    assert config.model_type(state) == model_type
    if family == "cosxl":
        assert config.sampling_settings["sigma_max"] == pytest.approx(120.0)
        assert config.sampling_settings["sigma_min"] == pytest.approx(0.002)


def test_unet_names_match_comfyuis_own_map():
    unet, state = _real_size_state("cosxl")
    config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    theirs = comfy.utils.unet_to_diffusers(config.unet_config)
    ours = {k: ldm_sdxl.unet_key_to_ldm(k, unet.config) for k in unet.state_dict()}
    assert {k: theirs.get(k) for k in ours} == ours


def test_text_encoders_fill_comfyuis_sdxl_clip_model():
    _, state = _real_size_state("cosxl")
    config = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    clip_state = config.process_clip_state_dict(dict(state))
    with torch.device("meta"):
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta", dtype=torch.float16)
    expected = set(clip.state_dict())
    # ComfyUI's own CheckpointSave drops these three (process_clip_state_dict_for_saving), as sgm files lack them.
    unused = {"clip_g.logit_scale", "clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}
    assert expected - set(clip_state) == unused
    assert set(clip_state) - expected == set()
    for key, value in clip_state.items():
        assert tuple(value.shape) == tuple(clip.state_dict()[key].shape), key


@pytest.mark.parametrize("prompt", ["a photo of a cat", "", "turn the sky into a cloudy one, dramatic light"])
def test_clip_tokens_from_comfyuis_sd1_tokenizer_folder_match_its_sdxl_tokenizer(prompt):
    """Single SDXL files take both tokenizers from ComfyUI's comfy/sd1_tokenizer, as the SDXL family loads them:
    same ids as ComfyUI's SDXLTokenizer for CLIP-L (end-of-text padding) and CLIP-G (id-0 padding). Prompt
    weighting syntax, "(word:1.2)", is ComfyUI's own and not parsed by the pack."""
    from ip2p_nodes.pipeline_core.models.families.base import single_file_tokenizer
    from ip2p_nodes.pipeline_core.models.families.sdxl import clip_g_pad_kwargs

    folder = str(comfy_harness.comfyui_dir() / "comfy" / "sd1_tokenizer")
    where = Path("cosxl_edit.safetensors")
    clip_l = single_file_tokenizer(where, None, folder)
    clip_g = single_file_tokenizer(where, None, folder, **clip_g_pad_kwargs(clip_l))
    theirs = comfy.sdxl_clip.SDXLTokenizer().tokenize_with_weights(prompt)
    for ours, key in ((clip_l, "l"), (clip_g, "g")):
        assert ours(prompt, padding="max_length", max_length=77).input_ids == [t for t, _ in theirs[key][0]], key
