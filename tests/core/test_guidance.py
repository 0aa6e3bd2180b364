"""The dual-guidance formula, written once in pipeline_core.editing.guidance, is the paper's, and skipping passes is
free."""

import pytest
import torch

from ip2p_nodes.pipeline_core.editing import guidance


def _preds(seed=0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("s_t,s_i", [(7.5, 1.5), (1.0, 1.0), (3.0, 0.5), (0.0, 0.0), (12.0, 0.0), (-2.0, 2.5)])
def test_guidance_equals_paper_formula_including_image_guidance_below_one(s_t, s_i):
    e_t, e_i, e_u = _preds()
    paper = e_u + s_t * (e_t - e_i) + s_i * (e_i - e_u)
    ours = guidance.combine({"text": e_t, "image": e_i, "uncond": e_u}, s_t, s_i)
    torch.testing.assert_close(ours, paper, rtol=0, atol=0)


@pytest.mark.parametrize(
    "s_t,s_i,expected",
    [
        (7.5, 1.5, ("text", "image", "uncond")),
        (7.5, 1.0, ("text", "image")),
        (1.0, 1.0, ("text",)),
        (0.0, 1.5, ("image", "uncond")),
        (2.0, 2.0, ("text", "uncond")),
        (0.0, 0.0, ("uncond",)),
    ],
)
def test_only_passes_with_nonzero_weight_are_run(s_t, s_i, expected):
    assert guidance.required_passes(s_t, s_i) == expected


@pytest.mark.parametrize("s_t,s_i", [(7.5, 1.0), (1.0, 1.0), (0.0, 1.5), (2.0, 2.0), (0.0, 0.0)])
def test_skipping_passes_gives_the_three_pass_result(s_t, s_i):
    e_t, e_i, e_u = _preds(1)
    full = guidance.dual_guidance(e_t, e_i, e_u, s_t, s_i)
    preds = dict(zip(guidance.PASS_ORDER, (e_t, e_i, e_u)))
    reduced = guidance.combine({k: preds[k] for k in guidance.required_passes(s_t, s_i)}, s_t, s_i)
    torch.testing.assert_close(reduced, full, rtol=1e-12, atol=1e-12)


def test_missing_a_needed_pass_is_an_error_not_a_silent_wrong_image():
    e_t, e_i, _ = _preds(2)
    with pytest.raises(ValueError, match="uncond"):
        guidance.combine({"text": e_t, "image": e_i}, 7.5, 1.5)
