"""The CLI checks every argument and file before a model is loaded, and says what was wrong and what to do.

A bad ``-o`` or ``--device`` used to be found only after the whole edit ran (or as a traceback); a mistyped local
``--model`` was taken for a Hub id. These tests make any model load fail loudly, so a check that comes too late
fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ip2p_nodes.pipeline_core import FAMILIES, ModelCache, cli, limits
from ip2p_nodes.pipeline_core.models.assets import sample_image_path, toy_model_path


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 61, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _edit(photo, out, *extra, model=None):
    # The toy model by its file path: what is under test is the check, not the name "toy".
    model = model or str(toy_model_path())
    return cli.main(["edit", str(photo), "make the circle red", "-o", str(out), "--model", model, *extra])


@pytest.mark.parametrize(
    "extra,said",
    [
        (["--seed", str(2**70)], ["seed must be between 0 and 18446744073709551615", "pick a seed"]),
        (["--steps", "0"], ["steps must be between 1 and 500, got 0"]),
        (["--count", "0"], ["count (how many seeds) must be between 1 and 256, got 0"]),
        (["--text-guidance", "99"], ["text guidance must be a number between 0 and 30, got 99.0"]),
        (["--denoise", "0"], ["denoise must be above 0 and at most 1"]),
        (["--working-resolution", "10"],
         ["working resolution must be between 64 and 4096", "use 0 for the model's own"]),
        (["--device", "gpu"], ["--device gpu: not a device name", "use one of cpu, cuda, mps, xpu"]),
        (["--precision", "fp16", "--device", "cpu"], ["fp16 is not supported on the CPU", "use bf16"]),
        (["--mask", "missing-mask.png"], ["missing-mask.png: no such image file", "check the path"]),
        (["--tokenizer-dir", "no-such-dir"], ["--tokenizer-dir no-such-dir: no such folder", "vocab.json"]),
        (["--lora", "no-such-lora.safetensors:0.5"], ["--lora no-such-lora.safetensors:0.5: LoRA file not found"]),
        (["--lora", f"{__file__}:0.5"], ["not a LoRA weights file (expected one of .safetensors"]),
        (["--controlnet", "no-such-canny.safetensors", "--control-image", "edges.png"],
         ["--controlnet no-such-canny.safetensors: no such file or folder", "check the path"]),
        (["--controlnet", "in.png"], ["--controlnet needs --control-image too"]),
        (["--control-strength", "3"], ["--control-strength must be a number between 0 and 2, got 3.0"]),
    ],
)
def test_bad_settings_are_refused_before_the_model_loads(tmp_path, photo, caplog, no_model_load, extra, said):
    out = tmp_path / "o.png"
    assert _edit(photo, out, *extra) == 2
    for text in said:
        assert text in caplog.text
    assert not out.exists()


def test_cuda_on_a_machine_without_it_is_refused_before_the_model_loads(tmp_path, photo, caplog, monkeypatch,
                                                                        no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _edit(photo, tmp_path / "o.png", "--device", "cuda") == 2
    assert "--device cuda:" in caplog.text
    assert "use --device cpu, or leave --device out to use the best available" in caplog.text


def test_a_gpu_index_the_machine_lacks_is_refused(tmp_path, photo, caplog, monkeypatch, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert _edit(photo, tmp_path / "o.png", "--device", "cuda:3") == 2
    assert "there is no cuda device 3; this machine has 1 (cuda:0)" in caplog.text


@pytest.mark.parametrize(
    "name,said",
    [
        ("out.xyz", [".xyz is not a picture format this can write", "use one of .png, .jpg"]),
        ("out", ["has no file extension", "add one, e.g.", "out.png"]),
        ("folder", ["is a folder; give a file name inside it, e.g.", "edited.png"]),
        ("a-file/o.png", ["a-file is a file, not a folder; choose another path"]),
    ],
)
def test_an_unwritable_output_is_refused_before_the_model_loads(tmp_path, photo, caplog, no_model_load, name, said):
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("")
    assert _edit(photo, tmp_path / name) == 2
    for text in said:
        assert text in caplog.text


def test_count_outputs_are_each_checked_before_the_model_loads(tmp_path, photo, caplog, no_model_load):
    (tmp_path / "v_1.png").mkdir()  # the second variation's file name is taken by a folder
    assert _edit(photo, tmp_path / "v.png", "--count", "2") == 2
    assert "v_1.png: is a folder" in caplog.text


def test_a_missing_input_picture_is_refused_before_the_model_loads(tmp_path, caplog, no_model_load):
    assert _edit(tmp_path / "nope.png", tmp_path / "o.png") == 2
    assert "nope.png: no such image file; check the path" in caplog.text


def test_a_mistyped_local_model_path_is_not_downloaded(tmp_path, photo, caplog, monkeypatch, no_model_load,
                                                       no_network):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert _edit(photo, tmp_path / "o.png", model="models/x") == 2
    assert "models/x: no such file or folder" in caplog.text
    assert "not looked up on the Hugging Face Hub" in caplog.text and "Check the path" in caplog.text
    assert "download" not in caplog.text


def test_whole_numbers_may_be_written_as_floats_but_not_as_fractions(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["edit", "i.png", "x", "-o", "o.png", "--model", "toy", "--steps", "20.0",
                              "--seed", str(2**63)])
    assert args.steps == 20 and args.seed == 2**63
    with pytest.raises(SystemExit):
        parser.parse_args(["edit", "i.png", "x", "-o", "o.png", "--model", "toy", "--steps", "20.5"])
    assert "'20.5' is not a whole number; give one, e.g. 20" in capsys.readouterr().err


def test_edit_help_shows_the_defaults_and_the_toy_model(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["edit", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {int(limits.STEPS.default)})" in text
    # Guidance defaults are the model family's, known once the model is loaded; help lists each family's.
    for family in FAMILIES:
        text_default, image_default = family.default_guidance
        assert f"{text_default:g} {family.label}" in text.split("--text-guidance")[-1].split("--image-guidance")[0]
        assert f"{image_default:g} {family.label}" in text.split("--image-guidance")[-1]
    assert "7.5 SD1.x InstructPix2Pix, 3 SDXL InstructPix2Pix, 5 CosXL Edit; 3 with --model toy, its best" in text
    assert "(default: increment)" in text and "(default: auto)" in text
    assert "--model toy (the shipped demo model" in text and "'toy' (the shipped demo model: no download)" in text


def test_option_defaults_are_the_declared_limits():
    args = cli.build_parser().parse_args(["edit", "i.png", "x", "-o", "o.png", "--model", "m"])
    assert args.steps == limits.STEPS.default
    # None: the loaded model's family decides (7.5/1.5 SD1.x, 3.0/1.5 SDXL-IP2P, 5.0/1.5 CosXL Edit).
    assert args.text_guidance is None and args.image_guidance is None
    assert args.denoise == limits.DENOISE.default and args.feather == limits.FEATHER.default
    assert args.seed == limits.SEED.default


def test_model_toy_edits_with_no_download_and_matches_the_demo(tmp_path, no_network):
    from ip2p_nodes.pipeline_core.demo import run_demo
    from ip2p_nodes.pipeline_core.editing.images import load_image

    out = tmp_path / "toy.png"
    assert cli.main(["edit", str(sample_image_path()), "make the circle red", "-o", str(out), "--model", "toy",
                     "--steps", "4", "--seed", "2"]) == 0
    demo = run_demo(tmp_path / "demo.png", seed=2, steps=4, cache=ModelCache())
    expected = (demo.output[0] * 255).round() / 255  # the 8-bit file the CLI wrote
    assert torch.equal(load_image(out)[0], expected)


# ---------------------------------------------------------------------------------------------- demo
def test_demo_checks_its_output_before_the_model_loads(tmp_path, caplog, no_model_load):
    assert cli.main(["demo", "-o", str(tmp_path / "demo.xyz")]) == 2
    assert ".xyz is not a picture format this can write" in caplog.text


def test_demo_shows_a_progress_bar(tmp_path, monkeypatch):
    from ip2p_nodes.pipeline_core import demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kwargs: seen.update(kwargs))
    assert cli.main(["demo", "-o", str(tmp_path / "d.png")]) == 0
    assert callable(seen["progress"])


def test_demo_with_a_bigger_picture_warns_reports_progress_and_stays_at_its_size(tmp_path, caplog):
    from ip2p_nodes.pipeline_core.demo import run_demo
    from ip2p_nodes.pipeline_core.editing.images import load_image

    picture = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(picture)
    steps = []
    result = run_demo(tmp_path / "d.png", image=picture, steps=2, cache=ModelCache(),
                      progress=lambda done, total, _: steps.append((done, total)))
    assert steps == [(1, 2), (2, 2)]
    assert "photo.png is 400x300; the toy model only knows 32x32 pictures" in caplog.text
    assert "ip2p-edit edit" in caplog.text  # what to use for real pictures
    assert load_image(result.path).shape == (1, 300, 800, 3)  # input | edit, not enlarged 8x into 2400x6400
