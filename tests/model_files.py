"""Random-weight model files of the real architectures, written under the names the example workflows use.

The example workflows name the files users actually have. To run them for real without downloading
anything, the tests write files of the same architectures with random weights under those names:

- ``v1-5-pruned-emaonly-fp16.safetensors``: a full-size SD1.5 checkpoint (860 M UNet with 4 input channels,
  VAE, CLIP-L text encoder) in the LDM single-file layout, fp16, as ComfyUI's ``CheckpointLoaderSimple``
  reads it. It must be full size: ComfyUI recognises SD1.5 by the UNet's shapes.
- ``control_v11p_sd15_canny.pth``: a full-size SD1.5 ControlNet, diffusers key layout (which
  ``comfy.controlnet.load_controlnet_state_dict`` converts), pickled with ``torch.save`` so ComfyUI's
  weights-only ``.pth`` loading accepts it.
- ``instruct-pix2pix-00-22000.safetensors``: the tiny SD1.5-shaped InstructPix2Pix model of
  :mod:`tiny_models` as one LDM-layout file (with its configs and vocabulary in the metadata), which the
  pack's loader reads. The pack only ever sees its own loader's output, so its cost stays small.

Weights are drawn directly in fp16 on modules built on the meta device: diffusers' default initialisation of
the full-size UNet alone takes ~13 s on two cores; this takes a fraction of that.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import tiny_models

SD15_NAME = "v1-5-pruned-emaonly-fp16.safetensors"
CONTROLNET_NAME = "control_v11p_sd15_canny.pth"
IP2P_NAME = "instruct-pix2pix-00-22000.safetensors"

CONFIG_DIR = Path(__file__).parents[1] / "pipeline_core" / "models" / "configs" / "sd15"


def _config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def _materialize_random(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Allocate a meta-device module in fp16 and fill it like a fan-in scaled initialisation.

    Matrices and kernels get N(0, 1/fan_in), norm scales 1 and biases 0, so activations keep a sane size
    through the whole network (no inf/NaN in ComfyUI's fp32 CPU compute) without the cost of the usual init.
    """
    module = module.to(torch.float16).to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for b in module.buffers():  # only CLIP's position ids, which to_ldm_state_dict leaves out
            b.zero_()
    return module.eval()


def write_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """A full-size SD1.5 text-to-image checkpoint (LDM layout, fp16) that ComfyUI loads as SD1.5."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ip2p_nodes.pipeline_core.models.ldm_format import to_ldm_state_dict
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    unet_config = dict(_config("unet"), in_channels=4)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(_config("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_config("text_encoder")))
    for module in (unet, vae, text_encoder):
        _materialize_random(module, generator)
    state = to_ldm_state_dict(unet, vae, text_encoder)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_controlnet(path: Path, seed: int = 1) -> Path:
    """A full-size SD1.5 ControlNet (diffusers keys, fp16) as a weights-only ``.pth``."""
    from diffusers import ControlNetModel

    generator = torch.Generator().manual_seed(seed)
    unet_config = _config("unet")
    with torch.device("meta"):
        controlnet = ControlNetModel(
            in_channels=4,
            conditioning_channels=3,
            down_block_types=tuple(unet_config["down_block_types"]),
            block_out_channels=tuple(unet_config["block_out_channels"]),
            layers_per_block=unet_config["layers_per_block"],
            cross_attention_dim=unet_config["cross_attention_dim"],
            attention_head_dim=unet_config["attention_head_dim"],
        )
    _materialize_random(controlnet, generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(path))
    return path


def write_ip2p_checkpoint(path: Path, seed: int = 0) -> Path:
    """The tiny InstructPix2Pix model as one LDM-layout ``.safetensors`` the pack's loader reads offline."""
    from ip2p_nodes.pipeline_core.models.loading import save_single_file

    tokenizer_dir = path.parent / f".{path.stem}-tokenizer"
    unet, vae, text_encoder, _ = tiny_models.make_components(seed, tokenizer_dir=tokenizer_dir)
    return save_single_file((unet, vae, text_encoder), path, tokenizer_dir=tokenizer_dir)


def write_full_size_ip2p_checkpoint(path: Path, seed: int = 0) -> Path:
    """A full-size SD1.5 InstructPix2Pix checkpoint (8-channel UNet, VAE, CLIP-L; random fp16 weights).

    Written by the pack's own ``save_single_file``, so it is the layout a user gets from the pack, and full
    size, because ComfyUI recognises SD1.5 IP2P by the UNet's shapes. About 2 GB; ~15 s on two cores. It
    carries no tokenizer: both loaders use ComfyUI's bundled SD1 tokenizer, as with a real downloaded file.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from ip2p_nodes.pipeline_core.models.loading import save_single_file
    from transformers import CLIPTextConfig, CLIPTextModel

    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config("unet"))
        vae = AutoencoderKL.from_config(_config("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**_config("text_encoder")))
    assert unet.config.in_channels == 8
    modules = [_materialize_random(m, generator) for m in (unet, vae, text_encoder)]
    return save_single_file(tuple(modules), path, family="sd15")


def write_model_tree(root: Path) -> dict[str, Path]:
    """ComfyUI model folders under ``root`` holding the three files; returns {folder key: folder}.

    Folder keys are ComfyUI's (``checkpoints``, ``controlnet``) and the pack's own ``instructpix2pix``.
    """
    folders = {key: root / key for key in ("checkpoints", "controlnet", "instructpix2pix")}
    timings = {}
    for key, name, writer in (
        ("checkpoints", SD15_NAME, write_sd15_checkpoint),
        ("controlnet", CONTROLNET_NAME, write_controlnet),
        ("instructpix2pix", IP2P_NAME, write_ip2p_checkpoint),
    ):
        start = time.perf_counter()
        writer(folders[key] / name)
        timings[name] = time.perf_counter() - start
    print("model files written in " + ", ".join(f"{n}: {t:.1f} s" for n, t in timings.items()))
    return folders
