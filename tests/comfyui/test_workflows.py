"""The example workflows in ``workflows/`` load without a warning and run as shipped.

Three tiers:

- File checks, always: UI format 0.4 with consistent links, a thumbnail per workflow, titles (file names) that
  read well in the Templates browser, our nodes tagged with the pack id and version, the model files users
  actually have, with download links the app accepts.
- Against a real ComfyUI with the pack (``COMFYUI_DIR``; marker ``server``): every node type, link and widget
  value is valid for that ComfyUI, and every workflow, converted to an API prompt, runs end to end on the
  CPU and writes its images. The models are random-weight files of the real architectures, written by the
  tests under the names the workflows use (``model_files``); the run is shrunk to 64 px and 1 step. The toy
  demo runs exactly as shipped (its embedded model is tiny) on the shipped sample picture, and its edit is
  checked against the exactly correct one.
- In the real web app (marker ``browser``; needs ``playwright`` and a Chromium too): each workflow, opened
  through the app's file input, shows no dialog and no warning, and the prompt the app would send is the
  one the conversion makes and the server runs it. A screenshot of each graph is kept in
  ``artifacts/workflows/``. The layout checks (pictures present) are in ``test_workflow_layout.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from ip2p_nodes.pipeline_core.models.assets import SAMPLE_INSTRUCTION, TOY_CLIP_CHOICE
from ip2p_nodes.pipeline_core.training.evaluation import rule_check
from ip2p_nodes.pipeline_core.training.score_eval import TOY_THRESHOLD
from ip2p_nodes.pipeline_core.training.toy import SAMPLE_IMAGE_NAME, TOY_MODEL_CHOICE, sample_image_path, sample_triplet
from support import browser_harness, comfy_harness, example_workflows, model_files
from support import workflow_format as wf

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_DIR = example_workflows.WORKFLOW_DIR
ARTIFACT_DIR = Path(os.environ.get("IP2P_ARTIFACTS", REPO / "artifacts")) / "workflows"
PACK_ID = "ip2p-nodes"
PACK_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

WORKFLOW_NAMES = example_workflows.KEYS
# Run end to end on the CPU, every one (CosXL on a tiny CosXL file under the name the workflow uses).
RUNNABLE = list(WORKFLOW_NAMES)
MODEL_WIDGETS = {
    "IP2PModelLoader": model_files.IP2P_NAME,
    "CheckpointLoaderSimple": model_files.SD15_NAME,
    "ControlNetLoader": model_files.CONTROLNET_NAME,
    "IP2PApplyControlNet": model_files.CONTROLNET_NAME,
}
# What a run uses instead of the named file: the real-size SD1.5 ControlNet cannot steer the tiny IP2P model that
# stands in for instruct-pix2pix-00-22000 (the pack refuses it, naming it), so the run swaps in one of its shape.
RUN_MODELS = {"IP2PApplyControlNet": {"control_net": model_files.TINY_CONTROLNET_NAME}}
# The toy demo names the pack's embedded model, which every install has.
MODEL_WIDGETS_OF = {
    "toy_demo": {"IP2PModelLoader": TOY_MODEL_CHOICE},
    "cosxl_edit": {"IP2PModelLoader": model_files.COSXL_NAME},
}
# What the app's missing-models dialog accepts for a download link (frontend 1.35, MissingModelsWarning).
DOWNLOAD_SUFFIXES = (".safetensors", ".sft")
DOWNLOAD_HOSTS = ("https://huggingface.co/", "https://civitai.com/")
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
    "guidance_sweep": {"ip2p/sweep_grid": (1, 3 * RUN_SIZE + 2 * 4), "ip2p/sweep_best": (1, RUN_SIZE)},
    "batch_edit": {"ip2p/batch": (6, RUN_SIZE), "ip2p/batch_grid": (1, 2 * RUN_SIZE + 4)},
    "controlnet_edit": {"ip2p/controlnet": (1, RUN_SIZE), "ip2p/controlnet_edited": (1, RUN_SIZE)},
    "toy_demo": {"ip2p/toy_edit": (1, TOY_SIZE), "ip2p/toy_edit_x8": (1, 8 * TOY_SIZE)},
    "cosxl_edit": {"ip2p/cosxl_edit": (1, RUN_SIZE)},
    "controlnet_guided_edit": {"ip2p/controlnet_guided": (1, RUN_SIZE)},
}
GRID_ROWS = {"ip2p/sweep_grid": 6, "ip2p/batch_grid": 3}


def workflow_path(name: str) -> Path:
    return example_workflows.path(name)


def nodes_of(workflow: dict, *, backend_only: bool = True) -> list[dict]:
    return [n for n in workflow["nodes"] if not (backend_only and n["type"] in wf.FRONTEND_ONLY_NODES)]


# ----------------------------------------------------------------------------------------------------------
# The files


def test_the_workflows_ship_each_with_a_jpeg_thumbnail_of_the_same_name():
    assert sorted(p.name for p in WORKFLOW_DIR.iterdir()) == sorted(
        f"{example_workflows.TITLES[name]}{suffix}" for name in WORKFLOW_NAMES for suffix in (".json", ".jpg")
    )
    for name in WORKFLOW_NAMES:
        with Image.open(example_workflows.thumbnail(name)) as thumbnail:
            assert thumbnail.format == "JPEG"
            assert min(thumbnail.size) >= 300, f"{thumbnail.filename} is too small to show anything"


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_file_names_read_as_titles_in_the_templates_browser(name):
    """The browser shows the file name as the title, on one line of a card, and says nothing else about it."""
    title = workflow_path(name).stem
    assert len(title) <= example_workflows.TITLE_CHARS, f"{title!r} does not fit on the card's one line"
    assert "_" not in title and "-" not in title, f"{title!r}: write words, not an identifier"
    assert title[0].isupper(), title


def test_the_toy_demos_thumbnail_is_its_result_not_a_graph():
    """A square picture (the card is square) showing the shipped edit: a red circle on a light background."""
    import numpy as np

    with Image.open(example_workflows.thumbnail("toy_demo")) as thumbnail:
        assert thumbnail.width == thumbnail.height
        pixels = np.asarray(thumbnail.convert("RGB"), dtype=np.int16)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    blue = (pixels[..., 2] > 180) & (pixels[..., 0] < 100) & (pixels[..., 1] < 120)
    half = thumbnail.width // 2
    # Input on the left (its circle blue), result on the right (its circle red): a circle is about 1% of the picture.
    assert blue[:, :half].mean() > 0.005 and red[:, :half].mean() < 0.001, "the left half is not the input"
    assert red[:, half:].mean() > 0.005 and blue[:, half:].mean() < 0.001, "the right half is not the edit"


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_every_model_named_has_a_download_link_the_app_offers(name):
    """The app's missing-models dialog refuses other suffixes (e.g. .pth) and other hosts."""
    loaders = [n for n in wf.load(workflow_path(name))["nodes"] if n["type"] in MODEL_WIDGETS]
    for node in loaders:
        models = node["properties"].get("models", [])
        if node["widgets_values"][0] == TOY_MODEL_CHOICE:
            assert models == [], "the embedded toy model has nothing to download"
            continue
        [model] = models
        assert model["name"] == node["widgets_values"][0]
        assert model["name"].endswith(DOWNLOAD_SUFFIXES), model
        assert model["url"].startswith(DOWNLOAD_HOSTS), model


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


# ----------------------------------------------------------------------------------------------------------
# A real ComfyUI with the pack


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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy_harness.skip_without_comfyui()
    root = tmp_path_factory.mktemp("workflows")
    start = time.perf_counter()
    folders = model_files.write_model_tree(root / "models")
    try:
        with comfy_harness.comfy_server(root / "comfy", {key: [path] for key, path in folders.items()}) as server:
            write_example_image(server.input_dir / "example.png")
            # The pack itself puts the toy demo's picture into a fresh input folder when ComfyUI loads it.
            assert (server.input_dir / SAMPLE_IMAGE_NAME).read_bytes() == sample_image_path().read_bytes()
            print(f"model files + server start: {time.perf_counter() - start:.1f} s")
            yield server
    finally:
        # 2.7 GB of random weights: pytest keeps the last few temp dirs, so do not leave them behind.
        shutil.rmtree(root / "models", ignore_errors=True)


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.object_info()


def shrink(prompt: dict, name: str) -> dict:
    """The same graph at the test's cost: RUN_STEPS steps, RUN_SIZE px latents (input images are RUN_SIZE), and
    the models of :data:`RUN_MODELS`."""
    prompt = json.loads(json.dumps(prompt))
    if name in AS_SHIPPED:
        return prompt
    for node in prompt.values():
        inputs = node["inputs"]
        if isinstance(inputs.get("steps"), int):
            inputs["steps"] = RUN_STEPS
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=RUN_SIZE, height=RUN_SIZE)
        inputs.update(RUN_MODELS.get(node["class_type"], {}))
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
@pytest.mark.parametrize("name", RUNNABLE)
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
def test_the_sweep_workflows_pick_best_branch_picks_a_correct_edit_on_the_toy_model_and_toy_clip(server, object_info):
    """The shipped sweep graph, pointed at the embedded toy model and its sample (the scorer ships on the toy
    CLIP): of 4 seeds x 3 text guidance values, Pick Best's choice does what the instruction says."""
    import numpy as np

    workflow = wf.load(workflow_path("guidance_sweep"))
    prompt = wf.to_api_prompt(workflow, object_info)
    by_type = {node["class_type"]: node["inputs"] for node in prompt.values()}
    assert by_type["IP2PClipScorerLoader"]["clip"] == TOY_CLIP_CHOICE, "the sweep's scorer ships on the toy CLIP"
    by_type["IP2PModelLoader"]["model"] = TOY_MODEL_CHOICE
    by_type["LoadImage"]["image"] = SAMPLE_IMAGE_NAME
    by_type["IP2PInstruction"]["instruction"] = SAMPLE_INSTRUCTION
    by_type["IP2PSeedPlan"].update(count=4, text_guidance_values="1.5, 3, 7.5", image_guidance_values="1.5")
    by_type["IP2PPickBest"]["threshold"] = TOY_THRESHOLD
    entry = server.run_prompt(prompt, timeout=600)
    [save_best] = [str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveImage"
                   and n["widgets_values"][0] == "ip2p/sweep_best"]
    [best_path] = server.output_files(entry, save_best)
    with Image.open(best_path) as image:
        best = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    ok, why = rule_check(sample_triplet(), best)
    assert ok, f"Pick Best chose an edit that fails the rule check: {why}"


@comfy_harness.requires_comfyui
@pytest.mark.server
def test_workflow_templates_lists_and_serves_the_pack_workflows(server):
    listing = server.get_json("/workflow_templates")
    folder = comfy_harness.PACK_FOLDER_NAME
    assert sorted(listing.get(folder, [])) == sorted(example_workflows.TITLES.values())
    for name in WORKFLOW_NAMES:
        # The names have spaces: the app's fetch percent-encodes them, and so must we.
        url = f"/api/workflow_templates/{folder}/{urllib.parse.quote(example_workflows.TITLES[name])}"
        status, body = server.request("GET", url + ".json")
        assert status == 200 and body == wf.load(workflow_path(name))
        with urllib.request.urlopen(f"{server.base_url}{url}.jpg") as thumbnail:
            assert thumbnail.read() == example_workflows.thumbnail(name).read_bytes()


# ----------------------------------------------------------------------------------------------------------
# The real web app


@pytest.fixture(scope="module")
def app_page(server):
    browser_harness.skip_without_browser()
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = browser_harness.launch(playwright)
    try:
        yield browser_harness.open_app(browser, server)
    finally:
        browser.close()
        playwright.stop()


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
def test_workflow_opens_in_the_app_without_warnings_and_its_prompt_is_the_conversion(name, app_page, object_info):
    browser_harness.load_workflow_file(app_page, workflow_path(name))
    shown = browser_harness.shown_messages(app_page)
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    browser_harness.screenshot_graph(app_page, ARTIFACT_DIR / f"{name}.png")
    assert shown == {"dialogs": [], "toasts": []}, f"the app showed: {shown}"

    from_app = browser_harness.graph_to_prompt(app_page)["output"]
    ours = wf.to_api_prompt(wf.load(workflow_path(name)), object_info)
    assert {k: (v["class_type"], v["inputs"]) for k, v in from_app.items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in ours.items()
    }, "the app's prompt differs from the file's conversion"


@comfy_harness.requires_comfyui
@browser_harness.requires_browser
@pytest.mark.browser
@pytest.mark.parametrize("name", RUNNABLE)
def test_the_prompt_the_app_sends_runs(name, app_page, server):
    browser_harness.load_workflow_file(app_page, workflow_path(name))
    from_app = browser_harness.graph_to_prompt(app_page)["output"]
    entry = server.run_prompt(shrink(from_app, name), timeout=600)
    check_saved_images(server, name, wf.load(workflow_path(name)), entry)
