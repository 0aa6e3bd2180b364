"""Where IP2P Load CLIP Scorer finds CLIPs, and how a picked name becomes a :class:`ClipSource`.

A CLIP for scoring is a transformers ``CLIPModel`` folder (``config.json`` with ``model_type`` "clip", weights,
tokenizer files): both towers, image and text. They are looked for in ComfyUI's ``models/clip`` (with
``models/text_encoders``, the same key in ComfyUI) and in ``models/ip2p_clip``, the pack's own folder. Single
files there (``clip_l.safetensors``) are text encoders only and are not offered. The shipped toy CLIP is the last
choice, so with no CLIP folder at all the node still runs (on the shapes world it was trained for).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import folder_paths

from ..pipeline_core.errors import ModelLoadError
from ..pipeline_core.models.assets import TOY_CLIP_CHOICE, toy_clip_path
from ..pipeline_core.scoring import ClipSource

PACK_FOLDER = "ip2p_clip"
SEARCHED = ("text_encoders", PACK_FOLDER)  # "text_encoders" holds models/clip too


def register_clip_folder() -> str:
    """Add ``models/ip2p_clip``, after any path ``extra_model_paths.yaml`` gave it. Idempotent."""
    default = os.path.join(folder_paths.models_dir, PACK_FOLDER)
    folder_paths.add_model_folder_path(PACK_FOLDER, default, is_default=False)
    return default


def _is_clip_folder(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False


def clip_folders() -> dict[str, str]:
    """Name shown -> absolute folder, for every CLIP folder under the searched model folders."""
    found: dict[str, str] = {}
    for key in SEARCHED:
        if key not in folder_paths.folder_names_and_paths:
            continue
        for base in folder_paths.get_folder_paths(key):
            if not os.path.isdir(base):
                continue
            for root, subdirs, files in os.walk(base, followlinks=True):
                if "config.json" in files and _is_clip_folder(root):
                    found.setdefault(os.path.relpath(root, base), str(Path(root).resolve()))
                    subdirs[:] = []
    return dict(sorted(found.items()))


def list_choices() -> list[str]:
    return [*clip_folders(), TOY_CLIP_CHOICE]


def resolve(choice: str, hub_id: str = "") -> ClipSource:
    """The CLIP a loader node means: ``hub_id`` when filled in (an id, a folder path or 'toy'), else ``choice``."""
    if (hub_id or "").strip():
        return ClipSource.from_text(hub_id)
    if choice == TOY_CLIP_CHOICE:
        return ClipSource("folder", str(toy_clip_path()))
    folders = clip_folders()
    if choice in folders:
        return ClipSource("folder", folders[choice])
    searched = [p for k in SEARCHED if k in folder_paths.folder_names_and_paths
                for p in folder_paths.get_folder_paths(k)]
    raise ModelLoadError(
        f"{choice or '(nothing picked)'}: no CLIP folder of that name in {', '.join(searched)}; put a transformers "
        "CLIP folder (config.json, model.safetensors, tokenizer files, e.g. openai/clip-vit-large-patch14) there "
        "and refresh (R), or type a Hugging Face id in hub_id"
    )
