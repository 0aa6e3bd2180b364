"""The example workflows in ``workflows/``: their names, and how the comfyui and browser tiers run them and check
what they save.

The runs are shrunk to RUN_SIZE px and RUN_STEPS steps (``shrink``); the toy demo runs exactly as shipped (its
embedded model is tiny) on the shipped sample picture, and its edit is checked against the exactly correct one.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

from ip2p_nodes.pipeline_core.training.evaluation import rule_check
from ip2p_nodes.pipeline_core.training.toy import sample_triplet

from . import workflow_format as wf

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_DIR = REPO / "workflows"

WORKFLOW_NAMES = ["basic_edit", "txt2img_edit_inpaint", "guidance_sweep", "batch_edit", "controlnet_edit", "toy_demo"]
# Run exactly as shipped (no shrinking): the toy model is tiny, and what it makes is checked.
AS_SHIPPED = {"toy_demo"}
TOY_SIZE = 32

RUN_SIZE = 64  # px: the test runs every picture at this size
RUN_STEPS = 1
# What each workflow's SaveImage nodes (by filename prefix) must write at RUN_SIZE: (image count, width).
# Grids: 3 columns of 64 px with 4 px gaps for the sweep, 2 columns for the batch; their height is checked
# to include the caption strips.
EXPECTED_IMAGES = {
    "basic_edit": {"ip2p/edit": (1, RUN_SIZE)},
    "txt2img_edit_inpaint": {"ip2p/1_txt2img": (1, RUN_SIZE), "ip2p/2_edited": (1, RUN_SIZE),
                             "ip2p/3_inpainted": (1, RUN_SIZE)},
    "guidance_sweep": {"ip2p/sweep_grid": (1, 3 * RUN_SIZE + 2 * 4)},
    "batch_edit": {"ip2p/batch": (6, RUN_SIZE), "ip2p/batch_grid": (1, 2 * RUN_SIZE + 4)},
    "controlnet_edit": {"ip2p/controlnet": (1, RUN_SIZE), "ip2p/controlnet_edited": (1, RUN_SIZE)},
    "toy_demo": {"ip2p/toy_edit": (1, TOY_SIZE), "ip2p/toy_edit_x8": (1, 8 * TOY_SIZE)},
}
GRID_ROWS = {"ip2p/sweep_grid": 6, "ip2p/batch_grid": 3}


def workflow_path(name: str) -> Path:
    return WORKFLOW_DIR / f"{name}.json"


def nodes_of(workflow: dict, *, backend_only: bool = True) -> list[dict]:
    return [n for n in workflow["nodes"] if not (backend_only and n["type"] in wf.FRONTEND_ONLY_NODES)]


def write_example_image(path: Path) -> Path:
    """A small stand-in for ComfyUI's example.png (sky, hill, a figure), at the test's run size."""
    image = Image.new("RGB", (RUN_SIZE, RUN_SIZE), (90, 150, 250))
    draw = ImageDraw.Draw(image)
    draw.ellipse((-16, 36, 80, 110), fill=(90, 230, 90))
    draw.rectangle((26, 22, 38, 50), fill=(250, 170, 210))
    draw.ellipse((25, 10, 39, 24), fill=(250, 240, 230))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def shrink(prompt: dict, name: str) -> dict:
    """The same graph at the test's cost: RUN_STEPS steps, RUN_SIZE px latents (input images are RUN_SIZE)."""
    prompt = json.loads(json.dumps(prompt))
    if name in AS_SHIPPED:
        return prompt
    for node in prompt.values():
        inputs = node["inputs"]
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = RUN_STEPS
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=RUN_SIZE, height=RUN_SIZE)
    return prompt


def check_saved_images(server, name: str, workflow: dict, entry: dict) -> None:
    prefixes = {
        str(n["id"]): n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "SaveImage"
    }
    assert sorted(prefixes.values()) == sorted(EXPECTED_IMAGES[name])
    for node_id, prefix in prefixes.items():
        files = server.output_files(entry, node_id)
        count, width = EXPECTED_IMAGES[name][prefix]
        assert len(files) == count, f"{prefix}: {len(files)} images, expected {count}"
        for path in files:
            assert path.is_file(), path
            with Image.open(path) as image:
                assert image.width == width, f"{path.name}: {image.size}"
                if prefix in GRID_ROWS:
                    assert image.height > GRID_ROWS[prefix] * RUN_SIZE, "the grid has no caption strips"
                else:
                    assert image.height == width, f"{path.name}: {image.size}"
    if name == "toy_demo":
        check_toy_edit(server, workflow, entry)


def check_toy_edit(server, workflow: dict, entry: dict) -> None:
    """The shipped toy demo does what its instruction says: the circle turned red, and nothing else moved."""
    import numpy as np

    saved = {n["widgets_values"][0]: str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveImage"}
    [edit_path] = server.output_files(entry, saved["ip2p/toy_edit"])
    [big_path] = server.output_files(entry, saved["ip2p/toy_edit_x8"])
    with Image.open(edit_path) as image:
        edit = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    ok, why = rule_check(sample_triplet(), edit)
    assert ok, f"the toy demo's edit: {why}"
    with Image.open(big_path) as image:
        big = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    # Enlarged with nearest-neighbour: every model pixel is one 8 x 8 square of the same colour.
    assert np.array_equal(big, edit.repeat(8, 0).repeat(8, 1))
