"""The example workflow files in ``workflows/``, read without ComfyUI: UI format 0.4 with consistent links, a
thumbnail per workflow, our nodes tagged with the pack id and version, the model files users actually have.

That they load, validate and run in a real ComfyUI is checked by the comfyui tier (``test_workflows.py``) and
in the web app by the browser tier (``test_workflows_in_browser.py``).
"""

from __future__ import annotations

import tomllib

import pytest
from PIL import Image

from ip2p_nodes.pipeline_core.training.toy import TOY_MODEL_CHOICE
from support import model_files
from support import workflow_format as wf
from support.example_workflows import REPO, WORKFLOW_DIR, WORKFLOW_NAMES, workflow_path

PACK_ID = "ip2p-nodes"
PACK_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

MODEL_WIDGETS = {
    "IP2PModelLoader": model_files.IP2P_NAME,
    "CheckpointLoaderSimple": model_files.SD15_NAME,
    "ControlNetLoader": model_files.CONTROLNET_NAME,
}
# The toy demo names the pack's embedded model, which every install has.
MODEL_WIDGETS_OF = {"toy_demo": {"IP2PModelLoader": TOY_MODEL_CHOICE}}


def test_the_six_workflows_ship_each_with_a_jpeg_thumbnail_of_the_same_name():
    assert sorted(p.stem for p in WORKFLOW_DIR.glob("*.json")) == sorted(WORKFLOW_NAMES)
    for name in WORKFLOW_NAMES:
        with Image.open(WORKFLOW_DIR / f"{name}.jpg") as thumbnail:
            assert thumbnail.format == "JPEG"
            assert min(thumbnail.size) >= 300, f"{name}.jpg is too small to show the graph"


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_is_ui_format_0_4_with_consistent_links(name):
    workflow = wf.load(workflow_path(name))
    assert workflow["version"] == 0.4
    assert {"nodes", "links", "groups", "extra", "last_node_id", "last_link_id"} <= set(workflow)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]), "duplicate node ids"
    assert workflow["last_node_id"] >= max(nodes)
    for link_id, source, source_slot, target, target_slot, link_type in workflow["links"]:
        assert workflow["last_link_id"] >= link_id
        output = nodes[source]["outputs"][source_slot]
        target_input = nodes[target]["inputs"][target_slot]
        assert link_id in (output["links"] or []), f"link {link_id} missing from its source's output"
        assert target_input["link"] == link_id, f"link {link_id} missing from its target's input"
        assert output["type"] == link_type or target_input["type"] == link_type
    for node in workflow["nodes"]:
        for slot in node.get("inputs") or []:
            assert slot.get("link") is None or slot["link"] in {row[0] for row in workflow["links"]}


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_our_nodes_carry_the_pack_id_and_version(name):
    ours = [n for n in wf.load(workflow_path(name))["nodes"] if n["type"].startswith("IP2P")]
    assert ours, "every example uses the pack's nodes"
    for node in ours:
        assert node["properties"].get("cnr_id") == PACK_ID, node["type"]
        assert node["properties"].get("ver") == PACK_VERSION, node["type"]


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_model_widgets_name_the_files_users_have(name):
    expected = {**MODEL_WIDGETS, **MODEL_WIDGETS_OF.get(name, {})}
    for node in wf.load(workflow_path(name))["nodes"]:
        if node["type"] in expected:
            assert node["widgets_values"][0] == expected[node["type"]], node["type"]
