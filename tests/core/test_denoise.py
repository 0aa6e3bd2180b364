"""Edit strength: denoise < 1 starts from the image's own noised latent; denoise = 1 is the plain sampler."""

import pytest
import torch

from ip2p_nodes.pipeline_core import SeedPlan, edit, encode_images, encode_instruction, make_plan
from ip2p_nodes.pipeline_core.editing.sampling import strength_steps
from ip2p_nodes.pipeline_core.errors import InputError
from ip2p_nodes.pipeline_core.models.families import FAMILIES


def _img(h=40, w=56, b=1, seed=5):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def cond(fp32_model):
    return encode_instruction(fp32_model, "make it winter")


@pytest.mark.parametrize("scheduler", ["auto", "dpmpp_2m"])  # auto: SD1.5 Euler ancestral, SDXL Euler, CosXL EDM
def test_denoise_one_is_exactly_the_plain_sampler(family_model, family_cond, scheduler):
    img = _img()
    plain = edit(family_model, family_cond, img, make_plan(3, 2), steps=3, scheduler=scheduler)
    full = edit(family_model, family_cond, img, make_plan(3, 2), steps=3, scheduler=scheduler, denoise=1.0)
    assert torch.equal(plain.images, full.images) and torch.equal(plain.latents, full.latents)


@pytest.mark.parametrize("steps,strength,expected", [(20, 0.5, 10), (20, 0.33, 6), (10, 0.01, 1), (3, 1.0, 3)])
def test_denoise_runs_the_last_part_of_the_schedule(steps, strength, expected):
    assert strength_steps(steps, strength) == expected


def test_lower_denoise_runs_fewer_steps_and_reports_them(family_model, family_cond):
    calls = []
    progress = lambda d, t, _: calls.append((d, t))  # noqa: E731
    edit(family_model, family_cond, _img(), SeedPlan.single(1), steps=10, denoise=0.3, progress=progress)
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_small_denoise_keeps_the_result_close_to_the_input(family_model, family_cond):
    img = _img()
    original, _ = encode_images(family_model, img)
    distances = []
    for strength in (0.2, 0.6, 1.0):
        out = edit(family_model, family_cond, img, SeedPlan.single(7), steps=10, scheduler="euler", denoise=strength)
        distances.append((out.latents - original).abs().mean().item())
    print(f"\n[denoise] mean |latent - input latent| at 0.2 / 0.6 / 1.0: {distances}")
    assert distances[0] < distances[1] < distances[2]
    assert distances[0] < 0.25 * distances[2]


@pytest.mark.parametrize(
    "family_model,scheduler",
    [(family.name, name) for family in FAMILIES for name in family.scheduler_names],
    indirect=["family_model"],
)
def test_every_scheduler_accepts_a_partial_denoise(family_model, family_cond, scheduler):
    img = _img()
    out = edit(family_model, family_cond, img, SeedPlan.single(2), steps=4, scheduler=scheduler, denoise=0.5)
    assert out.images.shape == (1, 40, 56, 3) and torch.isfinite(out.latents).all()
    again = edit(family_model, family_cond, img, SeedPlan.single(2), steps=4, scheduler=scheduler, denoise=0.5)
    assert torch.equal(out.images, again.images)  # the seed decides the noise of the partial start too


def test_partial_denoise_item_is_the_same_alone_and_inside_a_batch(family_model, family_cond):
    img = _img()
    alone = edit(family_model, family_cond, img, SeedPlan.single(12), steps=4, denoise=0.5)
    batch = edit(family_model, family_cond, img, make_plan(11, 3, "increment"), steps=4, denoise=0.5, max_batch=3)
    assert (batch.images[1] - alone.images[0]).abs().max() < 1e-4
    assert (batch.images[0] - alone.images[0]).abs().max() > 1e-3


def test_partial_denoise_with_a_mask_keeps_unmasked_pixels(family_model, family_cond):
    img = _img()
    mask = torch.zeros(1, 40, 56)
    mask[:, 8:32, 16:48] = 1.0
    out = edit(family_model, family_cond, img, SeedPlan.single(3), steps=4, denoise=0.5, mask=mask, feather=3)
    assert torch.equal(out.images[0][mask[0] == 0], img[0][mask[0] == 0])


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), "0.5"])
def test_denoise_outside_zero_to_one_is_refused(fp32_model, cond, bad):
    with pytest.raises(InputError, match="denoise must be above 0 and at most 1"):
        edit(fp32_model, cond, _img(), SeedPlan.single(1), steps=2, denoise=bad)
