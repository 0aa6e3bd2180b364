"""Sampler behaviours users rely on: seeds, batches, sizes, LATENT convention, skipped passes, cancel."""

import pytest
import torch

from ip2p_nodes.pipeline_core import PlanItem, SeedPlan, decode_latents, edit, encode_instruction, make_plan
from ip2p_nodes.pipeline_core.errors import InputError


def _img(h=40, w=56, b=1, seed=5):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_same_seed_gives_same_item_alone_and_inside_a_batch_of_four(family_model):
    cond = encode_instruction(family_model, "make it winter")
    img = _img()
    alone = edit(family_model, cond, img, SeedPlan.single(77), steps=3)
    batch = edit(family_model, cond, img, make_plan(75, 4, "increment"), steps=3, max_batch=4)
    assert [it.seed for _, it in batch.items] == [75, 76, 77, 78]
    diff = (batch.images[2] - alone.images[0]).abs().max().item()
    print(f"\n[seed] max |batch item - solo| = {diff:.3g}")
    assert diff < 1e-4
    # and the other items really are different pictures
    assert (batch.images[0] - alone.images[0]).abs().max() > 1e-2


def test_item_is_independent_of_batch_chunking(family_model):
    cond = encode_instruction(family_model, "make it winter")
    plan = make_plan(10, 3, "increment")
    a = edit(family_model, cond, _img(), plan, steps=2, max_batch=1)
    b = edit(family_model, cond, _img(), plan, steps=2, max_batch=3)
    assert (a.images - b.images).abs().max() < 1e-4


def test_a_guidance_sweep_shares_unet_calls_and_each_item_is_its_own_edit(family_model):
    """Items that only differ in their scales are sampled together (fewer, larger UNet calls: cheaper per item
    on a CPU); items needing other guidance passes (s_I = 1 drops one) go in their own batch."""
    cond = encode_instruction(family_model, "make it winter")
    img = _img()
    plan = [PlanItem(seed, s_t, 1.5) for seed in (3, 4) for s_t in (2.0, 5.0, 9.0)] + [PlanItem(3, 5.0, 1.0)]
    calls = []
    hook = family_model.components.unet.register_forward_pre_hook(lambda m, a, k: calls.append(len(a[0])),
                                                                    with_kwargs=True)
    try:
        swept = edit(family_model, cond, img, plan, steps=2, max_batch=8)
    finally:
        hook.remove()
    assert calls == [6 * 3, 6 * 3, 1 * 2, 1 * 2]  # 6 items x 3 passes per step, then the s_I = 1 item's 2 passes
    for i, item in enumerate(plan):
        solo = edit(family_model, cond, img, [item], steps=2)
        assert (swept.images[i] - solo.images[0]).abs().max() < 1e-4, item
    assert (swept.images[0] - swept.images[1]).abs().max() > 1e-3  # the scales really differ per item


@pytest.mark.parametrize("h,w", [(37, 53), (8, 8), (65, 9), (64, 48)])
def test_output_has_exactly_the_input_size(family_model, h, w):
    cond = encode_instruction(family_model, "add snow")
    out = edit(family_model, cond, _img(h, w), SeedPlan.single(1), steps=1)
    assert out.images.shape == (1, h, w, 3)
    assert out.images.min() >= 0 and out.images.max() <= 1


def test_latent_output_decoded_with_comfyui_convention_gives_the_image_output(family_model):
    cond = encode_instruction(family_model, "add snow")
    out = edit(family_model, cond, _img(48, 64), SeedPlan.single(3), steps=2)
    # ComfyUI LATENT samples are unscaled: VAEDecode feeds them to the VAE decoder as they are.
    assert out.latents.shape == (1, 4, 6, 8)
    vae = family_model.components.vae
    with torch.no_grad():
        decoded = vae.decode(out.latents).sample
    image = ((decoded + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    assert (image - out.images).abs().max() < 1e-5
    assert (decode_latents(family_model, out.latents, (48, 64)) - out.images).abs().max() < 1e-6


def test_batch_of_input_images_is_edited_with_the_same_plan(family_model):
    cond = encode_instruction(family_model, "add snow")
    imgs = _img(b=2)
    out = edit(family_model, cond, imgs, make_plan(5, 2, "increment"), steps=2)
    assert out.images.shape[0] == 4
    assert [(b, it.seed) for b, it in out.items] == [(0, 5), (0, 6), (1, 5), (1, 6)]
    solo = edit(family_model, cond, imgs[1:2], SeedPlan.single(6), steps=2)
    assert (out.images[3] - solo.images[0]).abs().max() < 1e-4


def test_guidance_values_from_the_plan_override_the_sampler_settings(fp32_model):
    cond = encode_instruction(fp32_model, "add snow")
    img = _img()
    via_plan = edit(fp32_model, cond, img, [PlanItem(9, 3.0, 1.2)], steps=2, text_guidance=7.5, image_guidance=1.5)
    direct = edit(fp32_model, cond, img, SeedPlan.single(9), steps=2, text_guidance=3.0, image_guidance=1.2)
    assert (via_plan.images - direct.images).abs().max() < 1e-6


def test_image_guidance_below_one_is_allowed_and_changes_the_result(fp32_model):
    cond = encode_instruction(fp32_model, "add snow")
    img = _img()
    low = edit(fp32_model, cond, img, SeedPlan.single(2), steps=2, image_guidance=0.5)
    one = edit(fp32_model, cond, img, SeedPlan.single(2), steps=2, image_guidance=1.0)
    assert (low.images - one.images).abs().max() > 1e-3


def test_unit_scales_run_only_the_passes_the_formula_needs(family_model, monkeypatch):
    batch_sizes = []
    unet = family_model.components.unet
    original = unet.forward

    def counting_forward(sample, *args, **kwargs):
        batch_sizes.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counting_forward)
    cond = encode_instruction(family_model, "add snow")
    for s_t, s_i, passes in [(7.5, 1.5, 3), (7.5, 1.0, 2), (1.0, 1.0, 1)]:
        batch_sizes.clear()
        edit(family_model, cond, _img(), SeedPlan.single(1), steps=2, text_guidance=s_t, image_guidance=s_i)
        assert batch_sizes == [passes, passes]


def test_cancel_from_progress_stops_within_one_step_and_the_next_run_works(family_model):
    cond = encode_instruction(family_model, "add snow")
    seen = []

    class Cancelled(Exception):
        pass

    def progress(done, total, latents):
        seen.append(done)
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        edit(family_model, cond, _img(), SeedPlan.single(1), steps=10, progress=progress)
    assert seen == [1, 2]
    again = edit(family_model, cond, _img(), SeedPlan.single(1), steps=2)
    ref = edit(family_model, cond, _img(), SeedPlan.single(1), steps=2)
    assert torch.equal(again.images, ref.images)


class _Cancelled(Exception):
    pass


def _pre_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in module.modules())


def test_cancel_check_stops_inside_the_first_unet_call_and_the_next_edit_is_untouched(family_model):
    """A step of a big batch on a CPU takes a minute: Cancel must not wait for it to end."""
    c = family_model.components
    cond = encode_instruction(family_model, "add snow")
    reference = edit(family_model, cond, _img(), SeedPlan.single(1), steps=3)
    unet_hooks, vae_hooks = _pre_hooks(c.unet), _pre_hooks(c.vae)

    unet_calls = {"started": 0, "finished": 0}
    started = c.unet.register_forward_pre_hook(lambda *_: unet_calls.__setitem__("started", unet_calls["started"] + 1))
    finished = c.unet.register_forward_hook(lambda *_: unet_calls.__setitem__("finished", unet_calls["finished"] + 1))
    checks_in_unet, progressed = [], []

    def check_cancel():
        inside = unet_calls["started"] > unet_calls["finished"]
        checks_in_unet.append(inside)
        if sum(checks_in_unet) == 2:  # the second block of the first UNet call
            raise _Cancelled

    try:
        with pytest.raises(_Cancelled):
            edit(family_model, cond, _img(), SeedPlan.single(1), steps=3, check_cancel=check_cancel,
                 progress=lambda *a: progressed.append(a))
    finally:
        started.remove()
        finished.remove()
    assert unet_calls == {"started": 1, "finished": 0}  # stopped in the middle of the very first UNet call
    assert progressed == []
    # The hooks lasted only as long as the call; the cached model gives the picture it gave before.
    assert (_pre_hooks(c.unet), _pre_hooks(c.vae)) == (unet_hooks, vae_hooks)
    again = edit(family_model, cond, _img(), SeedPlan.single(1), steps=3)
    assert torch.equal(again.images, reference.images)
    assert torch.equal(again.latents, reference.latents)


def test_cancel_check_runs_several_times_per_unet_call_and_changes_nothing_when_it_returns(fp32_model):
    cond = encode_instruction(fp32_model, "add snow")
    unet = fp32_model.components.unet
    calls = []
    plain = edit(fp32_model, cond, _img(), make_plan(1, 2), steps=2)
    checked = edit(fp32_model, cond, _img(), make_plan(1, 2), steps=2, check_cancel=lambda: calls.append(1))
    assert torch.equal(checked.images, plain.images)
    blocks = len(unet.down_blocks) + 1 + len(unet.up_blocks)
    assert len(calls) > 2 * blocks  # two UNet calls, each checked before every block


def test_cancel_check_is_also_run_during_the_vae_decode(fp32_model):
    cond = encode_instruction(fp32_model, "add snow")
    decoded = []
    decoder = fp32_model.components.vae.decoder
    handle = decoder.register_forward_pre_hook(lambda *_: decoded.append(1))

    def check_cancel():
        if decoded:
            raise _Cancelled

    try:
        with pytest.raises(_Cancelled):
            edit(fp32_model, cond, _img(), make_plan(1, 3), steps=1, check_cancel=check_cancel)
    finally:
        handle.remove()
    assert decoded == [1]  # the first picture's decode was stopped; the other two never began


def test_ctrl_c_inside_a_unet_call_reaches_the_caller(fp32_model):
    cond = encode_instruction(fp32_model, "add snow")
    unet = fp32_model.components.unet

    def ctrl_c(*_):
        raise KeyboardInterrupt  # where Python raises it when Ctrl-C comes during the UNet's middle block

    handle = unet.mid_block.register_forward_pre_hook(ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            edit(fp32_model, cond, _img(), SeedPlan.single(1), steps=2)
    finally:
        handle.remove()


def test_progress_reports_every_step_of_every_batch(fp32_model):
    cond = encode_instruction(fp32_model, "add snow")
    calls = []
    edit(fp32_model, cond, _img(), make_plan(1, 3), steps=2, max_batch=2, progress=lambda d, t, _: calls.append((d, t)))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, r"steps must be between 1 and 500, got 0"),
        ({"text_guidance": float("nan")}, r"text guidance must be a number between 0 and 30, got nan"),
        ({"scheduler": "nope"}, r"unknown scheduler 'nope'; choose one of: auto, euler_ancestral"),
    ],
)
def test_bad_settings_get_a_clear_error(fp32_model, kwargs, match):
    cond = encode_instruction(fp32_model, "add snow")
    with pytest.raises(InputError, match=match):
        edit(fp32_model, cond, _img(), SeedPlan.single(1), **kwargs)


@pytest.mark.parametrize("channels", [1, 4])
def test_grey_and_rgba_images_are_edited_as_rgb(fp32_model, channels):
    cond = encode_instruction(fp32_model, "add snow")
    rgb = _img()
    odd = torch.cat([rgb, torch.rand(1, 40, 56, 1)], -1) if channels == 4 else rgb[..., :1]
    out = edit(fp32_model, cond, odd, SeedPlan.single(1), steps=1)
    assert out.images.shape == (1, 40, 56, 3)
    if channels == 4:  # alpha ignored, not mistaken for colour
        assert torch.equal(out.images, edit(fp32_model, cond, rgb, SeedPlan.single(1), steps=1).images)


def test_nan_image_is_refused(fp32_model):
    cond = encode_instruction(fp32_model, "add snow")
    bad = _img()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="the image contains NaN or infinite values; check the node that made it"):
        edit(fp32_model, cond, bad, SeedPlan.single(1), steps=1)




def test_the_memory_manager_is_asked_for_room_that_grows_with_the_picture(tiny_folder):
    from ip2p_nodes.pipeline_core import ModelCache, ModelSource, Residency

    asked = []

    class Recording(Residency):
        def load(self, components, handle, names, memory_required=0):
            if "unet" in names:
                asked.append(memory_required)
            super().load(components, handle, names, memory_required)

    cache = ModelCache(residency=Recording())
    model = cache.get(cache.key_for(ModelSource("diffusers", str(tiny_folder)), "fp32", "cpu"))
    cond = encode_instruction(model, "add snow")
    edit(model, cond, _img(32, 32), SeedPlan.single(1), steps=1)
    edit(model, cond, _img(64, 64), SeedPlan.single(1), steps=1)
    edit(model, cond, _img(64, 64), SeedPlan.single(1), steps=1, image_guidance=1.0)  # two passes, not three
    small, large, fewer_passes = asked
    assert 0 < small
    assert large == pytest.approx(4 * small, abs=4)
    assert fewer_passes == pytest.approx(large * 2 / 3, abs=4)
