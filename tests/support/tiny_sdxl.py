"""Tiny random InstructPix2Pix models of the SDXL shape (SDXL-IP2P, CosXL Edit), built from configs, no download.

Same module kinds and wiring as the real SDXL models, only narrow: an 8-channel UNet with ``text_time`` added
conditioning (pooled text + six size ids), attention only in the lower block with two transformer layers (as
SDXL's blocks have several), cross-attention over the two text encoders' hidden states concatenated; a CLIP-L
``CLIPTextModel`` and a CLIP-G ``CLIPTextModelWithProjection`` of *different* widths and a projection of a
third width, so a swapped concatenation order or an untransposed projection changes shapes or numbers; a
4-level VAE with SDXL's scaling factor 0.13025. Tokenizers are the pack's byte-level CLIP tokenizer; the second
one pads with id 0, as SDXL's ``tokenizer_2`` (``pad_token`` "!", id 0 in CLIP's vocabulary) and ComfyUI do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ip2p_nodes.pipeline_core.training.byte_tokenizer import byte_level_vocab, write_byte_level_tokenizer

_CONFIGS = Path(__file__).parents[2] / "pipeline_core" / "models" / "configs"
SDXL_SCHEDULER_CONFIG = json.loads((_CONFIGS / "sdxl" / "scheduler.json").read_text())
COSXL_SCHEDULER_CONFIG = json.loads((_CONFIGS / "cosxl" / "scheduler.json").read_text())

CLIP_L_WIDTH = 32
CLIP_G_WIDTH = 48
POOLED_WIDTH = 24  # CLIP-G projection_dim
TIME_EMBED_WIDTH = 8  # addition_time_embed_dim: each of the six size ids gets this many sinusoid features
# ComfyUI's SDXL model embeds each size id with a fixed 256-wide sinusoid (``model_base.SDXL.embedder``), as the
# real SDXL UNet does: the native cross-check builds its tiny UNet with this width.
COMFYUI_TIME_EMBED_WIDTH = 256


@dataclass
class TinySDXL:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer | None
    tokenizer_2: CLIPTokenizer | None

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                "text_encoder_2": self.text_encoder_2}


def write_tokenizers(directory: Path) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """The byte-level tokenizer, and the same vocabulary padding with the id-0 token (SDXL's tokenizer_2)."""
    tokenizer = write_byte_level_tokenizer(directory)
    tokenizer_2 = CLIPTokenizer.from_pretrained(
        str(directory), local_files_only=True, pad_token=tokenizer.convert_ids_to_tokens(0)
    )
    assert tokenizer_2.pad_token_id == 0
    return tokenizer, tokenizer_2


def _clip_config(width: int, hidden_act: str, **extra: Any) -> CLIPTextConfig:
    vocab = byte_level_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=width + 5,
        num_attention_heads=4,
        num_hidden_layers=3,  # penultimate layer != last, and != first
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **extra,
    )


def unet_config(in_channels: int = 8, sample_size: int = 8, time_embed_width: int = TIME_EMBED_WIDTH) -> dict[str, Any]:
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "cross_attention_dim": CLIP_L_WIDTH + CLIP_G_WIDTH,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed_width,
        "projection_class_embeddings_input_dim": POOLED_WIDTH + 6 * time_embed_width,
        "norm_num_groups": 32,
    }


def make_components(seed: int = 0, in_channels: int = 8, tokenizer_dir: Path | None = None,
                    sample_size: int = 8, time_embed_width: int = TIME_EMBED_WIDTH) -> TinySDXL:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(in_channels, sample_size, time_embed_width))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    text_encoder = CLIPTextModel(_clip_config(CLIP_L_WIDTH, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(CLIP_G_WIDTH, "gelu", projection_dim=POOLED_WIDTH))
    # Random init leaves norms at identity and many weights near zero; perturb everything so a wrong key
    # mapping, a swapped encoder or a skipped pass changes the output measurably.
    with torch.no_grad():
        for module in (unet, vae, text_encoder, text_encoder_2):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    tokenizer, tokenizer_2 = write_tokenizers(tokenizer_dir) if tokenizer_dir else (None, None)
    return TinySDXL(unet.eval(), vae.eval(), text_encoder.eval(), text_encoder_2.eval(), tokenizer, tokenizer_2)


def make_pipeline(tiny: TinySDXL, cosxl: bool = False, scheduler=None):
    """diffusers' ``StableDiffusionXLInstructPix2PixPipeline`` over the same modules.

    ``force_zeros_for_empty_prompt=False`` makes it encode an empty negative prompt as text, as ComfyUI and this
    pack do (diffusers' default zeroes it); no watermark, which would change the pixels.
    """
    from diffusers import EDMEulerScheduler, EulerDiscreteScheduler, StableDiffusionXLInstructPix2PixPipeline

    if scheduler is None:
        scheduler = (EDMEulerScheduler.from_config(COSXL_SCHEDULER_CONFIG) if cosxl
                     else EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG))
    return StableDiffusionXLInstructPix2PixPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        text_encoder_2=tiny.text_encoder_2,
        tokenizer=tiny.tokenizer,
        tokenizer_2=tiny.tokenizer_2,
        unet=tiny.unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
        is_cosxl_edit=cosxl,
    )


def save_diffusers_folder(path: Path, seed: int = 0, cosxl: bool = False, in_channels: int = 8) -> Path:
    """A diffusers-format SDXL-IP2P (or CosXL Edit, with its EDM scheduler) folder as ``save_pretrained`` writes it.

    The UNet's ``sample_size`` is the real model's (96: SDXL-IP2P-768 works at 768², 128: CosXL at 1024²), so
    the default working area is the real one; it costs nothing, the UNet takes any latent size.
    """
    tiny = make_components(seed, in_channels, tokenizer_dir=path / "_tok", sample_size=128 if cosxl else 96)
    make_pipeline(tiny, cosxl=cosxl).save_pretrained(str(path))
    return path
