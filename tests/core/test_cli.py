"""The command-line edit: one command from an image file to an edited file of the same size."""

import numpy as np
import pytest
from PIL import Image

from ip2p_nodes.pipeline_core import cli


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_edit_writes_an_image_of_the_input_size(tmp_path, photo, tiny_single_file):
    out = tmp_path / "out.png"
    rc = cli.main(["edit", str(photo), "make it winter", "-o", str(out), "--model", str(tiny_single_file),
                   "--steps", "2", "--precision", "fp32", "--seed", "7"])
    assert rc == 0
    with Image.open(out) as im:
        assert im.size == (61, 45)


def test_cli_count_writes_one_file_per_seed(tmp_path, photo, tiny_folder):
    out = tmp_path / "v.png"
    rc = cli.main(["edit", str(photo), "make it winter", "-o", str(out), "--model", str(tiny_folder),
                   "--steps", "1", "--precision", "fp32", "--count", "2"])
    assert rc == 0
    a, b = (np.asarray(Image.open(tmp_path / f"v_{i}.png")) for i in (0, 1))
    assert a.shape == b.shape == (45, 61, 3) and not np.array_equal(a, b)


def test_cli_reports_a_wrong_model_as_an_error_not_a_traceback(tmp_path, photo, caplog):
    rc = cli.main(["edit", str(photo), "x", "-o", str(tmp_path / "o.png"),
                   "--model", str(tmp_path / "missing.safetensors")])
    assert rc == 2
    assert "missing.safetensors: no such file or folder" in caplog.text and "Check the path" in caplog.text


def test_cli_reports_an_unreadable_image(tmp_path, tiny_folder, caplog):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    rc = cli.main(["edit", str(bad), "x", "-o", str(tmp_path / "o.png"), "--model", str(tiny_folder)])
    assert rc == 2
    assert "bad.png: cannot be read as an image" in caplog.text and "give a PNG, JPEG or WebP picture" in caplog.text


def test_cli_mask_keeps_everything_outside_it_exactly(tmp_path, photo, tiny_folder):
    mask = np.zeros((45, 61), dtype=np.uint8)
    mask[10:30, 20:50] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "o.png"
    rc = cli.main(["edit", str(photo), "make it red", "-o", str(out), "--model", str(tiny_folder), "--steps", "2",
                   "--precision", "fp32", "--mask", str(tmp_path / "mask.png"), "--denoise", "0.8"])
    assert rc == 0
    src, res = np.asarray(Image.open(photo)), np.asarray(Image.open(out))
    outside = mask == 0
    assert np.array_equal(src[outside], res[outside])
    assert not np.array_equal(src[~outside], res[~outside])


def test_cli_demo_edits_the_shipped_sample_with_no_download(tmp_path, monkeypatch):
    import socket

    def refuse(*a, **k):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "-o", str(out), "--instruction", "make the circle red"]) == 0
    pair = np.asarray(Image.open(out).convert("RGB")).astype(int)
    h, w, _ = pair.shape
    before, after = pair[:, : w // 2], pair[:, w // 2 :]
    red = lambda im: ((im[..., 0] > 180) & (im[..., 1] < 90) & (im[..., 2] < 90)).sum()  # noqa: E731
    assert red(after) > red(before) + 100  # the sample's circle is blue; the edit makes it red


def test_cli_lora_gives_the_picture_of_the_same_lora_through_the_api(tmp_path, photo, tiny_folder):
    from ip2p_nodes.pipeline_core import MODEL_CACHE, LoraRef, ModelSource, SeedPlan, edit, encode_instruction
    from ip2p_nodes.pipeline_core.editing.images import load_image
    from support import lora_files

    lora = lora_files.write_diffusers_lora(tiny_folder, tmp_path / "lora", seed=2)
    out, plain = tmp_path / "out.png", tmp_path / "plain.png"
    args = ["edit", str(photo), "make it winter", "--model", str(tiny_folder), "--steps", "2", "--precision", "fp32",
            "--seed", "7"]
    assert cli.main([*args, "-o", str(out), "--lora", f"{lora.path}:0.6"]) == 0
    assert cli.main([*args, "-o", str(plain)]) == 0
    key = MODEL_CACHE.key_for(ModelSource.from_path(str(tiny_folder)), "fp32", "cpu",
                              loras=(LoraRef.of(lora.path, 0.6),))
    model = MODEL_CACHE.get(key)
    expected = edit(model, encode_instruction(model, "make it winter"), load_image(photo), SeedPlan.single(7),
                    steps=2).images[0]
    got = np.asarray(Image.open(out)).astype(np.float32) / 255
    assert np.abs(got - expected.numpy()).max() <= 1 / 255 + 1e-6  # the file is 8-bit
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(out)))


def test_cli_controlnet_steers_the_edit_and_strength_0_turns_it_off(tmp_path, photo, tiny_folder):
    from support import tiny_controlnet

    controlnet = tiny_controlnet.write_original_file(
        tiny_controlnet.make_controlnet(tiny_controlnet.unet_config_of(tiny_folder)), tmp_path / "canny.safetensors")
    hint = np.zeros((90, 122), dtype=np.uint8)  # another size than the input: stretched to it
    hint[20:60:8, :] = 255
    hint[:, 30:100:16] = 255
    Image.fromarray(hint).save(tmp_path / "edges.png")

    def run(name, *extra):
        rc = cli.main(["edit", str(photo), "make it winter", "-o", str(tmp_path / name), "--model", str(tiny_folder),
                       "--steps", "2", "--precision", "fp32", *extra])
        assert rc == 0
        return np.asarray(Image.open(tmp_path / name))

    control = ["--controlnet", str(controlnet), "--control-image", str(tmp_path / "edges.png")]
    plain, steered = run("plain.png"), run("steered.png", *control)
    off = run("off.png", *control, "--control-strength", "0")
    assert steered.shape == plain.shape == (45, 61, 3)
    assert np.abs(steered.astype(int) - plain.astype(int)).max() > 5
    assert np.array_equal(off, plain)


def test_cli_memory_low_gives_the_same_picture_and_leaves_no_model_part_in_memory(tmp_path, photo, tiny_folder,
                                                                                  monkeypatch):
    from ip2p_nodes.pipeline_core import ModelSource
    from ip2p_nodes.pipeline_core.models.cache import MODEL_CACHE

    monkeypatch.setattr(MODEL_CACHE, "memory", MODEL_CACHE.memory)  # the mode the CLI sets is undone after
    MODEL_CACHE.clear()
    args = ["edit", str(photo), "make it winter", "--model", str(tiny_folder), "--steps", "2", "--precision", "fp32"]
    assert cli.main([*args, "-o", str(tmp_path / "low.png"), "--memory", "low"]) == 0
    loads = MODEL_CACHE.loads
    model = MODEL_CACHE.get(MODEL_CACHE.key_for(ModelSource("diffusers", str(tiny_folder)), "fp32", "cpu"))
    assert MODEL_CACHE.loads == loads  # the CLI's own model, not a new one
    assert model.released.released == {"unet", "vae", "text_encoder"}
    MODEL_CACHE.clear()
    assert cli.main([*args, "-o", str(tmp_path / "keep.png"), "--memory", "keep"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "low.png")), np.asarray(Image.open(tmp_path / "keep.png")))
    MODEL_CACHE.clear()
