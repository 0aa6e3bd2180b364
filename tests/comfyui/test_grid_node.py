"""IP2P Labelled Grid called as ComfyUI calls it, against a real ComfyUI checkout (COMFYUI_DIR)."""

from __future__ import annotations

import pytest
import torch

from support import comfy_harness

comfy_harness.import_comfyui()  # skips this module, saying why, without COMFYUI_DIR

from ip2p_nodes.nodes.grid import IP2PImageGrid  # noqa: E402
from ip2p_nodes.pipeline_core.errors import InputError  # noqa: E402

pytestmark = pytest.mark.comfyui


def run(**inputs):
    """Through the V3 entry point ComfyUI uses, so defaults and optional inputs behave as on the canvas."""
    return IP2PImageGrid.execute(**inputs)


def test_grid_node_turns_a_sampler_batch_and_its_labels_into_one_labelled_image():
    images = torch.rand(6, 32, 48, 3)
    labels = "\n".join(f"seed {s} · text {t} · image 1.5" for s in (1, 2) for t in (5, 7.5, 10)) + "\n"
    (grid,) = run(images=images, labels=labels, columns=3, font_size=0, gap=4).result
    assert grid.shape[0] == 1 and grid.shape[-1] == 3
    assert grid.shape[2] == 3 * 48 + 2 * 4
    assert grid.shape[1] > 2 * 32 + 4, "caption strips are missing"
    assert torch.equal(grid[0, :32, :48], images[0])


def test_grid_node_without_labels_connected_makes_a_plain_grid():
    (grid,) = run(images=torch.rand(4, 8, 8, 3), columns=0, font_size=0, gap=0).result
    assert grid.shape == (1, 16, 16, 3)


def test_grid_node_refuses_labels_of_another_batch_with_a_message_that_says_what_to_connect():
    with pytest.raises(InputError, match="labels has 2 line.*for 3 image.*connect the sampler's labels output"):
        run(images=torch.rand(3, 8, 8, 3), labels="a\nb", columns=0, font_size=0, gap=0)


def test_grid_node_schema_has_tooltips_and_an_optional_labels_socket():
    schema = IP2PImageGrid.GET_SCHEMA()
    assert schema.display_name == "IP2P Labelled Grid" and schema.category == "InstructPix2Pix"
    assert all(i.tooltip for i in schema.inputs) and all(o.tooltip for o in schema.outputs)
    labels = next(i for i in schema.inputs if i.id == "labels")
    assert labels.optional and labels.force_input
