"""A LoRA from the pack's trainer works in ComfyUI's own LoRA loader (COMFYUI_DIR tier).

The trainer fine-tunes the tiny IP2P model with a LoRA (alpha != rank, so the scale has to travel with the file).
ComfyUI builds its SD1.5-IP2P model from the same base weights (the tiny single file; its shapes match no
SD1.5 entry of ComfyUI's detection, so the model config is named, as ``load_state_dict_guess_config`` would pick
it for a full-size file) and reads the trainer's kohya-layout file the way its ``LoraLoader`` node does
(``comfy.sd.load_lora_for_models``: ``model_lora_keys_unet`` + ``convert_lora`` + ``load_lora``). Every key of the
file must be used, and the UNet weights ComfyUI patches must equal the trainer's merged model.
"""

from __future__ import annotations

import logging

import pytest
import torch

from support import comfy_harness

comfy_harness.import_comfyui()  # skips this module, saying why, without COMFYUI_DIR

import comfy.lora  # noqa: E402
import comfy.lora_convert  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402

from ip2p_nodes.pipeline_core.training.lora import KOHYA_LORA_NAME  # noqa: E402
from ip2p_nodes.pipeline_core.training.trainer import TrainConfig, fine_tune  # noqa: E402

pytestmark = pytest.mark.comfyui
log = logging.getLogger(__name__)

PREFIX = "model.diffusion_model."


def native_sd15_ip2p(path):
    """ComfyUI's SD1.5-IP2P model (fp32, CPU) with the weights of the single file at ``path``, in a ModelPatcher."""
    state = comfy.utils.load_torch_file(str(path))
    config = comfy.supported_models.SD15_instructpix2pix(comfy.model_detection.detect_unet_config(state, PREFIX))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(state, PREFIX, device=torch.device("cpu"))
    model.load_model_weights(state, PREFIX)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def test_comfyui_lora_loader_uses_every_key_of_the_trained_lora_and_patches_the_merged_weights(
        tmp_path, tiny_folder, tiny_single_file):
    out = tmp_path / "run"
    config = TrainConfig(steps=3, batch_size=4, learning_rate=1e-2, lora_rank=4, lora_alpha=8.0,
                         mixed_precision="no", checkpoint_every=1000)
    fine_tune(str(tiny_folder), "synthetic:8", out, config, progress=False)

    patcher = native_sd15_ip2p(tiny_single_file)
    base = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(out / KOHYA_LORA_NAME)))
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    patches = comfy.lora.load_lora(lora, key_map)

    used = set().union(*(p.loaded_keys for p in patches.values()))
    used |= {f"{x}.alpha" for x in key_map if key_map[x] in patches and f"{x}.alpha" in lora}
    assert set(lora) - used == set(), "keys ComfyUI's LoRA loader leaves unloaded"
    assert len(patches) == len(lora) // 3  # down, up and alpha per projection: every projection is patched

    assert set(patcher.add_patches(patches, 1.0)) == set(patches)
    patcher.patch_model()
    patched = patcher.model.diffusion_model.state_dict()
    merged = comfy.utils.load_torch_file(str(out / "model.safetensors"))
    worst = max((patched[k] - merged[PREFIX + k]).abs().max().item() for k in patched)
    moved = max((patched[k[len("diffusion_model."):]] - base[k[len("diffusion_model."):]]).abs().max().item()
                for k in patches)
    log.info("ComfyUI-patched UNet vs the trainer's merged model: max diff %.2e (LoRA moved weights by up to %.2e)",
             worst, moved)
    assert moved > 1e-3, "the LoRA changed no weight"
    assert worst < 1e-5
