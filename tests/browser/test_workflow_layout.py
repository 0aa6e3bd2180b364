"""The example workflows look right in the real web app, with the pictures they load present.

Loaded through the app's file input with ComfyUI's own ``example.png`` (and the pack's toy sample, which the
pack puts there itself) in the input folder, as on a user's machine, each workflow is checked once every
Load Image node shows its picture (the app grows the node to fit it): no two nodes overlap and no node
straddles a group's frame (:mod:`workflow_layout`). The server has no model files, as on a new user's machine:
the app's missing-models dialog must then offer a download for every model the workflow names (the app offers
only ``.safetensors`` / ``.sft`` files from a few hosts). No model is loaded and nothing runs, so this tier is
cheap. A screenshot of each workflow as loaded is kept in ``artifacts/workflows/layout/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ip2p_nodes.pipeline_core.models.assets import SAMPLE_IMAGE_NAME
from support import browser_harness, comfy_harness, example_workflows, workflow_layout
from support import workflow_format as wf

REPO = Path(__file__).resolve().parents[2]
ARTIFACT_DIR = Path(os.environ.get("IP2P_ARTIFACTS", REPO / "artifacts")) / "workflows" / "layout"
WORKFLOWS = example_workflows.KEYS
# What the app's missing-models dialog writes instead of a download button when it refuses one.
REFUSALS = ("Only allowed suffixes", "Download not allowed", "Invalid directory")


def test_the_rules_find_overlaps_and_nodes_straddling_a_frame_but_not_edges_that_meet():
    box = workflow_layout.Box
    group = workflow_layout.Frame(box("g", 0, 0, 500, 400), box("g", 0, 40, 500, 360))
    clean = [box("a", 10, 50, 100, 100), box("b", 110, 50, 100, 100), box("outside", 600, 0, 50, 50)]
    assert workflow_layout.layout_problems(clean, [group]) == []
    overlapping = [box("a", 10, 50, 100, 100), box("b", 100, 140, 100, 100)]
    assert len(workflow_layout.layout_problems(overlapping, [group])) == 1
    straddling = [box("c", 450, 50, 100, 100)]
    assert "not wholly inside" in workflow_layout.layout_problems(straddling, [group])[0]
    in_title_bar = [box("d", 10, 20, 100, 100)]
    assert "not wholly inside" in workflow_layout.layout_problems(in_title_bar, [group])[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = comfy_harness.skip_without_comfyui()
    with comfy_harness.comfy_server(tmp_path_factory.mktemp("layout") / "comfy") as server:
        # The picture every ComfyUI ships in its input folder, which the workflows load.
        shutil.copyfile(root / "input" / "example.png", server.input_dir / "example.png")
        assert (server.input_dir / SAMPLE_IMAGE_NAME).is_file(), "the pack did not provide the toy sample"
        yield server


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = browser_harness.launch(playwright)
    try:
        yield browser_harness.open_app(browser, server)
    finally:
        browser.close()
        playwright.stop()


@pytest.mark.parametrize("name", WORKFLOWS)
@comfy_harness.requires_comfyui
@browser_harness.requires_browser
@pytest.mark.browser
def test_no_nodes_overlap_and_groups_hold_their_nodes_once_picture_previews_render(name, page):
    browser_harness.load_workflow_file(page, example_workflows.path(name))
    browser_harness.dismiss_messages(page)  # the missing-models dialog: checked below
    browser_harness.wait_for_image_previews(page)
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    browser_harness.screenshot_graph(page, ARTIFACT_DIR / f"{name}.png")
    nodes, frames = workflow_layout.boxes_from_page(browser_harness.layout(page))
    assert nodes, "the workflow did not load"
    problems = workflow_layout.layout_problems(nodes, frames)
    assert not problems, f"{name}, as the app shows it with its pictures loaded:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", WORKFLOWS)
@comfy_harness.requires_comfyui
@browser_harness.requires_browser
@pytest.mark.browser
def test_missing_models_dialog_offers_a_download_for_every_model_named(name, page):
    wanted = [m for n in wf.load(example_workflows.path(name))["nodes"] for m in n["properties"].get("models", [])]
    browser_harness.load_workflow_file(page, example_workflows.path(name))
    dialogs = browser_harness.shown_messages(page)["dialogs"]
    browser_harness.dismiss_messages(page)
    if not wanted:  # the toy demo: its model ships with the pack
        assert dialogs == []
        return
    [dialog] = [d for d in dialogs if "Missing Models" in d]
    for model in wanted:
        assert f"{model['directory']} / {model['name']}" in dialog, dialog
    refused = [r for r in REFUSALS if r in dialog]
    assert not refused, f"the app refuses a download: {dialog}"


def open_pack_templates(page) -> None:
    """The Templates browser, on the pack's own category (named after its folder in custom_nodes)."""
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.get_by_role("dialog").get_by_text(comfy_harness.PACK_FOLDER_NAME, exact=True).first.click()


@comfy_harness.requires_comfyui
@browser_harness.requires_browser
@pytest.mark.browser
def test_templates_browser_shows_each_workflow_by_its_title_with_its_thumbnail_and_opens_it(page):
    for name in WORKFLOWS:
        title = example_workflows.TITLES[name]
        page.evaluate("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
        page.wait_for_function("() => app.graph.nodes.length === 0")
        open_pack_templates(page)
        card = page.locator(f'[data-testid="template-workflow-{title}"]')
        card.wait_for(timeout=30_000)
        assert card.locator("h3").inner_text() == title
        image = card.locator("img")
        image.wait_for(timeout=30_000)
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        card.click()
        expected = len(wf.load(example_workflows.path(name))["nodes"])
        page.wait_for_function(f"() => app.graph.nodes.length === {expected}", timeout=30_000)
        browser_harness.dismiss_messages(page)
