"""SDXL-based InstructPix2Pix (``diffusers/sdxl-instructpix2pix-768`` and fine-tunes of its layout).

Two text encoders, read as diffusers' ``StableDiffusionXLInstructPix2PixPipeline.encode_prompt`` and ComfyUI's
``SDXLClipModel`` read them: the penultimate hidden states of CLIP-L and CLIP-G concatenated (768 + 1280 =
2048 wide), and CLIP-G's projected pooled output (``text_embeds``) for the added conditioning, together with
the six size ids (original size, crop top-left, target size). CLIP-G's tokenizer pads with id 0 ("!" in CLIP's
vocabulary) where CLIP-L's pads with end-of-text, as SDXL's ``tokenizer_2`` and ComfyUI's SDXL tokenizer do.
An empty negative prompt is encoded as text (ComfyUI), not replaced by zeros (diffusers'
``force_zeros_for_empty_prompt``). The image latent is unscaled, as in the paper (diffusers' ``is_cosxl_edit``
off; ComfyUI's ``SDXL_instructpix2pix`` for an eps model), eps prediction.

Defaults: guidance 3.0 / 1.5 (the model card), the folder's own scheduler, else Euler (SDXL's
``EulerDiscreteScheduler``, which the 768 model's folder carries from SDXL base), working area 768² for single
files (the shipped config; a folder's UNet ``sample_size`` wins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

from ...errors import ModelLoadError
from .. import ldm_format, ldm_sdxl
from ..components import IP2PComponents
from ..precision import Precision
from .base import (
    Family,
    TextEncoding,
    check_tokenizer,
    checkpoint_facts,
    fix_position_ids,
    folder_text_encoder,
    folder_unet_vae,
    read_json,
    single_file_tokenizer,
    tokenize,
)

# SDXL's added conditioning: pooled CLIP-G + 6 size ids, each embedded in this many sinusoid features.
SIZE_IDS = 6
ROLES = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")


def has_sdxl_text_encoders(state: Mapping[str, torch.Tensor]) -> bool:
    """CLIP-L under ``conditioner.embedders.0.transformer``, CLIP-G (open_clip) under ``...embedders.1.model``."""
    return (ldm_sdxl.CLIP_G_PREFIX + "positional_embedding") in state and any(
        k.startswith(ldm_sdxl.CLIP_L_PREFIX) for k in state
    )


def sdxl_conditioning_fits(state: Mapping[str, torch.Tensor]) -> bool:
    """The UNet reads what the two text encoders give: context = CLIP-L + CLIP-G width (768 + 1280 = 2048 in the
    real model), adm input = CLIP-G's projection + 6 size embeddings (1280 + 6 x 256 = 2816)."""
    facts = checkpoint_facts(state)
    width_l = state.get(ldm_sdxl.CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight")
    width_g = state.get(ldm_sdxl.CLIP_G_PREFIX + "token_embedding.weight")
    projection = state.get(ldm_sdxl.CLIP_G_PREFIX + "text_projection")
    if width_l is None or width_g is None or projection is None or not facts["adm_channels"]:
        return False
    size_part = facts["adm_channels"] - int(projection.shape[1])
    return facts["context_dim"] == int(width_l.shape[1]) + int(width_g.shape[1]) and size_part > 0 and (
        size_part % SIZE_IDS == 0
    )


def clip_g_pad_kwargs(tokenizer) -> dict[str, Any]:
    """CLIP-G's tokenizer is CLIP-L's vocabulary padding with the id-0 token: "!" for CLIP's own vocabulary
    (SDXL's ``tokenizer_2``, ComfyUI's ``SDXLClipGTokenizer(pad_with_end=False)``)."""
    return {"pad_token": tokenizer.convert_ids_to_tokens(0)}


class SDXLFamily(Family):
    name = "sdxl"
    label = "SDXL InstructPix2Pix"
    latent_format = "SDXL"
    config_dir = "sdxl"
    default_resolution = 1024
    default_guidance = (3.0, 1.5)
    default_scheduler = "euler"
    lora_loader = StableDiffusionXLLoraLoaderMixin
    roles: ClassVar[tuple[str, ...]] = ROLES

    # ------------------------------------------------------------------------------------------ detection
    @classmethod
    def matches_checkpoint(cls, state: Mapping[str, torch.Tensor]) -> bool:
        return (
            has_sdxl_text_encoders(state)
            and sdxl_conditioning_fits(state)
            and ldm_sdxl.edm_vpred_sigmas(state) is None  # those are CosXL's
        )

    @classmethod
    def matches_folder(cls, index: dict, unet_config: dict, scheduler_config: dict) -> bool:
        return (
            "text_encoder_2" in index
            and unet_config.get("addition_embed_type") == "text_time"
            and not is_cosxl_folder(index, scheduler_config)
        )

    # ------------------------------------------------------------------------------------------ loading
    def load_folder(self, path: Path, precision: Precision, device: torch.device, source) -> IP2PComponents:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
        try:
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
            if (path / "tokenizer_2").is_dir():
                tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
            else:  # the same vocabulary; only the padding differs
                tokenizer_2 = CLIPTokenizer.from_pretrained(
                    path, subfolder="tokenizer", local_files_only=True, **clip_g_pad_kwargs(tokenizer)
                )
            modules = {
                **folder_unet_vae(path, precision, device),
                "text_encoder": folder_text_encoder(path, "text_encoder", CLIPTextModel, precision.text_encoder),
                "text_encoder_2": folder_text_encoder(path, "text_encoder_2", CLIPTextModelWithProjection,
                                                      precision.text_encoder),
                "tokenizer": tokenizer,
                "tokenizer_2": tokenizer_2,
            }
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{path.name}: the diffusers folder could not be loaded ({exc})") from exc
        return self.assemble(modules, self.folder_scheduler_config(scheduler_config), precision, device, source)

    def folder_scheduler_config(self, scheduler_config: dict) -> dict:
        """The scheduler config a folder's model samples with (CosXL completes it from its EDM defaults)."""
        return scheduler_config

    def single_file_scheduler_config(self, configs: dict, state: Mapping[str, torch.Tensor]) -> dict:
        return configs["scheduler"]

    def load_checkpoint(self, path: Path, state: dict, metadata: dict | None, precision: Precision,
                        device: torch.device, source) -> IP2PComponents:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        configs = ldm_format.decode_metadata(metadata) or self.shipped_configs(self.roles)
        tokenizer_files = configs.pop("tokenizer", None)
        scheduler_config = self.single_file_scheduler_config(configs, state)
        try:
            unet_sd, vae_sd, clip_l_sd, clip_g_sd = ldm_sdxl.from_ldm_state_dict(
                state, configs["unet"], configs["vae"], configs["text_encoder_2"]
            )
            state.clear()  # the converted copies are all that is needed from here on
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(configs["unet"])
                vae = AutoencoderKL.from_config(configs["vae"])
                text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
                text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
            # assign=True adopts the file's tensors instead of copying into meta tensors; strict names every
            # missing or unexpected weight, which is how a file of another architecture shows.
            unet.load_state_dict(unet_sd, strict=True, assign=True)
            vae.load_state_dict(vae_sd, strict=True, assign=True)
            ldm_format.load_text_encoder(text_encoder, clip_l_sd)
            clip_g_sd = ldm_sdxl.match_text_encoder_2_keys(clip_g_sd, set(text_encoder_2.state_dict()))
            missing, unexpected = text_encoder_2.load_state_dict(clip_g_sd, strict=False, assign=True)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise RuntimeError(f"text encoder 2: missing {missing[:3]}, unexpected {unexpected[:3]}")
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:
            raise ModelLoadError(
                f"{path.name}: the weights do not fit an {self.label} model ({str(exc)[:400]})"
            ) from exc
        fix_position_ids(text_encoder)
        fix_position_ids(text_encoder_2)
        tokenizer = single_file_tokenizer(path, tokenizer_files, source.tokenizer_dir)
        tokenizer_2 = single_file_tokenizer(path, tokenizer_files, source.tokenizer_dir, **clip_g_pad_kwargs(tokenizer))
        check_tokenizer(path, tokenizer, text_encoder)
        check_tokenizer(path, tokenizer_2, text_encoder_2)
        modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
                   "tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
        return self.assemble(modules, scheduler_config, precision, device, source)

    def checkpoint_state(self, modules: dict[str, torch.nn.Module], scheduler_config: dict) -> dict[str, torch.Tensor]:
        if modules.get("text_encoder_2") is None:
            raise ValueError(f"an {self.label} model has two text encoders; text_encoder_2 is missing")
        return ldm_sdxl.to_ldm_state_dict(modules["unet"], modules["vae"], modules["text_encoder"],
                                          modules["text_encoder_2"], scheduler_config)

    # ------------------------------------------------------------------------------------------ conditioning
    def encode_text(self, components: IP2PComponents, text: str) -> TextEncoding:
        c = components
        ids_l = tokenize(c.tokenizer, text, int(c.text_encoder.config.max_position_embeddings))
        ids_g = tokenize(c.tokenizer_2, text, int(c.text_encoder_2.config.max_position_embeddings))
        with torch.inference_mode():
            out_l = c.text_encoder(ids_l.to(c.device), output_hidden_states=True)
            out_g = c.text_encoder_2(ids_g.to(c.device), output_hidden_states=True)
            # Penultimate layer, without the final layer norm, of both encoders (sgm's "penultimate" CLIP layer).
            embeds = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
            pooled = out_g.text_embeds
        return TextEncoding(embeds.float().cpu(), pooled.float().cpu())

    def time_ids(self, components: IP2PComponents, original_size: tuple[int, int], target_size: tuple[int, int],
                 crop: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """diffusers' ``_get_add_time_ids``: (original h, w, crop top, left, target h, w), as [1, 6] float32."""
        ids = [*original_size, *crop, *target_size]
        expected = components.unet.add_embedding.linear_1.in_features
        unet_config, clip_g = components.unet.config, components.text_encoder_2.config
        passed = unet_config.addition_time_embed_dim * len(ids) + clip_g.projection_dim
        if expected != passed:
            raise ModelLoadError(
                f"{components.source.name}: the UNet's added conditioning takes {expected} features but the text "
                f"encoder and size ids give {passed}; the UNet and text encoders do not belong together"
            )
        return torch.tensor([ids], dtype=torch.float32)


def is_cosxl_folder(index: Mapping[str, Any], scheduler_config: Mapping[str, Any]) -> bool:
    """A CosXL Edit folder: an EDM v-prediction scheduler, or ``"is_cosxl_edit": true`` in model_index.json.

    diffusers keeps ``is_cosxl_edit`` out of the pipeline config it saves, so a folder written by
    ``save_pretrained`` records CosXL only through its scheduler; the marker is for folders whose scheduler was
    left at SDXL's default (e.g. converted with ``from_single_file``, which does not read ``edm_vpred.*``).
    """
    return bool(index.get("is_cosxl_edit")) or ldm_sdxl.is_edm_vpred(scheduler_config)
