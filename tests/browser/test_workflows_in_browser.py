"""The example workflows in the real web app (marker ``browser``; needs ``COMFYUI_DIR``, ``playwright`` and a
Chromium): each workflow, opened through the app's file input, shows no dialog and no warning, and the prompt the
app would send is the one the conversion makes and the server runs it. A screenshot of each graph is kept in
``artifacts/workflows/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from support import browser_harness, comfy_harness
from support import workflow_format as wf
from support.example_workflows import REPO, WORKFLOW_NAMES, check_saved_images, shrink, workflow_path

ARTIFACT_DIR = Path(os.environ.get("IP2P_ARTIFACTS", REPO / "artifacts")) / "workflows"


@pytest.fixture(scope="module")
def server(workflow_server):
    return workflow_server


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.object_info()



def _broken_copy(tmp_path: Path, name: str, change) -> Path:
    workflow = wf.load(workflow_path("basic_edit"))
    change(workflow)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(workflow))
    return path


@comfy_harness.requires_comfyui
@browser_harness.requires_browser
@pytest.mark.browser
def test_the_warning_check_sees_a_missing_node_dialog_and_a_schema_alert(app_page, tmp_path):
    """The check below is only worth something if the app's warnings are visible to it."""

    def unknown_node(w):
        w["nodes"][0]["type"] = "IP2PNoSuchNode"

    def bad_schema(w):
        w["nodes"][0]["pos"] = "top left"

    browser_harness.load_workflow_file(app_page, _broken_copy(tmp_path, "missing", unknown_node))
    shown = browser_harness.shown_messages(app_page)
    assert any("IP2PNoSuchNode" in d for d in shown["dialogs"]), shown
    browser_harness.dismiss_messages(app_page)

    browser_harness.load_workflow_file(app_page, _broken_copy(tmp_path, "schema", bad_schema))
    shown = browser_harness.shown_messages(app_page)
    assert any("zod schema" in t for t in shown["toasts"]), shown
    browser_harness.dismiss_messages(app_page)


@comfy_harness.requires_comfyui
@browser_harness.requires_browser
@pytest.mark.browser
@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_opens_in_the_app_without_warnings_and_runs_from_its_prompt(name, app_page, server, object_info):
    browser_harness.load_workflow_file(app_page, workflow_path(name))
    shown = browser_harness.shown_messages(app_page)
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    shot = browser_harness.screenshot_graph(app_page, ARTIFACT_DIR / f"{name}.png")
    print(f"screenshot: {shot}")
    assert shown == {"dialogs": [], "toasts": []}, f"the app showed: {shown}"

    from_app = browser_harness.graph_to_prompt(app_page)["output"]
    ours = wf.to_api_prompt(wf.load(workflow_path(name)), object_info)
    assert {k: (v["class_type"], v["inputs"]) for k, v in from_app.items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in ours.items()
    }, "the app's prompt differs from the file's conversion"

    workflow = wf.load(workflow_path(name))
    entry = server.run_prompt(shrink(from_app, name), timeout=600)
    check_saved_images(server, name, workflow, entry)
