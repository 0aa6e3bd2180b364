"""Fixtures more than one tier uses, registered for the whole suite by ``tests/conftest.py``.

A tier's own fixtures live in that tier's ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ip2p_nodes.pipeline_core.models.loading import save_single_file

from . import tiny_models, tiny_sdxl


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


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    """A tiny random SDXL InstructPix2Pix model in diffusers folder form (Euler discrete scheduler)."""
    return tiny_sdxl.save_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-sdxl-ip2p", seed=5)


@pytest.fixture(scope="session")
def cosxl_folder(tmp_path_factory) -> Path:
    """A tiny random CosXL Edit model in diffusers folder form (EDM Euler v-prediction scheduler)."""
    return tiny_sdxl.save_diffusers_folder(tmp_path_factory.mktemp("models") / "tiny-cosxl-edit", seed=6, cosxl=True)
