"""Input that used to slip through silently or fail deep inside torch: now converted, refused, or warned about.

Every refusal is checked for what it says: what was wrong, and what to do instead.
"""

from __future__ import annotations

import logging

import pytest
import torch

from ip2p_nodes.pipeline_core import ModelCache, ModelSource, PlanItem, SeedPlan, edit, encode_instruction, make_plan
from ip2p_nodes.pipeline_core.editing.images import to_rgb
from ip2p_nodes.pipeline_core.editing.masks import prepare_masks
from ip2p_nodes.pipeline_core.errors import InputError, ModelLoadError
from ip2p_nodes.pipeline_core.models.assets import toy_model_path


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


# ---------------------------------------------------------------------------------------------- steps and seeds
def test_integral_float_steps_and_seeds_work_as_their_ints(fp32_model, cond):
    ints = edit(fp32_model, cond, _img(), [PlanItem(seed=3)], steps=2).images
    floats = edit(fp32_model, cond, _img(), [PlanItem(seed=3.0)], steps=2.0).images
    assert torch.equal(ints, floats)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 2.5}, r"steps must be a whole number, got 2\.5"),
        ({"steps": 0}, r"steps must be between 1 and 500, got 0"),
        ({"plan": [PlanItem(seed=2**70)]}, r"seed must be between 0 and 18446744073709551615, got \d+ — pick a seed"),
        ({"plan": [PlanItem(seed=-1)]}, r"seed must be between 0 and 18446744073709551615, got -1 — pick a seed"),
        ({"plan": [PlanItem(seed=1.5)]}, r"seed must be a whole number, got 1\.5"),
        ({"plan": []}, r"the seed plan is empty; give at least one seed"),
    ],
)
def test_bad_steps_and_seeds_are_refused_before_sampling_with_the_range(fp32_model, cond, kwargs, match):
    kwargs = {"plan": SeedPlan.single(1), "steps": 1, **kwargs}
    with pytest.raises(InputError, match=match):
        edit(fp32_model, cond, _img(), kwargs.pop("plan"), **kwargs)


@pytest.mark.parametrize("seed", [2**70, float("nan"), float("inf"), "7", True])
def test_a_single_seed_beyond_64_bits_or_not_a_number_is_refused_naming_it(seed):
    with pytest.raises(InputError, match=r"seed must be (a whole number|between 0 and 18446744073709551615)"):
        SeedPlan.single(seed)


def test_a_plan_takes_an_integral_float_count_and_refuses_others_before_building_anything():
    assert [it.seed for it in make_plan(5, 4.0).items] == [5, 6, 7, 8]
    with pytest.raises(InputError, match=r"count \(how many seeds\) must be a whole number, got 2\.5"):
        make_plan(0, 2.5)
    with pytest.raises(InputError, match=r"count \(how many seeds\) must be between 1 and 256, got 0"):
        make_plan(0, 0)
    with pytest.raises(InputError, match=r"seed must be between .* — pick a seed"):
        make_plan(2**70, 1)


def test_integer_checks_show_big_bounds_in_full():
    from ip2p_nodes.pipeline_core import limits
    from ip2p_nodes.pipeline_core.editing.checks import check_int

    with pytest.raises(InputError, match="between 0 and 18446744073709551615"):
        check_int(-1, "seed", limits.SEED)
    assert check_int(2**64 - 1, "seed", limits.SEED) == 2**64 - 1


# ---------------------------------------------------------------------------------------------- tiny pictures
def test_a_picture_below_the_useful_size_is_edited_with_a_warning(fp32_model, cond, caplog):
    out = edit(fp32_model, cond, _img(1, 1), SeedPlan.single(1), steps=1)
    assert out.images.shape == (1, 1, 1, 3)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "1x1 pixels" in r.getMessage()]
    assert warned and "below 16 px" in warned[0].getMessage() and "Use a larger picture" in warned[0].getMessage()


def test_a_picture_of_useful_size_gets_no_size_warning(fp32_model, cond, caplog):
    edit(fp32_model, cond, _img(16, 24), SeedPlan.single(1), steps=1)
    assert "pixels; below" not in caplog.text


# ---------------------------------------------------------------------------------------------- model names
def test_toy_names_the_shipped_toy_model():
    assert ModelSource.from_path("toy") == ModelSource("single_file", str(toy_model_path()))


@pytest.mark.parametrize(
    "typed,why",
    [
        ("models/x", "'models/' is a folder here"),
        ("./x", "it is written as a path"),
        ("ckpts/sub/model", "exactly one '/'"),
        ("someone/model.safetensors", "it names a checkpoint file"),
        ("x", "exactly one '/'"),
    ],
)
def test_a_mistyped_local_path_is_reported_missing_not_looked_up_on_the_hub(tmp_path, monkeypatch, typed, why):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError) as err:
        ModelSource.from_path(typed)
    message = str(err.value)
    assert f"{typed}: no such file or folder" in message
    assert why in message and "not looked up on the Hugging Face Hub" in message
    assert "Check the path" in message and "'toy' for the shipped demo model" in message


@pytest.mark.parametrize("hub_id", ["timbrooks/instruct-pix2pix", "diffusers/sdxl-instructpix2pix-768",
                                    "someone/model-1.5"])
def test_a_plain_owner_name_that_is_no_local_path_stays_a_hub_id(tmp_path, monkeypatch, hub_id):
    monkeypatch.chdir(tmp_path)
    assert ModelSource.from_path(hub_id) == ModelSource("hub", hub_id)


# ---------------------------------------------------------------------------------------------- library noise
@pytest.fixture
def library_warnings():
    """WARNING records of diffusers and transformers, whose loggers do not propagate to pytest's caplog."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_loading_a_model_logs_no_library_warnings(tiny_folder, library_warnings, precision):
    cache = ModelCache()
    for source in (ModelSource("diffusers", str(tiny_folder)), ModelSource("single_file", str(toy_model_path()))):
        model = cache.get(cache.key_for(source, precision, "cpu"))
        assert next(model.components.unet.parameters()).dtype == getattr(torch, {"fp32": "float32",
                                                                                "bf16": "bfloat16"}[precision])
    assert [r.getMessage()[:120] for r in library_warnings] == []
