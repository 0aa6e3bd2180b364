"""The scoring nodes as ComfyUI calls them: which CLIPs the loader offers, scores of a sweep captioning a grid,
and Pick Best choosing the edit that did what was asked (on the shipped toy CLIP, whose answers are known)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from support import comfy_harness
from support.tiny_clip import write_tiny_clip

comfy_harness.import_comfyui()  # skips this module, saying why, without COMFYUI_DIR

import folder_paths  # noqa: E402

from ip2p_nodes.nodes.grid import IP2PImageGrid  # noqa: E402
from ip2p_nodes.nodes.scoring import IP2PClipScorerLoader, IP2PEditScore, IP2PPickBest  # noqa: E402
from ip2p_nodes.pipeline_core.errors import InputError, ModelLoadError  # noqa: E402
from ip2p_nodes.pipeline_core.models.assets import TOY_CLIP_CHOICE, TOY_CLIP_THRESHOLD  # noqa: E402
from ip2p_nodes.pipeline_core.training import synthetic  # noqa: E402
from ip2p_nodes.pipeline_core.training.toy import sample_triplet  # noqa: E402
from ip2p_nodes.pipeline_core.training.toy_clip import caption  # noqa: E402

pytestmark = pytest.mark.comfyui


@pytest.fixture
def clip_dirs(comfy_env, tmp_path, monkeypatch):
    """models/clip and the pack's models/ip2p_clip as temp folders."""
    dirs = {"clip": tmp_path / "models" / "clip", "ip2p_clip": tmp_path / "models" / "ip2p_clip"}
    for d in dirs.values():
        d.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "text_encoders",
                        ([str(dirs["clip"])], folder_paths.supported_pt_extensions))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ip2p_clip", ([str(dirs["ip2p_clip"])], set()))
    return dirs


def test_loader_offers_clip_folders_but_not_text_encoders_and_the_toy_clip_last(clip_dirs):
    from transformers import CLIPTextModel

    write_tiny_clip(clip_dirs["clip"] / "clip-vit-tiny")
    write_tiny_clip(clip_dirs["ip2p_clip"] / "mine")
    CLIPTextModel.from_pretrained(str(clip_dirs["clip"] / "clip-vit-tiny")).save_pretrained(
        str(clip_dirs["clip"] / "text-only"))
    (clip_dirs["clip"] / "clip_l.safetensors").write_bytes(b"\0" * 16)

    options = IP2PClipScorerLoader.GET_SCHEMA().inputs[0].options
    assert options == ["clip-vit-tiny", "mine", TOY_CLIP_CHOICE]
    scorer = IP2PClipScorerLoader.execute("clip-vit-tiny", "")[0]
    assert scorer.name == "clip-vit-tiny"
    with pytest.raises(ModelLoadError, match="no CLIP folder of that name"):
        IP2PClipScorerLoader.execute("gone", "")


def _toy_sweep():
    """The shipped sample, and three 'edits' of it: the exact one, a wrong colour, and nothing done."""
    t = sample_triplet()
    wrong = synthetic.render(synthetic.Scene(t.before.background, (
        synthetic.Shape("circle", "green", 0, *synthetic.slot_centre(0), 5.0), t.before.shapes[1])))
    edited = torch.from_numpy(np.stack([wrong, t.input, t.edited]))
    return t, torch.from_numpy(t.input)[None], edited


def test_edit_score_and_pick_best_choose_the_edit_that_did_what_was_asked_on_the_toy_clip(clip_dirs):
    t, image, edited = _toy_sweep()
    scorer = IP2PClipScorerLoader.execute(TOY_CLIP_CHOICE, "")[0]
    labels = "seed 1 · text 3 · image 1.5\nseed 2 · text 3 · image 1.5\nseed 3 · text 3 · image 1.5"
    scores, direction, kept, report, scored_labels = IP2PEditScore.execute(
        scorer, image, edited, t.instruction, caption(t.before), caption(t.after), None, labels)
    assert len(direction) == len(kept) == 3 and direction[2] == max(direction)
    assert kept[1] == pytest.approx(1.0, abs=1e-5)  # "nothing done" kept everything
    assert report.count("\n") == 2 and "clip_direction" in report
    assert scored_labels.splitlines()[2].startswith("seed 3 · text 3 · image 1.5 · dir ")

    best, label, ranking = IP2PPickBest.execute(edited, scores, TOY_CLIP_THRESHOLD)
    assert torch.equal(best, edited[2:3])
    assert label.startswith("seed 3 ·") and ranking.splitlines()[0].startswith("1. seed 3")

    grid = IP2PImageGrid.execute(edited, 3, 0, 4, scored_labels)[0]
    assert grid.shape[2] == 3 * 32 + 2 * 4 and grid.shape[1] > 32  # captions under the cells


def test_edit_score_takes_the_instruction_from_the_conditioning_and_refuses_mismatched_batches(clip_dirs):
    from types import SimpleNamespace

    t, image, edited = _toy_sweep()
    scorer = IP2PClipScorerLoader.execute("", "toy")[0]  # typed 'toy' is the same CLIP
    cond = SimpleNamespace(instruction=t.instruction)
    scores = IP2PEditScore.execute(scorer, image, edited, "", "", "", cond, None)[0]
    assert {s.direction_from for s in scores.scores} == {"instruction"}
    with pytest.raises(InputError, match="3 pictures but 2 scores"):
        IP2PPickBest.execute(edited, IP2PEditScore.execute(scorer, image, edited[:2], t.instruction, "", "")[0], 0.5)
    with pytest.raises(InputError, match="one line per image"):
        IP2PEditScore.execute(scorer, image, edited, t.instruction, "", "", None, "one line only")
