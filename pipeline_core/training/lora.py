"""LoRA for the trainer, through peft, written in the layouts other tools read.

The adapter is the one diffusers' own training scripts put on the UNet
(``examples/text_to_image/train_text_to_image_lora.py``): ``unet.add_adapter(LoraConfig(...))`` on the attention
projections, Gaussian-initialised ``lora_A`` and zero ``lora_B`` so training starts at the base model.

A trained LoRA is written twice, one adapter in two key layouts:

- ``pytorch_lora_weights.safetensors``: diffusers' layout (``unet.<module>.lora.down.weight`` /
  ``.lora.up.weight``), by ``StableDiffusionPipeline.save_lora_weights``, as diffusers' LoRA scripts write it;
  diffusers' ``load_lora_weights(folder)`` finds it by this name.
- ``lora_kohya.safetensors``: kohya's layout (``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``), by diffusers' ``convert_state_dict_to_kohya``, as diffusers' advanced training scripts write it for
  ``--output_kohya_format``. ComfyUI's native LoRA loader maps every key of it; of the diffusers layout it maps
  none (ComfyUI 0.8 ``comfy/lora.py`` knows diffusers' SD1.5 keys only in the older ``processor.to_q`` form).
  diffusers reads this one too (``load_lora_weights(folder, weight_name="lora_kohya.safetensors")``).

Both hold the alpha / rank scale folded into ``lora_B`` (so alpha = rank in the files), see :func:`save_lora`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError

# Every attention projection, as diffusers' LoRA scripts target them; ComfyUI and A1111 read LoRAs on these.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for
KOHYA_LORA_NAME = "lora_kohya.safetensors"


def add_lora(unet, rank: int, alpha: float | None = None, seed: int = 0) -> list[str]:
    """Put a peft LoRA adapter on the UNet's attention projections and freeze everything else.

    Returns the names of the trainable parameters. ``alpha`` None means alpha = rank (scale 1). The Gaussian
    initialisation of ``lora_A`` is drawn from ``seed``, so the same settings start from the same adapter.
    """
    from peft import LoraConfig

    if rank < 1:
        raise InputError(f"LoRA rank must be at least 1, got {rank}")
    if getattr(unet, "peft_config", None):
        raise InputError("the UNet already has a LoRA adapter; merge or remove it first")
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=list(LORA_TARGETS))
    # peft draws the initial lora_A from torch's global generator; a private fork keeps runs reproducible
    # without disturbing anyone else's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    if not names:
        raise InputError("the UNet has no attention layers to put LoRA on")
    return names


def merge_lora(unet) -> None:
    """Fold the adapter into the projections' weights and remove it: a plain UNet equal to base + LoRA."""
    unet.fuse_lora()
    unet.unload_lora()


def remove_lora(unet) -> None:
    """Remove the adapter, leaving the base weights as they were before :func:`add_lora`."""
    unet.unload_lora()


def save_lora(out: Path, unet) -> tuple[Path, Path]:
    """Write the UNet's adapter as ``out/pytorch_lora_weights.safetensors`` and ``out/lora_kohya.safetensors``."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = unet.peft_config["default"]
    # Readers apply alpha / rank, and each finds alpha somewhere else (recent diffusers in the file's metadata,
    # kohya readers in `.alpha` keys, older diffusers nowhere) and takes alpha = rank when it finds none. Folding
    # the scale into lora_B makes the files exactly the trained LoRA with alpha = rank: right for every reader.
    scale = config.lora_alpha / config.r
    weights = {k: (v * scale if ".lora_B." in k else v).contiguous()
               for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(
        str(out), unet_lora_layers=convert_state_dict_to_diffusers(weights), safe_serialization=True)
    # convert_state_dict_to_kohya adds `.alpha` = rank, which is right once the scale is folded in.
    save_file(convert_state_dict_to_kohya({f"unet.{k}": v for k, v in weights.items()}), str(out / KOHYA_LORA_NAME))
    return out / DIFFUSERS_LORA_NAME, out / KOHYA_LORA_NAME
