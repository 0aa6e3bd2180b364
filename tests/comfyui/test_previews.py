"""Live previews of the sampler, in this process, against a real ComfyUI checkout (COMFYUI_DIR).

What a user sees in the sampler node while it runs: ComfyUI's latent-to-RGB preview of the family's latent
format (or TAESD when they picked it and have the decoder), nothing when previews are off, and never a failed
run because of a preview. The server test (a preview arriving over the websocket) is in test_server.py.
"""

from __future__ import annotations

import pytest
import torch

from support import comfy_harness

comfy_harness.import_comfyui()  # skips this module, saying why, without COMFYUI_DIR

import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import latent_preview  # noqa: E402
from PIL import Image  # noqa: E402

from ip2p_nodes.nodes import memory  # noqa: E402
from ip2p_nodes.nodes.instruction import IP2PInstruction  # noqa: E402
from ip2p_nodes.nodes.loader import IP2PModelLoader  # noqa: E402
from ip2p_nodes.nodes.preview import make_preview  # noqa: E402
from ip2p_nodes.nodes.sampler import IP2PSampler  # noqa: E402
from ip2p_nodes.pipeline_core import MODEL_CACHE  # noqa: E402
from ip2p_nodes.pipeline_core.models.assets import TOY_MODEL_CHOICE  # noqa: E402

pytestmark = pytest.mark.comfyui

CPU = torch.device("cpu")


@pytest.fixture
def preview_method():
    """Set ComfyUI's preview method as the frontend's per-prompt setting does; restores the default after."""
    yield latent_preview.set_preview_method
    latent_preview.set_preview_method(None)


def latents(n=2, c=4, h=6, w=10, dtype=torch.float32):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("latent_format", ["SD15", "SDXL"])
def test_latent2rgb_preview_is_a_jpeg_of_the_first_picture_at_latent_size(preview_method, latent_format):
    preview_method("latent2rgb")
    preview = make_preview(latent_format, 4, CPU)
    kind, image, max_size = preview(latents(dtype=torch.bfloat16))  # the UNet's bf16 estimate on CPUs
    assert kind == "JPEG" and isinstance(image, Image.Image)
    assert image.size == (10, 6) and max_size == latent_preview.MAX_PREVIEW_RESOLUTION
    # The first picture of the batch, as ComfyUI shows: a different second picture changes nothing.
    x = latents()
    y = x.clone()
    y[1] = -y[1]
    assert preview(x)[1].tobytes() == preview(y)[1].tobytes()
    assert preview(x)[1].tobytes() != preview(-x)[1].tobytes()


def test_auto_preview_method_gives_latent2rgb(preview_method):
    preview_method("auto")
    assert make_preview("SD15", 4, CPU)(latents())[1].size == (10, 6)


def test_previews_off_makes_no_preview(preview_method):
    preview_method("none")
    assert make_preview("SD15", 4, CPU) is None


def test_taesd_preview_decodes_to_picture_size_when_the_user_has_the_decoder(preview_method, tmp_path, monkeypatch):
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file

    # A random-weight decoder under TAESD's file name: the shapes are the real ones, nothing is downloaded.
    folder = tmp_path / "vae_approx"
    folder.mkdir()
    torch.manual_seed(0)
    save_file(TAESD().taesd_decoder.state_dict(), str(folder / "taesd_decoder.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vae_approx",
                        ([str(folder)], folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    preview_method("taesd")
    kind, image, _ = make_preview("SD15", 4, CPU)(latents(dtype=torch.bfloat16))
    assert kind == "JPEG" and image.size == (80, 48)  # decoded: 8 pixels per latent


def test_taesd_without_the_decoder_falls_back_to_latent2rgb(preview_method, tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "vae_approx",
                        ([str(tmp_path)], folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    preview_method("taesd")
    assert make_preview("SD15", 4, CPU)(latents())[1].size == (10, 6)


def test_a_latent_the_format_cannot_show_gives_no_preview_rather_than_a_failed_run(preview_method, caplog):
    preview_method("latent2rgb")
    assert make_preview("SD15", 16, CPU) is None
    assert make_preview("Flux", 4, CPU) is None
    assert "no live preview" in caplog.text


def test_sampler_sends_a_preview_with_every_step_for_the_toy_model(preview_method, monkeypatch):
    """The toy model's VAE is not SD's (its colours come out wrong), but it has 4 channels: previews work."""
    previous = MODEL_CACHE.residency
    MODEL_CACHE.clear()
    memory.install_residency(MODEL_CACHE)
    reported = []

    def progress_hook(value, total, preview, prompt_id=None, node_id=None):
        reported.append((value, total, preview))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", progress_hook)
    try:
        preview_method("latent2rgb")
        model = IP2PModelLoader.execute(TOY_MODEL_CHOICE, "", "auto")[0]
        cond = IP2PInstruction.execute(model, "make the circle red", "")[0]
        image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
        out = IP2PSampler.execute(model, cond, image, 3, 2, 3.0, 1.5, "auto")[0]
        assert out.shape == image.shape
        assert [(v, t) for v, t, _ in reported] == [(1, 2), (2, 2)]
        side = 32 // MODEL_CACHE.get(model).components.vae_scale_factor  # the toy VAE is not SD's (8 px per latent)
        for _, _, preview in reported:
            kind, picture, _ = preview
            assert kind == "JPEG" and picture.size == (side, side)

        reported.clear()
        preview_method("none")
        IP2PSampler.execute(model, cond, image, 3, 2, 3.0, 1.5, "auto")
        assert [p for _, _, p in reported] == [None, None]
    finally:
        MODEL_CACHE.clear()
        MODEL_CACHE.residency = previous
