"""Fixtures more than one tier uses, registered for the whole suite by ``tests/conftest.py``.

A tier's own fixtures live in that tier's ``conftest.py``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from ip2p_nodes.pipeline_core.models.loading import save_single_file
from ip2p_nodes.pipeline_core.training.toy import SAMPLE_IMAGE_NAME, sample_image_path

from . import comfy_harness, model_files, tiny_models
from .example_workflows import write_example_image


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
def workflow_server(tmp_path_factory):
    """A ComfyUI with the pack and the model files the example workflows name, for the workflow tests of the
    comfyui and browser tiers: writing the 2.7 GB of random weights and starting takes about a minute, so they
    share one (the tiers run one after the other, see tests/conftest.py)."""
    comfy_harness.skip_without_comfyui()
    root = tmp_path_factory.mktemp("workflows")
    start = time.perf_counter()
    folders = model_files.write_model_tree(root / "models")
    try:
        with comfy_harness.comfy_server(root / "comfy", {key: [path] for key, path in folders.items()}) as server:
            write_example_image(server.input_dir / "example.png")
            # The pack itself puts the toy demo's picture into a fresh input folder when ComfyUI loads it.
            assert (server.input_dir / SAMPLE_IMAGE_NAME).read_bytes() == sample_image_path().read_bytes()
            print(f"model files + server start: {time.perf_counter() - start:.1f} s")
            yield server
    finally:
        # 2.7 GB of random weights: pytest keeps the last few temp dirs, so do not leave them behind.
        shutil.rmtree(root / "models", ignore_errors=True)

