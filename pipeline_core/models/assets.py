"""Files shipped with the pack: the embedded toy model and its sample picture.

Runtime code (the nodes, the CLI demo) finds them here; the recipe that builds them lives in the training tools.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOY_MODEL_NAME = "toy-ip2p.safetensors"
SAMPLE_IMAGE_NAME = "toy-sample.png"
SAMPLE_INSTRUCTION = "make the circle red"
# How the ComfyUI loader lists it. Not a file name (spaces, parentheses, no extension), so no file in a model
# folder can take its place; the example workflow "Toy demo, no download.json" names it.
TOY_MODEL_CHOICE = "toy-ip2p (embedded demo model, shapes)"
# What to type for it where a model is typed (the CLI's --model, the loader's hub_id). A folder named "toy" is
# reached as ./toy.
TOY_MODEL_ALIAS = "toy"
# The toy model's best text guidance in the evaluation grid (7.5, the paper's default, over-saturates it);
# image guidance stays at the paper's 1.5.
TOY_TEXT_GUIDANCE = 3.0
TOY_IMAGE_GUIDANCE = 1.5


def toy_model_path() -> Path:
    """The shipped toy model (a single ``.safetensors`` with configs and tokenizer inside)."""
    return ASSETS_DIR / TOY_MODEL_NAME


def sample_image_path() -> Path:
    """A shipped 32 x 32 sample picture for the demo (a red-free scene with a circle in it)."""
    return ASSETS_DIR / SAMPLE_IMAGE_NAME


TOY_CLIP_NAME = "toy-clip"
# The scorer loader's entry for it; like TOY_MODEL_CHOICE, not a name a folder in models/clip can take.
TOY_CLIP_CHOICE = "toy-clip (embedded, shapes)"
TOY_CLIP_ALIAS = "toy"  # what to type for it: the CLI's --clip toy
# Pick-best's clip_image threshold for the toy CLIP. Its space is coarse: a true edit keeps 0.02-1.0 of a shapes
# picture (median 0.7; "remove" can fall to 0.02), so 0.8, right for a ViT-L/14 on photos, would refuse most
# correct edits. 0.1 is the largest threshold at which pick-best was best on training-split toy sweeps.
TOY_CLIP_THRESHOLD = 0.1


def toy_clip_path() -> Path:
    """The shipped toy CLIP: a transformers CLIPModel folder for the shapes world (a few MB)."""
    return ASSETS_DIR / TOY_CLIP_NAME
