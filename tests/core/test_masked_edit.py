"""Masked edits: unmasked pixels kept bit for bit, feathering, mask size/batch rules, crop-to-mask."""

import logging

import pytest
import torch

from ip2p_nodes.pipeline_core import SeedPlan, edit, encode_images, encode_instruction, make_plan
from ip2p_nodes.pipeline_core.editing.masks import feather, padded_box, prepare_masks
from ip2p_nodes.pipeline_core.editing.resolution import working_size
from ip2p_nodes.pipeline_core.errors import InputError


def _img(h=48, w=64, b=1, seed=5):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _box_mask(h=48, w=64, top=8, left=16, bottom=32, right=48):
    m = torch.zeros(1, h, w)
    m[:, top:bottom, left:right] = 1.0
    return m


@pytest.fixture
def cond(fp32_model):
    return encode_instruction(fp32_model, "make it winter")


@pytest.fixture
def unet_calls(fp32_model, monkeypatch):
    calls = []
    unet = fp32_model.components.unet
    original = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("feather_px", [0, 6])
def test_pixels_outside_the_mask_are_the_input_bit_for_bit(family_model, family_cond, feather_px):
    img, mask = _img(), _box_mask()
    out = edit(family_model, family_cond, img, SeedPlan.single(4), steps=2, mask=mask, feather=feather_px)
    outside = mask[0] == 0
    assert torch.equal(out.images[0][outside], img[0][outside])
    inside = mask[0] > 0
    assert (out.images[0][inside] - img[0][inside]).abs().max() > 0.05  # the masked part was edited


def test_feather_fades_the_edit_in_over_the_given_width_inside_the_border():
    mask = _box_mask()[0]
    alpha = feather(mask, 6)
    assert torch.equal(alpha[mask == 0], torch.zeros_like(alpha[mask == 0]))
    row = alpha[20, 16:32]  # from the left border of the box inwards
    assert row[0] > 0 and row[0] < 0.2
    assert torch.all(row[1:] >= row[:-1])
    assert row[6] == 1.0 and row[5] < 1.0
    assert torch.equal(feather(mask, 0), mask)
    # the image's own edge is not a border: a mask touching it is not faded there
    assert feather(torch.ones(20, 20).index_fill_(1, torch.arange(10, 20), 0.0), 4)[10, 0] == 1.0


def test_feather_makes_the_edit_blend_gradually_into_the_kept_pixels(fp32_model, cond):
    img, mask = _img(), _box_mask()
    hard = edit(fp32_model, cond, img, SeedPlan.single(4), steps=2, mask=mask, feather=0)
    soft = edit(fp32_model, cond, img, SeedPlan.single(4), steps=2, mask=mask, feather=8)
    # first masked column: the hard edge shows the full edit, the feathered one mostly the input
    hard_step = (hard.images[0, 12:28, 16] - img[0, 12:28, 16]).abs().mean()
    soft_step = (soft.images[0, 12:28, 16] - img[0, 12:28, 16]).abs().mean()
    assert soft_step < 0.25 * hard_step


def test_unmasked_latents_end_on_the_original_latent(family_model, family_cond):
    img = _img()
    mask = torch.zeros(1, 48, 64)
    mask[:, :, 32:] = 1.0  # right half: latent columns 4..7 free, 0..3 kept
    out = edit(family_model, family_cond, img, SeedPlan.single(4), steps=3, mask=mask)
    original, _ = encode_images(family_model, img)
    assert torch.allclose(out.latents[..., :4], original[..., :4], atol=1e-6)
    assert (out.latents[..., 4:] - original[..., 4:]).abs().max() > 0.1


def test_empty_mask_returns_the_input_without_running_the_sampler(fp32_model, cond, unet_calls, caplog):
    img = _img()
    with caplog.at_level(logging.INFO, logger="ip2p_nodes"):
        out = edit(fp32_model, cond, img, make_plan(1, 2), steps=2, mask=torch.zeros(1, 48, 64))
    assert unet_calls == []
    assert torch.equal(out.images, img.expand(2, -1, -1, -1))
    assert out.latents.shape == (2, 4, 6, 8)
    assert "mask is empty" in caplog.text


def test_empty_mask_on_one_image_of_a_batch_skips_only_that_image(fp32_model, cond):
    imgs = _img(b=2)
    masks = torch.cat([torch.zeros(1, 48, 64), torch.ones(1, 48, 64)])
    out = edit(fp32_model, cond, imgs, SeedPlan.single(2), steps=2, mask=masks)
    assert torch.equal(out.images[0], imgs[0])
    solo = edit(fp32_model, cond, imgs[1:], SeedPlan.single(2), steps=2)
    assert torch.equal(out.images[1], solo.images[0])


def test_full_mask_is_the_same_as_no_mask(family_model, family_cond):
    img = _img()
    plain = edit(family_model, family_cond, img, SeedPlan.single(4), steps=2)
    full = edit(family_model, family_cond, img, SeedPlan.single(4), steps=2, mask=torch.ones(1, 48, 64), feather=5)
    assert torch.equal(plain.images, full.images) and torch.equal(plain.latents, full.latents)


def test_mask_of_another_size_is_resized_to_the_image(fp32_model, cond):
    img = _img()
    small = torch.zeros(12, 16)  # a quarter of the image's size, no batch dimension
    small[2:8, 4:12] = 1.0
    resized = prepare_masks(small, 1, 48, 64)
    assert resized.shape == (1, 48, 64)
    assert resized[0, 20, 32] == 1.0 and resized[0, 40, 4] == 0.0
    out = edit(fp32_model, cond, img, SeedPlan.single(4), steps=2, mask=small)
    outside = resized[0] == 0
    assert torch.equal(out.images[0][outside], img[0][outside])
    assert (out.images[0][resized[0] == 1] - img[0][resized[0] == 1]).abs().max() > 0.05


def test_one_mask_is_used_for_every_image_of_the_batch(family_model, family_cond):
    imgs = _img(b=2)
    mask = _box_mask()
    out = edit(family_model, family_cond, imgs, SeedPlan.single(4), steps=2, mask=mask)
    outside = mask[0] == 0
    for b in range(2):
        assert torch.equal(out.images[b][outside], imgs[b][outside])
    solo = edit(family_model, family_cond, imgs[1:], SeedPlan.single(4), steps=2, mask=mask)
    assert (out.images[1] - solo.images[0]).abs().max() < 1e-4  # batched convolutions round differently


def test_mask_batch_of_another_length_is_refused_with_a_clear_message(fp32_model, cond):
    with pytest.raises(InputError, match="the mask batch has 3 masks but the image batch has 2 images"):
        edit(fp32_model, cond, _img(b=2), SeedPlan.single(1), steps=1, mask=torch.ones(3, 48, 64))
    # nothing is lost: the next run works
    assert edit(fp32_model, cond, _img(b=2), SeedPlan.single(1), steps=1).images.shape[0] == 2


@pytest.mark.parametrize(
    "mask,match",
    [
        (torch.ones(1, 2, 48, 64), "expected a MASK"),
        (torch.full((1, 48, 64), float("nan")), "the mask contains NaN or infinite values; check the node"),
        ("mask", "expected a MASK tensor"),
    ],
)
def test_unusable_masks_get_a_clear_error(fp32_model, cond, mask, match):
    with pytest.raises(InputError, match=match):
        edit(fp32_model, cond, _img(), SeedPlan.single(1), steps=1, mask=mask)


def test_crop_to_mask_changes_nothing_outside_the_crop_and_edits_the_crop_at_working_resolution(
    family_model, family_cond
):
    img = _img(96, 128)
    mask = _box_mask(96, 128, top=40, left=60, bottom=56, right=76)
    box = padded_box(mask[0], padding=8)
    top, left, bottom, right = box
    assert box == (32, 52, 64, 84)
    out = edit(family_model, family_cond, img, SeedPlan.single(4), steps=2, mask=mask, crop_to_mask=True,
               crop_padding=8, working_resolution=64)
    outside_crop = torch.ones(96, 128, dtype=torch.bool)
    outside_crop[top:bottom, left:right] = False
    assert torch.equal(out.images[0][outside_crop], img[0][outside_crop])
    assert torch.equal(out.images[0][mask[0] == 0], img[0][mask[0] == 0])
    # the 32 x 32 crop was edited at 64 x 64, not at the picture's own size: another result than without crop
    plain = edit(family_model, family_cond, img, SeedPlan.single(4), steps=2, mask=mask, working_resolution=64)
    inside = mask[0] > 0
    assert (out.images[0][inside] - img[0][inside]).abs().max() > 0.05
    assert (out.images[0][inside] - plain.images[0][inside]).abs().max() > 0.05
    # LATENT: the final picture at the whole picture's working size (64 x 64 area -> 55 x 74, frame 56 x 80)
    assert working_size(96, 128, "sd15", 64).latent == (7, 10)
    assert out.latents.shape == (1, 4, 7, 10)


def test_crop_to_mask_with_different_masks_per_image_returns_one_batch(fp32_model, cond):
    imgs = _img(64, 64, b=2)
    masks = torch.cat([_box_mask(64, 64, 4, 4, 12, 12), _box_mask(64, 64, 30, 20, 60, 60)])
    out = edit(fp32_model, cond, imgs, SeedPlan.single(1), steps=1, mask=masks, crop_to_mask=True)
    assert out.images.shape == (2, 64, 64, 3) and out.latents.shape == (2, 4, 8, 8)
    for b in range(2):
        outside = masks[b] == 0
        assert torch.equal(out.images[b][outside], imgs[b][outside])


def test_masked_edit_of_a_downscaled_picture_keeps_unmasked_pixels_exactly(family_model, family_cond):
    img = _img(120, 200)
    mask = _box_mask(120, 200, 30, 50, 90, 150)
    out = edit(family_model, family_cond, img, SeedPlan.single(4), steps=2, mask=mask, feather=4, working_resolution=64)
    assert out.images.shape == (1, 120, 200, 3)
    outside = mask[0] == 0
    assert torch.equal(out.images[0][outside], img[0][outside])
