"""SD1.5-based InstructPix2Pix: timbrooks/instruct-pix2pix, MagicBrush, HQ-Edit, InstructDiffusion, the toy model.

One CLIP-L text encoder (last hidden state, as the original code and diffusers' IP2P pipeline read it), an
unscaled image latent, eps prediction, Euler ancestral (the paper's sampler), 512² working area.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from ...errors import ModelLoadError
from .. import ldm_format
from ..components import IP2PComponents
from ..precision import Precision
from .base import (
    Family,
    TextEncoding,
    check_tokenizer,
    fix_position_ids,
    folder_text_encoder,
    folder_unet_vae,
    read_json,
    single_file_tokenizer,
    tokenize,
)

SDXL_TEXT_PREFIX = "conditioner.embedders."


class SD15Family(Family):
    name = "sd15"
    label = "SD1.x InstructPix2Pix"
    latent_format = "SD15"
    config_dir = "sd15"
    default_resolution = 512
    default_guidance = (7.5, 1.5)
    default_scheduler = "euler_ancestral"
    lora_loader = StableDiffusionLoraLoaderMixin

    @classmethod
    def matches_checkpoint(cls, state: Mapping[str, torch.Tensor]) -> bool:
        # SD1.x files keep CLIP-L under cond_stage_model; SDXL's two encoders live under conditioner.embedders.
        return any(k.startswith(ldm_format.CLIP_PREFIX) for k in state) and not any(
            k.startswith(SDXL_TEXT_PREFIX) for k in state
        )

    @classmethod
    def matches_folder(cls, index: dict, unet_config: dict, scheduler_config: dict) -> bool:
        return "text_encoder" in index and "text_encoder_2" not in index

    def load_folder(self, path: Path, precision: Precision, device: torch.device, source) -> IP2PComponents:
        from transformers import CLIPTextModel, CLIPTokenizer

        scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
        try:
            modules = {
                **folder_unet_vae(path, precision, device),
                "text_encoder": folder_text_encoder(path, "text_encoder", CLIPTextModel, precision.text_encoder),
                "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
            }
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{path.name}: the diffusers folder could not be loaded ({exc})") from exc
        return self.assemble(modules, scheduler_config, precision, device, source)

    def load_checkpoint(self, path: Path, state: dict, metadata: dict | None, precision: Precision,
                        device: torch.device, source) -> IP2PComponents:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        configs = ldm_format.decode_metadata(metadata) or self.shipped_configs(
            ("unet", "vae", "text_encoder", "scheduler")
        )
        tokenizer_files = configs.pop("tokenizer", None)
        try:
            unet_sd, vae_sd, text_sd = ldm_format.from_ldm_state_dict(state, configs["unet"], configs["vae"])
            state.clear()  # the converted copies are all that is needed from here on
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(configs["unet"])
                vae = AutoencoderKL.from_config(configs["vae"])
                text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
            # assign=True adopts the file's tensors instead of copying into meta tensors; strict names every
            # missing or unexpected weight, which is how a file of another architecture shows.
            unet.load_state_dict(unet_sd, strict=True, assign=True)
            vae.load_state_dict(vae_sd, strict=True, assign=True)
            ldm_format.load_text_encoder(text_encoder, text_sd)
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:
            raise ModelLoadError(
                f"{path.name}: the weights do not fit an {self.label} model ({str(exc)[:400]})"
            ) from exc
        fix_position_ids(text_encoder)
        tokenizer = single_file_tokenizer(path, tokenizer_files, source.tokenizer_dir)
        check_tokenizer(path, tokenizer, text_encoder)
        modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
        return self.assemble(modules, configs["scheduler"], precision, device, source)

    def checkpoint_state(self, modules: dict[str, torch.nn.Module], scheduler_config: dict) -> dict[str, torch.Tensor]:
        return ldm_format.to_ldm_state_dict(modules["unet"], modules["vae"], modules["text_encoder"])

    def encode_text(self, components: IP2PComponents, text: str) -> TextEncoding:
        # max_position_embeddings, not tokenizer.model_max_length: ComfyUI's SD1 tokenizer says 8192.
        ids = tokenize(components.tokenizer, text, components.max_text_tokens)
        with torch.inference_mode():
            embeds = components.text_encoder(ids.to(components.device))[0]
        return TextEncoding(embeds.float().cpu())
