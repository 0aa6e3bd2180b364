"""A real ComfyUI server (COMFYUI_DIR) with the pack: the nodes as the UI sees them, an edit end to end,
"Unload models" in between, RAM released on "free memory", live previews over the websocket, and Cancel.

One server for the module (start-up is most of the cost); each test leaves it idle.
"""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pytest
from PIL import Image

from ip2p_nodes.pipeline_core.models.loading import save_single_file
from support import comfy_harness, tiny_models

comfy_harness.skip_without_comfyui()

pytestmark = pytest.mark.server

OUR_NODES = {
    "IP2PModelLoader": "IP2P Load Model",
    "IP2PInstruction": "IP2P Instruction",
    "IP2PSampler": "IP2P Dual-Guidance Sampler",
    "IP2PSeedPlan": "IP2P Seed Batch",
}
MODEL = "tiny-ip2p.safetensors"
PLAIN = "plain-sd15.safetensors"
WIDE = "wide-ip2p.safetensors"  # 108 M UNet parameters: big enough for its RAM to show in the server's RSS
WIDE_CHANNELS = (320, 640)
WIDTH, HEIGHT = 75, 53  # neither a multiple of 8: the output must still be exactly this size


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_single_file):
    base = tmp_path_factory.mktemp("comfyui")
    # The model sits in a folder named by extra_model_paths.yaml, as on a shared model drive; a second copy
    # in the default models/instructpix2pix must stay listed too (the pack appends, never replaces).
    shared = base / "shared-drive" / "ip2p"
    comfy_harness.copy_into(tiny_single_file, shared, MODEL)
    comfy_harness.copy_into(tiny_single_file, base / "models" / "instructpix2pix", "default-folder.safetensors")
    unet, vae, te, _ = tiny_models.make_components(in_channels=4)  # a plain text-to-image model
    save_single_file((unet, vae, te), base / "models" / "checkpoints" / PLAIN)
    tok = base / "wide-tokenizer"
    unet, vae, te, _ = tiny_models.make_components(seed=3, tokenizer_dir=tok, unet_channels=WIDE_CHANNELS)
    save_single_file((unet, vae, te), base / "models" / "instructpix2pix" / WIDE, tokenizer_dir=tok)
    del unet, vae, te
    (base / "input").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(base / "input" / "photo.png")
    with comfy_harness.comfy_server(base, {"instructpix2pix": [shared]}) as srv:
        yield srv


def edit_prompt(seed=7, count=2, steps=3, prefix="ip2p", mode="increment", model=MODEL, precision="auto"):
    """LoadImage -> our four nodes -> SaveImage, in ComfyUI's API format."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "2": {"class_type": "IP2PModelLoader", "inputs": {"model": model, "hub_id": "", "precision": precision}},
        "3": {"class_type": "IP2PInstruction",
              "inputs": {"model": ["2", 0], "instruction": "make it look like a watercolor painting", "negative": ""}},
        "4": {"class_type": "IP2PSeedPlan",
              "inputs": {"seed": seed, "count": count, "mode": mode, "text_guidance_values": "",
                         "image_guidance_values": ""}},
        "5": {"class_type": "IP2PSampler",
              "inputs": {"model": ["2", 0], "conditioning": ["3", 0], "image": ["1", 0], "seed": 0, "steps": steps,
                         "text_guidance": 7.5, "image_guidance": 1.5, "scheduler": "euler_ancestral",
                         "plan": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": prefix}},
    }


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_object_info_shows_our_four_nodes_with_tooltips_on_every_input(server):
    info = server.object_info()
    assert {k: info[k]["display_name"] for k in OUR_NODES if k in info} == OUR_NODES
    for node_id in OUR_NODES:
        node = info[node_id]
        assert node["category"] == "InstructPix2Pix" and node["description"]
        specs = {name: spec for group in ("required", "optional")
                 for name, spec in node["input"].get(group, {}).items()}
        untipped = [name for name, spec in specs.items() if len(spec) < 2 or not spec[1].get("tooltip")]
        assert untipped == [], f"{node_id}: inputs without a tooltip: {untipped}"
        assert all(node["output_tooltips"]), f"{node_id}: an output has no tooltip"
    model_spec = info["IP2PModelLoader"]["input"]["required"]["model"]
    options = model_spec[1]["options"] if model_spec[0] == "COMBO" else model_spec[0]
    assert MODEL in options and "default-folder.safetensors" in options
    assert "IMPORT FAILED" not in server.log_text()


def test_edit_runs_end_to_end_and_again_after_unload_models_with_the_same_image(server):
    mark = server.log_mark()
    first = server.run_prompt(edit_prompt())
    files = server.output_files(first, "6")
    assert len(files) == 2
    for f in files:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size == (WIDTH, HEIGHT)
    assert not np.array_equal(pixels(files[0]), pixels(files[1]))  # two seeds, two pictures
    assert "Requested to load IP2PUNet" in server.log_since(mark)

    # "Unload Models": ComfyUI must reach our modules ...
    server.free(unload_models=True, free_memory=False,
                until_log=r"ip2p: ComfyUI unloaded IP2P(UNet|VAE|TextEncoder)", count=3)

    # ... and the next run loads them back transparently and makes the same picture. (The second seed alone:
    # the same prompt again would come from ComfyUI's node cache without running.)
    again_mark = server.log_mark()
    again = server.run_prompt(edit_prompt(seed=8, count=1))
    log = server.log_since(again_mark)
    assert "Requested to load IP2PUNet" in log and "Requested to load IP2PVAE" in log
    # As for core's models, unloading alone keeps the weights' CPU copy (a GPU user's next run reads no disk).
    assert "ip2p: loading" not in log
    [again_file] = server.output_files(again, "6")
    # Seed 8 ran in a batch of two the first time and alone now: CPU kernels pick their algorithm by batch size,
    # so the float results may differ in the last bits and a rare pixel rounds to the next 8-bit level. Weights
    # reloaded wrongly (or a stale state) would change the whole picture.
    diff = np.abs(pixels(again_file).astype(int) - pixels(files[1]).astype(int))
    assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 1000, (diff.max(), np.count_nonzero(diff))

    # "Unload Models and Execution Cache" drops the CPU copy too; the next run reads the file again.
    server.free(unload_models=True, free_memory=True, until_log=r"ip2p: ComfyUI freed its caches: released")
    reread_mark = server.log_mark()
    reread = server.run_prompt(edit_prompt())
    assert "ip2p: loading tiny-ip2p.safetensors" in server.log_since(reread_mark)
    assert [pixels(f).tobytes() for f in server.output_files(reread, "6")] == [pixels(f).tobytes() for f in files]


def wait_for_rss(server, predicate, timeout=30.0) -> int:
    """The server's RSS once ``predicate(rss)`` holds (ComfyUI collects garbage a moment after a free)."""
    deadline = time.monotonic() + timeout
    while True:
        rss = server.rss()
        if predicate(rss) or time.monotonic() > deadline:
            return rss
        time.sleep(0.25)


def test_free_memory_gives_the_models_ram_back_and_the_next_run_makes_the_same_picture(server):
    prompt = edit_prompt(model=WIDE, precision="fp32", count=1, steps=1, prefix="wide")
    model_bytes = (server.base_dir / "models" / "instructpix2pix" / WIDE).stat().st_size  # fp32, as loaded
    first = server.run_prompt(prompt)
    [picture] = server.output_files(first, "6")
    loaded = server.rss()

    # "Unload Models" alone: ComfyUI unloads our modules, the RAM stays (as core's models' does).
    server.free(unload_models=True, free_memory=False, until_log=r"ip2p: ComfyUI unloaded IP2PUNet")
    assert server.rss() > loaded - model_bytes / 2

    mark = server.log_mark()
    server.free(unload_models=True, free_memory=True, until_log=r"ip2p: ComfyUI freed its caches: released")
    assert "wide-ip2p.safetensors (fp32, cpu)" in server.log_since(mark)
    freed = wait_for_rss(server, lambda rss: loaded - rss > 0.8 * model_bytes)
    figures = f"RSS loaded {loaded / 2**20:.0f} MiB, freed {freed / 2**20:.0f} MiB, model {model_bytes / 2**20:.0f} MiB"
    logging.getLogger(__name__).info(figures)
    assert loaded - freed > 0.8 * model_bytes, figures

    mark = server.log_mark()
    again = server.run_prompt(prompt)
    assert "ip2p: loading wide-ip2p.safetensors" in server.log_since(mark)
    [picture_again] = server.output_files(again, "6")
    assert pixels(picture_again).tobytes() == pixels(picture).tobytes()
    assert server.rss() > freed + 0.8 * model_bytes  # really read again


def test_live_previews_arrive_over_the_websocket_while_sampling(server):
    """The frontend's preview setting (extra_data.preview_method) on a server started with previews off."""
    with server.events() as events:
        prompt_id = server.post_prompt(edit_prompt(seed=11, count=1, steps=3, prefix="preview"),
                                       client_id=events.client_id, extra_data={"preview_method": "latent2rgb"})
        assert server.wait_history(prompt_id)["status"]["completed"]
        events.wait_for(lambda m: m.get("type") == "executing" and m["data"].get("node") is None
                        and m["data"].get("prompt_id") == prompt_id)
        previews = events.previews()
        timeline = list(events.timeline)
    assert len(previews) == 3  # one per step
    for kind, data in previews:
        assert kind == "JPEG"
        with Image.open(io.BytesIO(data)) as im:
            # The picture's shape, scaled by the server to fit --preview-size (512 by default).
            assert im.format == "JPEG" and max(im.size) == 512
            assert abs(im.size[0] / im.size[1] - WIDTH / HEIGHT) < 0.1
    # During sampling: each preview follows the sampler's progress message for its step.
    kinds = [m.get("type") if isinstance(m, dict) else "preview" for m in timeline]
    first_preview = kinds.index("preview")
    assert any(isinstance(m, dict) and m.get("type") == "progress" and m["data"].get("node") == "5"
               for m in timeline[:first_preview])

    # Previews off (the server's default, --preview-method none): progress still, pictures none.
    with server.events() as events:
        prompt_id = server.post_prompt(edit_prompt(seed=12, count=1, steps=2, prefix="no-preview"),
                                       client_id=events.client_id)
        assert server.wait_history(prompt_id)["status"]["completed"]
        events.wait_for(lambda m: m.get("type") == "executing" and m["data"].get("node") is None
                        and m["data"].get("prompt_id") == prompt_id)
        assert [p["value"] for p in events.of_type("progress", prompt_id) if p.get("node") == "5"] == [1, 2]
        assert events.previews() == []


def test_cancel_stops_the_edit_and_the_next_run_works(server):
    with server.events() as events:
        prompt_id = server.post_prompt(edit_prompt(seed=99, count=1, steps=200, prefix="cancelled"),
                                       client_id=events.client_id)
        events.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("prompt_id") == prompt_id
                        and m["data"].get("node") == "5")
        server.interrupt()
        entry = server.wait_history(prompt_id)
        steps_done = [p["value"] for p in events.of_type("progress", prompt_id) if p.get("node") == "5"]
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    assert max(steps_done) < 200
    assert "6" not in entry["outputs"]  # nothing saved from the cancelled run

    after = server.run_prompt(edit_prompt(seed=99, count=1, steps=2, prefix="after-cancel"))
    [saved] = server.output_files(after, "6")
    with Image.open(saved) as im:
        assert im.size == (WIDTH, HEIGHT)


def test_random_seed_batch_makes_new_pictures_on_every_queue(server):
    prompt = edit_prompt(count=1, steps=1, mode="random", prefix="random")
    runs = [server.run_prompt(prompt) for _ in range(2)]
    [first], [second] = (server.output_files(run, "6") for run in runs)
    assert first != second  # the sampler ran again although the prompt is the same ...
    assert not np.array_equal(pixels(first), pixels(second))  # ... with newly drawn seeds


def test_a_plain_checkpoint_fails_on_the_loader_with_the_reason_and_the_next_run_works(server):
    entry = server.wait_history(server.post_prompt(edit_prompt(model=PLAIN, count=1, steps=1, prefix="plain")))
    assert entry["status"]["status_str"] == "error"
    [error] = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert error["node_type"] == "IP2PModelLoader"
    assert f"{PLAIN}: UNet has 4 input channels" in error["exception_message"]

    after = server.run_prompt(edit_prompt(count=1, steps=1, prefix="after-error"))
    assert len(server.output_files(after, "6")) == 1
