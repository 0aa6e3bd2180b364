"""The example workflows the pack ships in ``workflows/``: a short key for code and tests, and the file name.

ComfyUI's Templates browser (frontend 1.35, ComfyUI 0.8) shows a custom-node template by its file name alone:
the title is the file name without ``.json``, the line under it the same with ``-`` and ``_`` as spaces, and
the picture the ``.jpg`` of the same name, fitted into a square; it reads nothing else from the file (the
server lists only file names, ``app/custom_node_manager.py``). So the file names are the titles users read:
short plain words (one line of the card holds about 28 characters), no ``-`` or ``_``.
"""

from __future__ import annotations

from pathlib import Path

WORKFLOW_DIR = Path(__file__).resolve().parents[2] / "workflows"

TITLES = {
    "basic_edit": "Basic instruction edit",
    "txt2img_edit_inpaint": "Text to image, edit, inpaint",
    "guidance_sweep": "Guidance sweep grid",
    "batch_edit": "Batch edit",
    "controlnet_edit": "ControlNet, then edit",
    "toy_demo": "Toy demo, no download",
    "cosxl_edit": "CosXL masked edit",
    "controlnet_guided_edit": "ControlNet guided edit",
}
KEYS = list(TITLES)
TITLE_CHARS = 28


def path(key: str) -> Path:
    """The workflow's ``.json``."""
    return WORKFLOW_DIR / f"{TITLES[key]}.json"


def thumbnail(key: str) -> Path:
    """The ``.jpg`` the Templates browser shows for it."""
    return WORKFLOW_DIR / f"{TITLES[key]}.jpg"
