"""Random-weight model files of the real architectures, written under the names the example workflows use.

The example workflows name the files users actually have. To run them for real without downloading
anything, the tests write files of the same architectures with random weights under those names:

- ``v1-5-pruned-emaonly-fp16.safetensors``: a full-size SD1.5 checkpoint (860 M UNet with 4 input channels,
  VAE, CLIP-L text encoder) in the LDM single-file layout, fp16, as ComfyUI's ``CheckpointLoaderSimple``
  reads it. It must be full size: ComfyUI recognises SD1.5 by the UNet's shapes.
- ``control_v11p_sd15_canny_fp16.safetensors``: a full-size SD1.5 ControlNet in the original ControlNet 1.1
  key layout (``input_blocks``, ``zero_convs``, ``input_hint_block`` ...), fp16, as the real file
  (comfyanonymous/ControlNet-v1-1_fp16_safetensors) has it and ComfyUI's ``ControlNetLoader`` reads it.
- ``tiny_canny_for_tiny_ip2p.safetensors``: a tiny ControlNet of the tiny IP2P model's shape (original layout),
  which steers the edit where a workflow's IP2P Apply ControlNet names the real-size file.
- ``instruct-pix2pix-00-22000.safetensors``: the tiny SD1.5-shaped InstructPix2Pix model of
  :mod:`tiny_models` as one LDM-layout file (with its configs and vocabulary in the metadata), which the
  pack's loader reads. The pack only ever sees its own loader's output, so its cost stays small.
- full size, written by the pack's own ``save_single_file`` for the native parity tests: an SD1.5
  InstructPix2Pix file (:func:`write_full_size_ip2p_checkpoint`, 2 GB).
- ``cosxl_edit.safetensors``: a name only (an empty file), so the loader lists it and a workflow naming it
  builds and validates; nothing can run on it. The CosXL family writes a real-architecture file in its place.

Weights are drawn directly in fp16 on modules built on the meta device: diffusers' default initialisation of
the full-size UNet alone takes ~13 s on two cores; this takes a fraction of that.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import tiny_models

SD15_NAME = "v1-5-pruned-emaonly-fp16.safetensors"
CONTROLNET_NAME = "control_v11p_sd15_canny_fp16.safetensors"
IP2P_NAME = "instruct-pix2pix-00-22000.safetensors"
COSXL_NAME = "cosxl_edit.safetensors"
# A ControlNet of the tiny IP2P model's shape: the real-size SD1.5 one above cannot steer the tiny model (the pack
# refuses it by its widths), so runs of workflows whose IP2P Apply ControlNet names the real file use this one.
TINY_CONTROLNET_NAME = "tiny_canny_for_tiny_ip2p.safetensors"

CONFIG_DIR = Path(__file__).parents[2] / "pipeline_core" / "models" / "configs" / "sd15"


def _config(name: str) -> dict:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def _materialize_random(module: torch.nn.Module, generator: torch.Generator,
                        dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """Allocate a meta-device module in ``dtype`` and fill it like a fan-in scaled initialisation.

    Matrices and kernels get N(0, 1/fan_in), norm scales 1 and biases 0, so activations keep a sane size
    through the whole network (no inf/NaN in ComfyUI's fp32 CPU compute) without the cost of the usual init.
    """
    module = module.to(dtype).to_empty(device="cpu")
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


def write_sd15_checkpoint(path: Path, seed: int = 0, in_channels: int = 4) -> Path:
    """A full-size SD1.5 checkpoint (LDM layout, fp16) that ComfyUI loads as SD1.5: text-to-image, or with
    ``in_channels=8`` shaped as an SD1.5 InstructPix2Pix model (what the pack's loader takes for one)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from ip2p_nodes.pipeline_core.models.ldm_format import to_ldm_state_dict

    generator = torch.Generator().manual_seed(seed)
    unet_config = dict(_config("unet"), in_channels=in_channels)
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


def controlnet_key_to_original(key: str, config: dict) -> str:
    """A diffusers ``ControlNetModel`` key in the original ControlNet layout (``cldm.py``'s module names)."""
    from ip2p_nodes.pipeline_core.models.ldm_format import unet_key_to_ldm

    parts = key.split(".")
    if parts[0] == "controlnet_down_blocks":  # controlnet_down_blocks.i.* -> zero_convs.i.0.*
        return f"zero_convs.{parts[1]}.0." + ".".join(parts[2:])
    if parts[0] == "controlnet_mid_block":
        return "middle_block_out.0." + ".".join(parts[1:])
    if parts[0] == "controlnet_cond_embedding":
        # The hint encoder is one Sequential of convolutions, each followed by a SiLU: conv_in, blocks.0..n-1,
        # conv_out sit at even indices 0, 2, ..., 2n + 2.
        if parts[1] == "conv_in":
            index, rest = 0, parts[2:]
        elif parts[1] == "blocks":
            index, rest = 2 * (int(parts[2]) + 1), parts[3:]
        else:  # conv_out
            index, rest = 2 * (len(config["conditioning_embedding_out_channels"]) * 2 - 1), parts[2:]
        return f"input_hint_block.{index}." + ".".join(rest)
    return unet_key_to_ldm(key, config)  # the encoder half of the UNet: same names as in SD checkpoints


def write_controlnet(path: Path, seed: int = 1) -> Path:
    """A full-size SD1.5 ControlNet (original ControlNet 1.1 key layout, fp16) as ``.safetensors``."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

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
    state = {
        controlnet_key_to_original(k, controlnet.config): v.contiguous() for k, v in controlnet.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_ip2p_checkpoint(path: Path, seed: int = 0) -> Path:
    """The tiny InstructPix2Pix model as one LDM-layout ``.safetensors`` the pack's loader reads offline."""
    from ip2p_nodes.pipeline_core.models.loading import save_single_file

    tokenizer_dir = path.parent / f".{path.stem}-tokenizer"
    unet, vae, text_encoder, _ = tiny_models.make_components(seed, tokenizer_dir=tokenizer_dir)
    return save_single_file((unet, vae, text_encoder), path, tokenizer_dir=tokenizer_dir)


def write_tiny_controlnet(path: Path, seed: int = 0) -> Path:
    """A random ControlNet (original layout) of the shape of :func:`write_ip2p_checkpoint`'s tiny model."""
    from . import tiny_controlnet

    unet = tiny_models.make_components(seed)[0]
    return tiny_controlnet.write_original_file(tiny_controlnet.make_controlnet(dict(unet.config)), path)


def full_size_modules(family: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """The real InstructPix2Pix architecture of ``family`` with random ``dtype`` weights, by role: ``sd15``
    (8-channel 860 M UNet, VAE, CLIP-L) or ``sdxl`` (8-channel 2.6 B UNet, VAE, CLIP-L and CLIP-G with its
    projection), from the pack's own configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = CONFIG_DIR.parent / family
    config = {n: json.loads(p.read_text()) for n in ("unet", "vae", "text_encoder", "text_encoder_2")
              if (p := configs / f"{n}.json").exists()}
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel.from_config(config["unet"]),
                   "vae": AutoencoderKL.from_config(config["vae"]),
                   "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))}
        if "text_encoder_2" in config:
            modules["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"]))
    assert modules["unet"].config.in_channels == 8
    return {role: _materialize_random(m, generator, dtype) for role, m in modules.items()}


def _full_size_ip2p_modules(seed: int, dtype: torch.dtype) -> tuple[torch.nn.Module, ...]:
    """The real SD1.5 InstructPix2Pix architecture (8-channel UNet, VAE, CLIP-L) with random ``dtype`` weights."""
    return tuple(full_size_modules("sd15", seed, dtype).values())


def write_full_size_ip2p_checkpoint(path: Path, seed: int = 0) -> Path:
    """A full-size SD1.5 InstructPix2Pix checkpoint (8-channel UNet, VAE, CLIP-L; random fp16 weights).

    Written by the pack's own ``save_single_file``, so it is the layout a user gets from the pack, and full
    size, because ComfyUI recognises SD1.5 IP2P by the UNet's shapes. About 2 GB; ~15 s on two cores. It
    carries no tokenizer: both loaders use ComfyUI's bundled SD1 tokenizer, as with a real downloaded file.
    """
    from ip2p_nodes.pipeline_core.models.loading import save_single_file

    return save_single_file(_full_size_ip2p_modules(seed, torch.float16), path, family="sd15")


def write_full_size_ip2p_folder(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                                family: str = "sd15") -> Path:
    """A full-size InstructPix2Pix diffusers folder with random weights, fp32 as timbrooks/instruct-pix2pix ships
    it (SD1.5, ~4.3 GB; ``family="sdxl"``: diffusers' SDXL-IP2P pipeline, ~14 GB): what the memory benchmark loads
    with both our loader and diffusers' pipeline.

    The tokenizer is the pack's byte-level one (a real CLIP vocabulary is a download); the text encoder reads it
    as any other. SDXL's second tokenizer pads with id 0, as the real one does.
    """
    import diffusers

    from . import tiny_sdxl

    modules = full_size_modules(family, seed, dtype)
    scheduler_config = json.loads((CONFIG_DIR.parent / family / "scheduler.json").read_text())
    if family == "sdxl":
        tokenizer, tokenizer_2 = tiny_sdxl.write_tokenizers(path / "_tok")
        pipe = diffusers.StableDiffusionXLInstructPix2PixPipeline(
            **modules, tokenizer=tokenizer, tokenizer_2=tokenizer_2, add_watermarker=False,
            scheduler=diffusers.EulerDiscreteScheduler.from_config(scheduler_config))
    else:
        pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
            **modules, tokenizer=tiny_models.write_tokenizer(path / "_tok"),
            scheduler=diffusers.EulerAncestralDiscreteScheduler.from_config(scheduler_config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(str(path))
    return path


def write_cosxl_checkpoint(path: Path, seed: int = 3) -> Path:
    """A tiny CosXL Edit model (SDXL-shaped, EDM v-prediction) as one original-layout ``.safetensors`` with its
    ``edm_vpred.*`` keys, which the pack's loader reads offline (configs and tokenizer in the metadata).

    Tiny like the SD1.5 IP2P file above: the workflow tests run the pack's path end to end; ComfyUI's own reading
    of a real-architecture CosXL layout is tested on the meta device (``comfyui/test_ldm_sdxl_comfyui.py``).
    """
    from ip2p_nodes.pipeline_core.models.loading import save_single_file

    from . import tiny_sdxl

    tokenizer_dir = path.parent / f".{path.stem}-tokenizer"
    tiny = tiny_sdxl.make_components(seed, tokenizer_dir=tokenizer_dir, sample_size=128)
    modules = {"unet": tiny.unet, "vae": tiny.vae, "text_encoder": tiny.text_encoder,
               "text_encoder_2": tiny.text_encoder_2}
    return save_single_file(modules, path, tokenizer_dir=tokenizer_dir, family="cosxl",
                            scheduler_config=tiny_sdxl.COSXL_SCHEDULER_CONFIG)


def write_model_tree(root: Path) -> dict[str, Path]:
    """ComfyUI model folders under ``root`` holding the files above; returns {folder key: folder}.

    Folder keys are ComfyUI's (``checkpoints``, ``controlnet``) and the pack's own ``instructpix2pix``.
    """
    folders = {key: root / key for key in ("checkpoints", "controlnet", "instructpix2pix")}
    timings = {}
    for key, name, writer in (
        ("checkpoints", SD15_NAME, write_sd15_checkpoint),
        ("controlnet", CONTROLNET_NAME, write_controlnet),
        ("controlnet", TINY_CONTROLNET_NAME, write_tiny_controlnet),
        ("instructpix2pix", IP2P_NAME, write_ip2p_checkpoint),
        ("checkpoints", COSXL_NAME, write_cosxl_checkpoint),
    ):
        start = time.perf_counter()
        writer(folders[key] / name)
        timings[name] = time.perf_counter() - start
    print("model files written in " + ", ".join(f"{n}: {t:.1f} s" for n, t in timings.items()))
    return folders
