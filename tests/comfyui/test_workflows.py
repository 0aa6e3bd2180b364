"""The example workflows in ``workflows/`` against a real ComfyUI with the pack (``COMFYUI_DIR``; marker ``server``).

Every node type, link and widget value is valid for that ComfyUI, and every workflow, converted to an API prompt,
runs end to end on the CPU and writes its images. The models are random-weight files of the real architectures,
written under the names the workflows use (``support.model_files``); the run is shrunk to 64 px and 1 step. The
toy demo runs exactly as shipped (its embedded model is tiny) on the shipped sample picture, and its edit is
checked against the exactly correct one. The server is shared with the browser tier (``support.fixtures``).
"""

from __future__ import annotations

import time
import urllib.request

import pytest

from support import comfy_harness
from support import workflow_format as wf
from support.example_workflows import (
    AS_SHIPPED,
    RUN_SIZE,
    RUN_STEPS,
    WORKFLOW_DIR,
    WORKFLOW_NAMES,
    check_saved_images,
    nodes_of,
    shrink,
    workflow_path,
)


@pytest.fixture(scope="module")
def server(workflow_server):
    return workflow_server


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.object_info()



@comfy_harness.requires_comfyui
@pytest.mark.server
@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_every_node_type_exists_in_object_info(name, object_info):
    missing = {n["type"] for n in nodes_of(wf.load(workflow_path(name)))} - set(object_info)
    assert not missing, f"node types unknown to ComfyUI with the pack: {missing}"


@comfy_harness.requires_comfyui
@pytest.mark.server
@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_no_node_is_deprecated_or_experimental(name, object_info):
    flagged = {
        n["type"] for n in nodes_of(wf.load(workflow_path(name)))
        if object_info[n["type"]].get("deprecated") or object_info[n["type"]].get("experimental")
    }
    assert not flagged, f"the app badges these nodes as deprecated/experimental: {flagged}"


@comfy_harness.requires_comfyui
@pytest.mark.server
@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_every_link_type_matches_the_sockets_at_both_ends(name, object_info):
    workflow = wf.load(workflow_path(name))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, source, source_slot, target, target_slot, link_type in workflow["links"]:
        source_def = object_info[nodes[source]["type"]]
        target_node = nodes[target]
        input_name = target_node["inputs"][target_slot]["name"]
        input_type = wf.socket_type(object_info[target_node["type"]], input_name)
        output_type = source_def["output"][source_slot]
        assert input_type, f"link {link_id}: {target_node['type']} has no input {input_name}"
        assert wf.types_match(output_type, input_type), (
            f"link {link_id}: {output_type} into {target_node['type']}.{input_name} ({input_type})"
        )
        assert wf.types_match(link_type, output_type) and wf.types_match(link_type, input_type)


@comfy_harness.requires_comfyui
@pytest.mark.server
@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_every_widget_value_is_valid_for_its_input_and_seeds_are_fixed(name, object_info):
    problems = []
    for node in nodes_of(wf.load(workflow_path(name))):
        node_def = object_info[node["type"]]
        values, extras = wf.widget_values(node, node_def)
        for slot in wf.widget_slots(node_def):
            error = wf.check_widget_value(slot, values[slot.name])
            if error:
                problems.append(f"{node['type']}.{slot.name}: {error}")
        for key, value in extras.items():
            if key.endswith(".control_after_generate") and value != "fixed":
                problems.append(f"{node['type']}.{key} is {value!r}: ship seeds 'fixed' so a run reproduces")
    assert not problems, "\n".join(problems)


@comfy_harness.requires_comfyui
@pytest.mark.server
@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_runs_end_to_end_on_the_cpu_and_saves_its_images(name, server, object_info):
    workflow = wf.load(workflow_path(name))
    prompt = shrink(wf.to_api_prompt(workflow, object_info), name)
    start = time.perf_counter()
    entry = server.run_prompt(prompt, timeout=600)
    cost = "as shipped" if name in AS_SHIPPED else f"{RUN_SIZE} px, {RUN_STEPS} steps"
    print(f"{name}: ran in {time.perf_counter() - start:.1f} s ({cost})")
    check_saved_images(server, name, workflow, entry)


@comfy_harness.requires_comfyui
@pytest.mark.server
def test_workflow_templates_lists_and_serves_the_pack_workflows(server):
    listing = server.get_json("/workflow_templates")
    folder = comfy_harness.PACK_FOLDER_NAME
    assert sorted(listing.get(folder, [])) == sorted(WORKFLOW_NAMES)
    for name in WORKFLOW_NAMES:
        status, body = server.request("GET", f"/api/workflow_templates/{folder}/{name}.json")
        assert status == 200 and body == wf.load(workflow_path(name))
        with urllib.request.urlopen(f"{server.base_url}/api/workflow_templates/{folder}/{name}.jpg") as thumbnail:
            assert thumbnail.read() == (WORKFLOW_DIR / f"{name}.jpg").read_bytes()
