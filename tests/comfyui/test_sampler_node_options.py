"""The sampler node's mask, denoise, feather, crop_to_mask, working_resolution and speed inputs, called as ComfyUI calls
them.

Needs a ComfyUI checkout (COMFYUI_DIR) and skips, saying so, without one. Fixtures come from this tier's conftest.
"""

from __future__ import annotations

import pytest
import torch

from support import comfy_harness

comfy_harness.import_comfyui()  # skips this module, saying why, without COMFYUI_DIR

from ip2p_nodes.nodes.instruction import IP2PInstruction  # noqa: E402
from ip2p_nodes.nodes.sampler import IP2PSampler  # noqa: E402
from ip2p_nodes.pipeline_core.errors import InputError  # noqa: E402
from support.comfy_harness import picture  # noqa: E402

EXISTING = ["model", "conditioning", "image", "seed", "steps", "text_guidance", "image_guidance", "scheduler", "plan"]
ADDED = ["mask", "denoise", "feather", "crop_to_mask", "working_resolution", "speed"]


def sample(model, image, seed=5, steps=2, **options):
    cond = IP2PInstruction.execute(model, "make it look like winter", "")[0]
    return IP2PSampler.execute(model, cond, image, seed, steps, 7.5, 1.5, "euler_ancestral", None, **options)


def test_new_inputs_are_optional_come_after_the_existing_ones_and_say_what_they_do():
    inputs = IP2PSampler.define_schema().inputs
    assert [i.id for i in inputs] == EXISTING + ADDED
    for i in inputs[len(EXISTING):]:
        assert i.optional, i.id
        assert i.tooltip and len(i.tooltip) > 60, i.id
    by_id = {i.id: i for i in inputs}
    assert (by_id["denoise"].min, by_id["denoise"].max, by_id["denoise"].default) == (0.01, 1.0, 1.0)
    assert by_id["working_resolution"].default == 0 and "0 = the model's own" in by_id["working_resolution"].tooltip


def test_default_options_give_the_same_picture_as_leaving_them_out(tiny):
    img = picture(37, 53)
    plain = sample(tiny, img)
    explicit = sample(tiny, img, mask=None, denoise=1.0, feather=0, crop_to_mask=False, working_resolution=0)
    assert torch.equal(plain[0], explicit[0]) and torch.equal(plain[1]["samples"], explicit[1]["samples"])


def test_masked_node_edit_keeps_unmasked_pixels_and_feathers_the_border(tiny):
    img = picture(48, 64)
    mask = torch.zeros(1, 48, 64)
    mask[:, 10:40, 20:50] = 1.0
    out = sample(tiny, img, mask=mask, feather=6, denoise=0.7)[0]
    assert out.shape == (1, 48, 64, 3)
    assert torch.equal(out[0][mask[0] == 0], img[0][mask[0] == 0])
    assert (out[0, 25, 35] - img[0, 25, 35]).abs().max() > 0.02


def test_crop_to_mask_on_a_large_picture_at_a_low_working_resolution(tiny):
    img = picture(200, 300)
    mask = torch.zeros(1, 200, 300)
    mask[:, 90:110, 140:170] = 1.0
    out, latent, _ = sample(tiny, img, mask=mask, crop_to_mask=True, working_resolution=64)
    assert out.shape == (1, 200, 300, 3)
    assert torch.equal(out[0][mask[0] == 0], img[0][mask[0] == 0])
    assert latent["samples"].shape == (1, 4, 7, 10)  # 52 x 78 at 64^2 area, padded to 56 x 80


def test_mask_batch_that_fits_no_image_batch_gets_a_message_naming_both(tiny):
    with pytest.raises(InputError, match="the mask batch has 2 masks but the image batch has 3 images"):
        sample(tiny, picture(24, 24, batch=3), mask=torch.ones(2, 24, 24))


def test_speed_is_a_quality_fast_combo_whose_tooltip_states_the_trade_off():
    speed = {i.id: i for i in IP2PSampler.define_schema().inputs}["speed"]
    assert speed.options == ["quality", "fast"] and speed.default == "quality"
    for words in ("quality: the whole model on every step", "fast:", "DeepCache", "slightly different"):
        assert words in speed.tooltip, words


def test_a_workflow_saved_before_speed_existed_gets_the_quality_edit_and_fast_is_another_picture(tiny):
    img = picture(37, 53)
    old = sample(tiny, img, steps=4)  # an older workflow's prompt has no speed input at all
    quality = sample(tiny, img, steps=4, speed="quality")
    fast = sample(tiny, img, steps=4, speed="fast")
    assert torch.equal(old[0], quality[0]) and torch.equal(old[1]["samples"], quality[1]["samples"])
    assert fast[0].shape == old[0].shape and not torch.equal(fast[0], old[0])


def test_a_speed_the_node_does_not_offer_is_refused_with_the_choices(tiny):
    with pytest.raises(InputError, match="speed must be one of quality, fast, got 'turbo'"):
        sample(tiny, picture(24, 24), speed="turbo")
