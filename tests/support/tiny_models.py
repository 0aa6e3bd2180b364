"""Tiny random InstructPix2Pix models of the SD1.5 shape, built from configs (no download, under a second).

Same module kinds and layout as SD1.5 (8-channel UNet with cross-attention blocks, a 4-level VAE with
scale factor 8, a CLIP text encoder), only narrow, so every code path of the real model runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ip2p_nodes.pipeline_core.models.loading import CONFIG_DIR
from ip2p_nodes.pipeline_core.training.byte_tokenizer import byte_level_vocab, write_byte_level_tokenizer

SCHEDULER_CONFIG = json.loads((CONFIG_DIR / "sd15" / "scheduler.json").read_text())


def write_tokenizer(directory: Path) -> CLIPTokenizer:
    return write_byte_level_tokenizer(directory)


def make_components(seed: int = 0, in_channels: int = 8, tokenizer_dir: Path | None = None,
                    unet_channels: tuple[int, int] = (32, 64)):
    """UNet, VAE, text encoder (and tokenizer when ``tokenizer_dir`` is given). Wider ``unet_channels`` make a
    model of a measurable size for memory tests: (320, 640) has 108 M UNet parameters (433 MB in fp32)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        # SD1.5's own sample size (64 latents = 512 px): the pack reads the model's working area from it.
        sample_size=64,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=tuple(unet_channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
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
    )
    vocab = byte_level_vocab()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    # Random init leaves GroupNorm/LayerNorm at identity and many convs near zero; perturb everything so a
    # wrong key mapping or a skipped pass changes the output measurably.
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    tokenizer = write_tokenizer(tokenizer_dir) if tokenizer_dir else None
    return unet.eval(), vae.eval(), text_encoder.eval(), tokenizer


def save_diffusers_folder(path: Path, seed: int = 0, in_channels: int = 8) -> Path:
    """A diffusers-format IP2P folder (model_index.json + components), as `save_pretrained` writes it."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    unet, vae, text_encoder, tokenizer = make_components(seed, in_channels, tokenizer_dir=path / "_tok")
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path))
    return path
