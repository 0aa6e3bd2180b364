"""The synthetic edit world: reproducible triplets, a held-out split, and rule checks that tell right from wrong."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ip2p_nodes.pipeline_core.training import synthetic
from ip2p_nodes.pipeline_core.training.evaluation import psnr, rule_check, ssim
from ip2p_nodes.pipeline_core.training.synthetic import EDIT_KINDS


def test_the_same_seed_and_index_give_the_same_triplet():
    a, b = synthetic.triplet(17, seed=3), synthetic.triplet(17, seed=3)
    assert a.instruction == b.instruction
    assert np.array_equal(a.input, b.input) and np.array_equal(a.edited, b.edited)
    assert synthetic.triplet(18, seed=3).instruction != a.instruction or not np.array_equal(
        synthetic.triplet(18, seed=3).input, a.input)


def test_the_held_out_split_shares_no_picture_with_the_training_split():
    train = {synthetic.triplet(i).input.tobytes() for i in range(300)}
    held = [synthetic.triplet(i, split="heldout").input.tobytes() for i in range(300)]
    assert not train.intersection(held)


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_each_instruction_kind_edits_as_it_says(kind):
    t = synthetic.triplet(5, kind=kind, split="heldout")
    assert t.kind == kind
    changed = np.abs(t.edited - t.input).max(-1) > 1e-6
    if kind == "darker":
        assert t.instruction == "make it darker"
        np.testing.assert_allclose(t.edited, t.input * 0.5, atol=1e-6)
        return
    shape = t.target
    assert shape.kind in t.instruction
    # Only pixels the edited shape covers (before or after) change.
    allowed = synthetic.coverage(shape) > 0
    old = next((s for s in t.before.shapes if s.slot == shape.slot), None)
    if old is not None:
        allowed |= synthetic.coverage(old) > 0
    assert changed.any() and not (changed & ~allowed).any()
    if kind in ("recolor", "add"):
        core = synthetic.coverage(shape) > 0.99
        np.testing.assert_allclose(t.edited[core].mean(0), synthetic.COLOURS[shape.colour], atol=1e-5)
    if kind == "add":
        assert shape.slot == min(set(range(4)) - {s.slot for s in t.before.shapes})
    if kind == "remove":
        core = synthetic.coverage(shape) > 0.99
        np.testing.assert_allclose(t.edited[core].mean(0), synthetic.BACKGROUNDS[t.before.background], atol=1e-5)


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_the_rule_check_passes_the_true_edit_and_fails_doing_nothing(kind):
    for i in range(5):
        t = synthetic.triplet(i, kind=kind, split="heldout")
        assert rule_check(t, t.edited) == (True, rule_check(t, t.edited)[1])
        ok, why = rule_check(t, t.input)
        assert not ok, (t.instruction, why)


def test_the_rule_check_catches_the_wrong_colour_and_a_moved_neighbour():
    t = next(t for i in range(100) if len((t := synthetic.triplet(i, kind="recolor")).after.shapes) >= 2)
    wrong = [c for c in synthetic.COLOURS if c not in (t.target.colour, t.before.find(t.target.kind).colour)][0]
    wrong_scene = replace(t.after, shapes=tuple(replace(s, colour=wrong) if s.slot == t.target.slot else s
                                                for s in t.after.shapes))
    ok, why = rule_check(t, synthetic.render(wrong_scene))
    assert not ok and wrong in why

    other = next(s for s in t.after.shapes if s.slot != t.target.slot)
    moved = replace(t.after, shapes=tuple(replace(s, cx=s.cx + 3) if s is other else s for s in t.after.shapes))
    ok, why = rule_check(t, synthetic.render(moved))
    assert not ok and other.kind in why


def test_psnr_and_ssim_are_perfect_for_identical_pictures_and_lower_otherwise():
    t = synthetic.triplet(0, kind="recolor")
    assert psnr(t.edited, t.edited) >= 60 and ssim(t.edited, t.edited) == pytest.approx(1.0)
    assert psnr(t.input, t.edited) < 40 and ssim(t.input, t.edited) < 1.0


def test_a_64_pixel_world_has_the_same_scene_at_twice_the_size():
    small, big = synthetic.triplet(9, size=32), synthetic.triplet(9, size=64)
    assert small.instruction == big.instruction and big.input.shape == (64, 64, 3)
    down = big.input.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(down - small.input).mean() < 0.02


def test_an_instruction_read_back_gives_exactly_the_edit_it_was_drawn_with():
    """`instructed` (how the examples the pack shows are rule-checked) agrees with the world's own edits."""
    for i in range(60):
        t = synthetic.triplet(i, seed=3)
        again = synthetic.instructed(t.before, t.instruction)
        assert (again.kind, again.target, again.after) == (t.kind, t.target, t.after), t.instruction
        assert np.array_equal(again.edited, t.edited)


@pytest.mark.parametrize("instruction", ["make it winter", "remove the star", "add a red circle",
                                         "turn the circle into a circle", "make the circle orange"])
def test_an_instruction_the_scene_cannot_take_is_refused(instruction):
    from ip2p_nodes.pipeline_core.training.toy import sample_scene  # a blue circle and a yellow triangle

    with pytest.raises(ValueError, match="scene|templates"):
        synthetic.instructed(sample_scene(), instruction)
