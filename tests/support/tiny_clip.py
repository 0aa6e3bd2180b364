"""A tiny random transformers CLIP folder (image and text towers), built from a config in well under a second.

Same layout as a real CLIP download (config.json with model_type "clip", model.safetensors, tokenizer files,
preprocessor_config.json), only narrow, so the scorer's loading, preprocessing and embedding all run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from ip2p_nodes.pipeline_core.training.byte_tokenizer import write_byte_level_tokenizer

IMAGE_SIZE = 32
MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def write_tiny_clip(folder: Path, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    folder = Path(folder)
    tokenizer = write_byte_level_tokenizer(folder, max_length=32)
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_attention_heads=4, num_hidden_layers=2),
        projection_dim=16,
    ))
    with torch.no_grad():  # random init leaves norms at identity: perturb so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(MEAN),
        "image_std": list(STD), "do_convert_rgb": True,
    }))
    return folder
