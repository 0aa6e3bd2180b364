"""Input that used to slip through silently or fail deep inside torch: now converted, refused, or warned about.

Every refusal is checked for what it says: what was wrong, and what to do instead.
"""

from __future__ import annotations

import pytest
import torch

from ip2p_nodes.pipeline_core import SeedPlan, edit, encode_instruction
from ip2p_nodes.pipeline_core.editing.images import to_rgb
from ip2p_nodes.pipeline_core.editing.masks import prepare_masks
from ip2p_nodes.pipeline_core.errors import InputError


def _img(h=40, w=56, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def cond(fp32_model):
    return encode_instruction(fp32_model, "add snow")


# ---------------------------------------------------------------------------------------------- pixel types
def test_an_8_bit_image_is_edited_as_the_picture_it_holds_not_as_white(fp32_model, cond):
    eight_bit = (_img() * 255).round().to(torch.uint8)
    as_uint8 = edit(fp32_model, cond, eight_bit, SeedPlan.single(3), steps=1).images
    as_float = edit(fp32_model, cond, eight_bit.float() / 255, SeedPlan.single(3), steps=1).images
    assert torch.equal(as_uint8, as_float)


def test_16_bit_and_bool_images_are_converted_by_their_range():
    sixteen = torch.randint(0, 65536, (1, 8, 8, 3), dtype=torch.int32).to(torch.uint16)
    assert torch.equal(to_rgb(sixteen), sixteen.float() / 65535)
    flags = torch.rand(1, 8, 8, 3) > 0.5
    assert torch.equal(to_rgb(flags), flags.float())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16])
def test_integer_images_of_unknown_range_are_refused_with_the_conversion_to_make(dtype):
    with pytest.raises(InputError, match=rf"dtype {str(dtype)[6:]};.*floats in 0\.\.1.*\.float\(\) / 255"):
        to_rgb(torch.full((1, 8, 8, 3), 200, dtype=dtype))


def test_a_float_image_holding_0_to_255_is_clipped_with_a_warning_that_says_to_divide(caplog):
    out = to_rgb(_img() * 255)
    assert out.max() == 1.0
    assert "values from" in caplog.text and "divide them by 255" in caplog.text


def test_a_slight_overshoot_is_clipped_without_a_word(caplog):
    to_rgb(_img() * 1.005)
    assert "clipped" not in caplog.text


def test_an_8_bit_mask_keeps_its_grey_levels():
    mask = torch.full((1, 8, 8), 128, dtype=torch.uint8)
    assert torch.allclose(prepare_masks(mask, 1, 8, 8), torch.full((1, 8, 8), 128 / 255))
