"""SDXL / CosXL single-file layout: what we write reads back bit-exactly, in the names ComfyUI and sgm use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ip2p_nodes.pipeline_core.models import ldm_format, ldm_sdxl
from support import tiny_sdxl

CONFIGS = Path(__file__).parents[2] / "pipeline_core" / "models" / "configs"


@pytest.fixture(scope="module")
def tiny():
    return tiny_sdxl.make_components(seed=3)


def _write_and_read(tmp_path, tiny, scheduler_config=None) -> dict[str, torch.Tensor]:
    state = ldm_sdxl.to_ldm_state_dict(tiny.unet, tiny.vae, tiny.text_encoder, tiny.text_encoder_2, scheduler_config)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    return load_file(str(path))


def _assert_same_state(got: dict, module: torch.nn.Module, what: str) -> None:
    want = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"{what}: missing {missing[:5]}, extra {extra[:5]}"
    for key, value in want.items():
        assert got[key].shape == value.shape, f"{what}.{key}: {tuple(got[key].shape)} != {tuple(value.shape)}"
        assert torch.equal(got[key], value), f"{what}.{key} differs after the round trip"


@pytest.mark.parametrize("scheduler_config", [tiny_sdxl.SDXL_SCHEDULER_CONFIG, tiny_sdxl.COSXL_SCHEDULER_CONFIG],
                         ids=["sdxl", "cosxl"])
def test_single_file_round_trip_is_exact(tmp_path, tiny, scheduler_config):
    checkpoint = _write_and_read(tmp_path, tiny, scheduler_config)
    unet_sd, vae_sd, clip_l_sd, clip_g_sd = ldm_sdxl.from_ldm_state_dict(
        checkpoint, tiny.unet.config, tiny.vae.config, tiny.text_encoder_2.config.to_dict()
    )
    _assert_same_state(unet_sd, tiny.unet, "unet")
    _assert_same_state(vae_sd, tiny.vae, "vae")
    expected_l = set(tiny.text_encoder.state_dict())
    _assert_same_state(ldm_format.match_text_encoder_keys(clip_l_sd, expected_l), tiny.text_encoder, "text_encoder")
    _assert_same_state(ldm_sdxl.match_text_encoder_2_keys(clip_g_sd, set(tiny.text_encoder_2.state_dict())),
                       tiny.text_encoder_2, "text_encoder_2")


def test_every_written_key_belongs_to_a_known_part(tmp_path, tiny):
    checkpoint = _write_and_read(tmp_path, tiny, tiny_sdxl.COSXL_SCHEDULER_CONFIG)
    prefixes = (ldm_sdxl.UNET_PREFIX, ldm_sdxl.VAE_PREFIX, ldm_sdxl.CLIP_L_PREFIX, ldm_sdxl.CLIP_G_PREFIX)
    edm = (ldm_sdxl.EDM_SIGMA_MAX, ldm_sdxl.EDM_SIGMA_MIN)
    strays = [k for k in checkpoint if not k.startswith(prefixes) and k not in edm]
    assert strays == []
    total = sum(len(m.state_dict()) for m in tiny.modules().values())
    # CLIP-G's q, k, v (weight and bias) become one in_proj each: 4 fewer keys per layer; position ids are left out.
    layers = tiny.text_encoder_2.config.num_hidden_layers
    position_ids = sum(k.endswith("position_ids") for m in tiny.modules().values() for k in m.state_dict())
    assert len(checkpoint) == total - 4 * layers - position_ids + 2


def test_sgm_names_for_the_sdxl_only_parts(tmp_path, tiny):
    """The names ComfyUI's SDXL loader and diffusers' detection look for, with open_clip's shapes."""
    ckpt = _write_and_read(tmp_path, tiny)
    unet = tiny.unet.state_dict()
    assert torch.equal(ckpt["model.diffusion_model.label_emb.0.0.weight"], unet["add_embedding.linear_1.weight"])
    assert torch.equal(ckpt["model.diffusion_model.label_emb.0.2.bias"], unet["add_embedding.linear_2.bias"])
    g = tiny.text_encoder_2.state_dict()
    width, pooled = tiny_sdxl.CLIP_G_WIDTH, tiny_sdxl.POOLED_WIDTH
    prefix = "conditioner.embedders.1.model."
    in_proj = ckpt[prefix + "transformer.resblocks.1.attn.in_proj_weight"]
    assert in_proj.shape == (3 * width, width)
    q, k, v = in_proj.split(width)
    assert torch.equal(q, g["text_model.encoder.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(k, g["text_model.encoder.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(v, g["text_model.encoder.layers.1.self_attn.v_proj.weight"])
    # open_clip computes x @ text_projection: [width, pooled], the transpose of the Linear weight.
    assert ckpt[prefix + "text_projection"].shape == (width, pooled)
    assert torch.equal(ckpt[prefix + "text_projection"], g["text_projection.weight"].t())
    assert ckpt[prefix + "positional_embedding"].shape == (77, width)
    for name in ("token_embedding.weight", "ln_final.bias", "transformer.resblocks.0.ln_1.weight",
                 "transformer.resblocks.0.ln_2.bias", "transformer.resblocks.0.mlp.c_fc.weight",
                 "transformer.resblocks.0.mlp.c_proj.bias", "transformer.resblocks.0.attn.out_proj.weight",
                 "transformer.resblocks.0.attn.in_proj_bias"):
        assert prefix + name in ckpt, name
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in ckpt


def test_cosxl_file_carries_edm_vpred_keys_as_comfyui_writes_them(tmp_path, tiny):
    ckpt = _write_and_read(tmp_path, tiny, tiny_sdxl.COSXL_SCHEDULER_CONFIG)
    for key, value in ((ldm_sdxl.EDM_SIGMA_MAX, 120.0), (ldm_sdxl.EDM_SIGMA_MIN, 0.002)):
        # comfy_extras/nodes_model_merging.py: torch.tensor(model_sampling.sigma_max).float() -> 0-d float32
        assert ckpt[key].dtype == torch.float32 and ckpt[key].shape == ()
        assert ckpt[key].item() == pytest.approx(value, rel=1e-6)
    assert ldm_sdxl.edm_vpred_sigmas(ckpt) == pytest.approx((0.002, 120.0), rel=1e-6)


def test_sdxl_ip2p_file_has_no_edm_keys(tmp_path, tiny):
    ckpt = _write_and_read(tmp_path, tiny, tiny_sdxl.SDXL_SCHEDULER_CONFIG)
    assert not any(k.startswith("edm_") for k in ckpt)
    assert ldm_sdxl.edm_vpred_sigmas(ckpt) is None


def test_edm_sigmas_come_from_the_scheduler_config():
    keys = ldm_sdxl.edm_vpred_keys(dict(tiny_sdxl.COSXL_SCHEDULER_CONFIG, sigma_max=80.0, sigma_min=0.01))
    assert keys[ldm_sdxl.EDM_SIGMA_MAX].item() == 80.0
    assert keys[ldm_sdxl.EDM_SIGMA_MIN].item() == pytest.approx(0.01)


def test_edm_epsilon_is_refused_rather_than_written_as_a_plain_model():
    with pytest.raises(ValueError, match="v-prediction"):
        ldm_sdxl.edm_vpred_keys(dict(tiny_sdxl.COSXL_SCHEDULER_CONFIG, prediction_type="epsilon"))


def test_shipped_configs_build_the_real_architectures():
    """The shipped configs give the published parameter counts (SDXL UNet with 8 input channels, CLIP-L, CLIP-G
    with projection, SDXL VAE), and the real-size layout writes with SDXL's ComfyUI key names."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    counts = {}
    for family, sample_size in (("sdxl", 96), ("cosxl", 128)):
        cfg = {n: json.loads((CONFIGS / family / f"{n}.json").read_text())
               for n in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")}
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(cfg["unet"])
            vae = AutoencoderKL.from_config(cfg["vae"])
            te1 = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
            te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
        counts[family] = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, te1, te2)]
        assert unet.config.sample_size == sample_size
        assert vae.config.scaling_factor == 0.13025
        state = ldm_sdxl.to_ldm_state_dict(unet, vae, te1, te2, cfg["scheduler"])
        assert state["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, 8, 3, 3)
        assert state["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
        unet_prefix = "model.diffusion_model."
        assert state[unet_prefix + "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
        assert state["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
        assert (ldm_sdxl.EDM_SIGMA_MAX in state) == (family == "cosxl")
    # SDXL base UNet 2,567,463,684 + 4 extra input channels x 320 x 3 x 3; VAE; CLIP-L; CLIP-G with projection.
    assert counts["sdxl"] == counts["cosxl"] == [2_567_475_204, 83_653_863, 123_060_480, 694_659_840]


@pytest.mark.parametrize("family", ["sdxl", "cosxl"])
def test_real_size_layout_reads_back_into_the_shipped_architecture(family):
    """Real-size names and shapes (meta device): what the writer lays out, diffusers' converters read back into
    modules built from the shipped configs with strict loading, as a real single file is read."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {n: json.loads((CONFIGS / family / f"{n}.json").read_text())
           for n in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")}

    def build():
        with torch.device("meta"):
            return (UNet2DConditionModel.from_config(cfg["unet"]), AutoencoderKL.from_config(cfg["vae"]),
                    CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                    CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])))

    state = ldm_sdxl.to_ldm_state_dict(*build(), cfg["scheduler"])
    unet_sd, vae_sd, clip_l_sd, clip_g_sd = ldm_sdxl.from_ldm_state_dict(state, cfg["unet"], cfg["vae"],
                                                                         cfg["text_encoder_2"])
    unet, vae, clip_l, clip_g = build()
    unet.load_state_dict(unet_sd, strict=True, assign=True)
    vae.load_state_dict(vae_sd, strict=True, assign=True)
    missing, unexpected = clip_l.load_state_dict(
        ldm_format.match_text_encoder_keys(clip_l_sd, set(clip_l.state_dict())), strict=False, assign=True)
    assert [k for k in missing if not k.endswith("position_ids")] == [] and unexpected == []
    missing, unexpected = clip_g.load_state_dict(
        ldm_sdxl.match_text_encoder_2_keys(clip_g_sd, set(clip_g.state_dict())), strict=False, assign=True)
    assert [k for k in missing if not k.endswith("position_ids")] == [] and unexpected == []
    assert clip_g.text_projection.weight.shape == (1280, 1280)
