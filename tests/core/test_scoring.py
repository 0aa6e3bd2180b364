"""CLIP scoring: the paper's metrics computed exactly, preprocessing as transformers does it, the pick rule, the
CLI, and which CLIPs load (a user's folder, 'toy', a typed id) — with nothing downloaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ip2p_nodes.pipeline_core.errors import InputError, ModelLoadError
from ip2p_nodes.pipeline_core.scoring import ClipCache, ClipSource, EditScore, pick_best, score_edits
from ip2p_nodes.pipeline_core.scoring.clip import load_clip
from support.tiny_clip import IMAGE_SIZE, MEAN, STD, write_tiny_clip

PARITY = 1e-5


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return load_clip(ClipSource.from_text(str(clip_folder)))


def _pictures(n: int, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.rand((n, size, size, 3), generator=torch.Generator().manual_seed(seed))


def _reference(clip_folder, inputs, edited, before, after):
    """The paper's formulas, written out with transformers directly (unit embeddings, as its code normalises)."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(clip_folder), dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(str(clip_folder))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def img(x):
        out = model.get_image_features(pixel_values=(x.permute(0, 3, 1, 2) - mean) / std)
        return F.normalize(out.pooler_output, dim=-1)

    def txt(texts):
        ids = tok(texts, padding="max_length", max_length=32, return_tensors="pt").input_ids
        return F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)

    with torch.no_grad():
        e0, e1, (t0, t1) = img(inputs), img(edited), txt([before, after])
    return (F.cosine_similarity(e0, e1), F.cosine_similarity(e1 - e0, (t1 - t0)[None]),
            F.cosine_similarity(e1, t1[None]))


@pytest.mark.parametrize("captions", [("a house in summer", "a house in winter"), None])
def test_clip_image_and_direction_equal_the_papers_formula_computed_with_transformers(clip_folder, scorer, captions):
    inputs, edited = _pictures(3, 0), _pictures(3, 1)
    instruction = "make it winter"
    scores = score_edits(scorer, inputs, edited, instruction, *(captions or (None, None)))
    before, after = captions or ("", instruction)  # instruction only: the empty text is the "before" caption
    ref_image, ref_direction, ref_text = _reference(clip_folder, inputs, edited, before, after)
    got = torch.tensor([[s.clip_image, s.clip_direction, s.clip_text] for s in scores])
    diff = (got - torch.stack([ref_image, ref_direction, ref_text], 1)).abs().max().item()
    print(f"parity ({'captions' if captions else 'instruction'}): max |diff| {diff:.2e}")
    assert diff < PARITY
    assert {s.direction_from for s in scores} == {"captions" if captions else "instruction"}


def test_an_unchanged_picture_keeps_clip_image_1_and_has_no_direction(scorer):
    pictures = _pictures(2, 3)
    scores = score_edits(scorer, pictures, pictures.clone(), "make it winter")
    assert all(abs(s.clip_image - 1) < 1e-5 and abs(s.clip_direction) < 1e-3 for s in scores)


def test_a_sweep_of_edits_is_scored_against_its_own_input_in_the_samplers_order(scorer):
    inputs, edited = _pictures(2, 4), _pictures(6, 5)  # 3 edits per input, input-major
    scores = score_edits(scorer, inputs, edited, "make it winter")
    assert [s.input_index for s in scores] == [0, 0, 0, 1, 1, 1]
    alone = score_edits(scorer, inputs[1:], edited[3:4], "make it winter")[0]
    assert abs(alone.clip_image - scores[3].clip_image) < 1e-6
    with pytest.raises(InputError, match="5 edited pictures for 2 inputs"):
        score_edits(scorer, inputs, edited[:5], "make it winter")


def test_one_caption_alone_or_no_text_at_all_is_refused_with_what_to_add(scorer):
    pictures = _pictures(1, 6)
    with pytest.raises(InputError, match="give caption_after too"):
        score_edits(scorer, pictures, pictures, "make it winter", caption_before="a house")
    with pytest.raises(InputError, match="give the instruction"):
        score_edits(scorer, pictures, pictures, "  ")


@pytest.mark.parametrize("size", [(50, 37), (20, 29), (32, 32), (96, 64), (512, 384)])
def test_preprocessing_matches_transformers_clip_image_processor(scorer, clip_folder, size):
    """The processor needs torchvision (not a dependency of the pack); where it is installed, ours must agree:
    exactly on the same float picture, within a level on the 8-bit picture it resizes in 8 bits."""
    pytest.importorskip("torchvision")
    from PIL import ImageFilter
    from transformers import CLIPImageProcessor

    noise = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    rgb = np.array(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(3)))  # a picture, not pixel noise
    processor = CLIPImageProcessor.from_pretrained(str(clip_folder))
    ours = scorer.preprocess(torch.from_numpy(rgb)[None].float() / 255)
    from_float = processor(images=torch.from_numpy(rgb).permute(2, 0, 1).float() / 255, do_rescale=False,
                           return_tensors="pt").pixel_values
    from_8bit = processor(images=Image.fromarray(rgb), return_tensors="pt").pixel_values
    assert ours.shape == from_float.shape == from_8bit.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    level = 1 / 255 / min(STD)  # one 8-bit level in normalised units
    exact, rounded = (ours - from_float).abs().max().item(), (ours - from_8bit).abs().max().item()
    print(f"preprocessing {size}: max |diff| {exact:.1e} (float), {rounded / level:.2f} levels (8-bit)")
    assert exact < PARITY
    assert rounded < 1.5 * level


def _score(image: float, direction: float, owner: int = 0) -> EditScore:
    return EditScore(image, direction, 0.0, owner, "instruction")


def test_pick_best_takes_the_strongest_edit_that_keeps_the_input():
    scores = [_score(0.95, 0.10), _score(0.85, 0.30), _score(0.60, 0.90), _score(0.82, 0.25)]
    [ranking] = pick_best(scores, threshold=0.8)
    assert ranking.order == [1, 3, 0, 2]  # 2 changed most but kept too little: ranked last
    assert ranking.kept == [True, True, True, False]


def test_pick_best_falls_back_to_the_edit_closest_to_the_input_when_none_keeps_enough(caplog):
    [ranking] = pick_best([_score(0.5, 0.9), _score(0.7, 0.1)], threshold=0.8)
    assert ranking.best == 1 and ranking.kept == [False, False]
    assert "no edit of input 1 keeps" in caplog.text


def test_pick_best_picks_once_per_input_picture():
    scores = [_score(0.9, 0.1, 0), _score(0.9, 0.2, 0), _score(0.9, 0.5, 1), _score(0.9, 0.4, 1)]
    assert [r.best for r in pick_best(scores, 0.8)] == [1, 2]


def test_clip_sources_a_folder_toy_or_a_typed_id_and_never_a_mistyped_path(tmp_path, clip_folder):
    from ip2p_nodes.pipeline_core.models.assets import toy_clip_path

    assert ClipSource.from_text("toy") == ClipSource("folder", str(toy_clip_path()))
    assert ClipSource.from_text(str(clip_folder)).kind == "folder"
    assert ClipSource.from_text("openai/clip-vit-large-patch14") == ClipSource("hub", "openai/clip-vit-large-patch14")
    with pytest.raises(ModelLoadError, match="not looked up"):
        ClipSource.from_text("./models/clip/missing")


def test_a_text_encoder_alone_is_refused_saying_it_cannot_see_pictures(tmp_path, clip_folder):
    from transformers import CLIPTextModel

    text_only = tmp_path / "clip_l"
    CLIPTextModel.from_pretrained(str(clip_folder)).save_pretrained(str(text_only))
    with pytest.raises(ModelLoadError, match="cannot score pictures"):
        load_clip(ClipSource("folder", str(text_only)))


def test_the_clip_cache_loads_a_clip_once(clip_folder):
    cache, source = ClipCache(), ClipSource.from_text(str(clip_folder))
    assert cache.get(source) is cache.get(source)


def test_the_score_command_prints_one_json_object_with_the_papers_metrics(tmp_path, clip_folder, capsys):
    from ip2p_nodes.pipeline_core.cli import main

    paths = []
    for k, seed in enumerate((7, 8)):
        arr = (_pictures(1, seed)[0].numpy() * 255).round().astype(np.uint8)
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(arr).save(paths[-1])
    argv = ["score", "--clip", str(clip_folder), "--input", str(paths[0]), "--edited", str(paths[1]),
            "--instruction", "make it winter", "--caption-before", "a house in summer", "--caption-after",
            "a house in winter"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"clip_image", "clip_direction", "clip_text"} <= set(out) and out["direction_from"] == "captions"
    assert -1 <= out["clip_direction"] <= 1 and -1 <= out["clip_image"] <= 1
    assert main(["score", "--clip", str(tmp_path / "nope"), "--input", str(paths[0]), "--edited", str(paths[1]),
                 "--instruction", "x"]) == 2


@pytest.mark.parametrize("extra, message", [
    (["--pick-best"], "needs a CLIP"),
    (["--clip", "toy"], "only work with --pick-best"),
    (["--pick-best", "--clip", "./no/such/clip"], "not looked up"),
    (["--pick-best", "--clip", "toy", "--count", "1"], "one picture to pick from"),
    (["--pick-best", "--clip", "toy", "--count", "2", "--threshold", "2"], "in -1..1"),
])
def test_edit_pick_best_arguments_are_checked_before_any_model_loads(tmp_path, caplog, extra, message):
    from ip2p_nodes.pipeline_core.cli import main
    from ip2p_nodes.pipeline_core.models.assets import sample_image_path

    argv = ["edit", str(sample_image_path()), "make the circle red", "-o", str(tmp_path / "o.png"),
            "--model", "toy", *extra]
    assert main(argv) == 2
    assert message in caplog.text and "loading" not in caplog.text  # refused before the model was loaded
