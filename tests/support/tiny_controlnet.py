"""A tiny random ControlNet that fits a tiny IP2P model, and the files users have it in.

Built from the IP2P UNet's config as a real ControlNet is from its base model (diffusers' ``from_unet``: the
UNet's encoder with 4 latent input channels) with the standard hint encoder (16, 32, 96, 256), so the original
layout's ``input_hint_block.14`` is where the real files have it. Its zero convolutions start at zero in a real
training run; here every weight is perturbed, so its residuals change the edit measurably.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .model_files import controlnet_key_to_original


def make_controlnet(unet_config: dict, seed: int = 7):
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    base = UNet2DConditionModel.from_config({**unet_config, "in_channels": 4})
    controlnet = ControlNetModel.from_unet(base, load_weights_from_unet=False)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith("controlnet_cond_embedding") and p.ndim == 4:
                # He initialisation: the default one shrinks the hint's signal through the encoder's 8 convolutions
                # until the biases drown it, and then every hint steers alike. Its last convolution, zero in a
                # fresh ControlNet, is kept small, so the hint steers without drowning the latent.
                gain = 0.25 if name.startswith("controlnet_cond_embedding.conv_out") else 1.0
                p.normal_(0.0, gain * (2.0 / p[0].numel()) ** 0.5)
                continue
            # Zero-initialised in a fresh ControlNet: the residual convolutions.
            zero_init = name.startswith(("controlnet_down_blocks", "controlnet_mid_block"))
            p.add_(torch.randn_like(p) * (0.3 if zero_init else 0.02))
    return controlnet.eval()


def unet_config_of(folder: Path) -> dict:
    return json.loads((Path(folder) / "unet" / "config.json").read_text())


def write_diffusers_file(controlnet, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(path))
    return path


def write_original_file(controlnet, path: Path, prefix: str = "") -> Path:
    """The original ControlNet layout (``prefix="control_model."``: lllyasviel's ControlNet 1.0 files)."""
    state = {prefix + controlnet_key_to_original(k, controlnet.config): v.contiguous()
             for k, v in controlnet.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return path
