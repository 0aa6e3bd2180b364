"""Random LoRA files for a tiny model, written the way the community's tools write them.

``write_diffusers_lora`` injects peft adapters with random (non-zero) weights into a copy of a model folder's UNet
and text encoder(s) and saves them with diffusers' ``save_lora_weights`` (keys ``unet.…lora_A.weight``, the
adapter's LoraConfig in the file's metadata). ``write_kohya_lora`` writes the same weights as kohya-ss/A1111 do:
``lora_unet_…lora_down.weight`` with an ``.alpha`` per layer, text-encoder keys under ``lora_te_`` (SD1.x) or
``lora_te1_``/``lora_te2_`` (SDXL), named after transformers 4's ``text_model.`` level as every file in the wild is.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class LoraFile:
    path: Path
    peft_state: dict[str, torch.Tensor]  # "<component>.<module>.lora_A.weight" …, for writing other formats
    rank: int
    alpha: float


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        # peft looks for the base model's config to see whether the vocabulary grew; these modules have none.
        warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
        return get_peft_model_state_dict(module)


def write_diffusers_lora(folder: Path, out_dir: Path, *, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                         text_encoder: bool = True, sdxl: bool = False) -> LoraFile:
    """A random LoRA for the model in ``folder``, saved by diffusers as ``out_dir/pytorch_lora_weights.safetensors``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS))
    _randomise(unet, seed)
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(_peft_state(unet)),
              "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    peft_state = {f"unet.{k}": v for k, v in _peft_state(unet).items()}
    encoders = [("text_encoder", CLIPTextModel)]
    if sdxl:
        encoders.append(("text_encoder_2", CLIPTextModelWithProjection))
    for i, (name, cls) in enumerate(encoders if text_encoder else []):
        te = cls.from_pretrained(folder, subfolder=name)
        te.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=TEXT_TARGETS))
        _randomise(te, seed + 1 + i)
        state = _peft_state(te)
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state)
        layers[f"{name}_lora_adapter_metadata"] = te.peft_config["default"].to_dict()
        peft_state.update({f"{name}.{k}": v for k, v in state.items()})
    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipeline.save_lora_weights(out_dir, safe_serialization=True, **layers)
    return LoraFile(out_dir / "pytorch_lora_weights.safetensors", peft_state, rank, alpha)


def write_kohya_lora(lora: LoraFile, path: Path, *, sdxl: bool = False, sgm_unet_config: dict | None = None) -> Path:
    """The same LoRA in kohya-ss/A1111 layout (diffusers' PEFT -> kohya converter, with the real alphas).

    ``sgm_unet_config``: name the UNet layers as kohya's SDXL trainer does, after the original (SGM) UNet's
    blocks (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), using the pack's own diffusers -> LDM
    key mapping for a UNet of that config.
    """
    from ip2p_nodes.pipeline_core.models import ldm_sdxl

    named = {}
    for key, value in lora.peft_state.items():
        component, rest = key.split(".", 1)
        if component == "unet" and sgm_unet_config is not None:
            module, _, tail = rest.partition(".lora_")
            rest = ldm_sdxl.unet_key_to_ldm(module + ".weight", sgm_unet_config)[: -len(".weight")] + ".lora_" + tail
        if component.startswith("text_encoder") and not rest.startswith("text_model."):
            rest = "text_model." + rest  # the level every kohya file names (transformers 4's CLIPTextModel)
        named[f"{component}.{rest}"] = value
    kohya = convert_state_dict_to_kohya(named)
    out = {}
    for key, value in kohya.items():
        if not sdxl and key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_"):]  # SD1.x files have one text encoder: lora_te_
        if key.endswith(".alpha"):
            value = torch.tensor(float(lora.alpha))
        out[key] = value.contiguous()
    save_file(out, str(path))
    return path
