import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402
import tiny_sdxl  # noqa: E402
from ip2p_nodes.pipeline_core import ModelCache, ModelSource, encode_instruction  # noqa: E402
from ip2p_nodes.pipeline_core.models.loading import save_single_file  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random IP2P model in diffusers folder form."""
    return tiny_models.save_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-ip2p")


@pytest.fixture(scope="session")
def tiny_single_file(tmp_path_factory, tiny_folder) -> Path:
    """The same weights as ``tiny_folder``, as one LDM-layout .safetensors with embedded configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_folder, subfolder="vae")
    te = CLIPTextModel.from_pretrained(tiny_folder, subfolder="text_encoder")
    path = tmp_path_factory.mktemp("single") / "tiny-ip2p.safetensors"
    return save_single_file((unet, vae, te), path, tokenizer_dir=tiny_folder / "tokenizer")


@pytest.fixture
def cache() -> ModelCache:
    return ModelCache()


@pytest.fixture
def fp32_model(cache, tiny_folder):
    return cache.get(cache.key_for(ModelSource("diffusers", str(tiny_folder)), "fp32", "cpu"))


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    """A tiny random SDXL InstructPix2Pix model in diffusers folder form (Euler discrete scheduler)."""
    return tiny_sdxl.save_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-sdxl-ip2p", seed=5)


@pytest.fixture(scope="session")
def cosxl_folder(tmp_path_factory) -> Path:
    """A tiny random CosXL Edit model in diffusers folder form (EDM Euler v-prediction scheduler)."""
    return tiny_sdxl.save_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-cosxl-edit", seed=6, cosxl=True)


@pytest.fixture
def sdxl_model(cache, sdxl_folder):
    return cache.get(cache.key_for(ModelSource("diffusers", str(sdxl_folder)), "fp32", "cpu"))


@pytest.fixture
def cosxl_model(cache, cosxl_folder):
    return cache.get(cache.key_for(ModelSource("diffusers", str(cosxl_folder)), "fp32", "cpu"))


@pytest.fixture(params=["sd15", "sdxl", "cosxl"])
def family_model(request):
    """The tiny fp32 model of each family in turn (SD1.5, SDXL-IP2P, CosXL Edit), for behaviour every family keeps."""
    return request.getfixturevalue({"sd15": "fp32_model", "sdxl": "sdxl_model", "cosxl": "cosxl_model"}[request.param])


@pytest.fixture
def family_cond(family_model):
    return encode_instruction(family_model, "make it winter")


@pytest.fixture(autouse=True)
def _pack_logs(caplog):
    caplog.set_level(logging.INFO, logger="ip2p_nodes")
