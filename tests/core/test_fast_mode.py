"""Fast mode (``speed="fast"``): a DeepCache-style step cache. Off it changes nothing; on it runs the deep blocks
only on the full steps, gives the same picture for the same seed, and refuses what it cannot run before any
model work."""

from __future__ import annotations

import pytest
import torch

from ip2p_nodes.pipeline_core import InputError, ModelCache, ModelSource, SeedPlan, edit, encode_instruction
from ip2p_nodes.pipeline_core.editing.step_cache import StepCache, check_cacheable
from ip2p_nodes.pipeline_core.models.lora import LoraRef
from support import lora_files, tiny_controlnet

STEPS = 6


def _img(h=40, w=56, b=1, seed=5):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _edit(model, cond, seed=7, img=None, **kwargs):
    return edit(model, cond, _img() if img is None else img, SeedPlan.single(seed), steps=STEPS, **kwargs)


def _count_mid_calls(model):
    calls = []
    handle = model.components.unet.mid_block.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_quality_is_bit_for_bit_the_edit_without_the_option(family_model, family_cond):
    plain = _edit(family_model, family_cond)
    quality = _edit(family_model, family_cond, speed="quality", fast_interval=4)
    assert torch.equal(plain.images, quality.images) and torch.equal(plain.latents, quality.latents)


def test_fast_with_interval_one_is_quality(family_model, family_cond):
    plain = _edit(family_model, family_cond)
    fast = _edit(family_model, family_cond, speed="fast", fast_interval=1)
    assert torch.equal(plain.images, fast.images) and torch.equal(plain.latents, fast.latents)


def test_fast_runs_the_deep_blocks_only_on_full_steps_and_changes_the_picture_a_little(family_model, family_cond):
    calls, handle = _count_mid_calls(family_model)
    try:
        quality = _edit(family_model, family_cond)
        quality_calls = len(calls)
        calls.clear()
        fast = _edit(family_model, family_cond, speed="fast", fast_interval=3)
    finally:
        handle.remove()
    assert quality_calls == STEPS
    assert len(calls) == 3  # steps 1, 4 and the last, 6, of 6 are full
    assert fast.images.shape == quality.images.shape == (1, 40, 56, 3)
    assert not torch.equal(fast.images, quality.images)


def test_fast_is_deterministic_for_a_seed_and_each_seed_of_a_batch_is_its_own(family_model, family_cond):
    a = _edit(family_model, family_cond, seed=11, speed="fast")
    b = _edit(family_model, family_cond, seed=11, speed="fast")
    assert torch.equal(a.images, b.images)
    c = _edit(family_model, family_cond, seed=12, speed="fast")
    assert (a.images - c.images).abs().max() > 1e-2


def test_each_batch_starts_with_a_full_step_and_its_own_cache(fp32_model):
    """Two batches (max_batch=1): the second must not reuse the first's deep features."""
    cond = encode_instruction(fp32_model, "make it winter")
    img = _img(b=2)
    calls, handle = _count_mid_calls(fp32_model)
    try:
        both = edit(fp32_model, cond, img, SeedPlan.single(3), steps=STEPS, max_batch=1, speed="fast",
                    fast_interval=3)
    finally:
        handle.remove()
    assert len(calls) == 2 * 3  # steps 1, 4 and 6 of each batch
    second_alone = edit(fp32_model, cond, img[1:], SeedPlan.single(3), steps=STEPS, speed="fast", fast_interval=3)
    assert torch.equal(both.images[1], second_alone.images[0])


def test_a_cached_call_on_the_full_calls_inputs_gives_the_full_calls_output(family_model):
    """The shallow branch is the UNet's own forward cut short: on the inputs of the step its features come from,
    it must give what the whole UNet gave (this is what makes the cached steps the DeepCache approximation and
    nothing else)."""
    c = family_model.components
    unet = c.unet
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(3, unet.config.in_channels, 8, 8, generator=g)
    states = torch.randn(3, 5, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(3, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 3)}
    cache = StepCache(unet, interval=2)
    with torch.no_grad():
        full = cache(sample, 500, encoder_hidden_states=states, **kwargs)[0]
        cached = cache(sample, 500, encoder_hidden_states=states, **kwargs)[0]
    assert (cache.full_calls, cache.cached_calls) == (1, 1)
    assert torch.allclose(full, cached, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"speed": "turbo"}, r"speed must be one of quality, fast, got 'turbo'"),
        ({"speed": "fast", "fast_interval": 0}, r"fast interval must be between 1 and 10, got 0"),
        ({"speed": "fast", "fast_interval": 2.5}, r"fast interval must be a whole number, got 2.5"),
    ],
)
def test_bad_speed_settings_are_refused_before_the_model_is_loaded(fp32_model, kwargs, match, monkeypatch):
    cond = encode_instruction(fp32_model, "add snow")

    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(type(fp32_model), "ensure_loaded", refuse)
    with pytest.raises(InputError, match=match):
        _edit(fp32_model, cond, **kwargs)


def test_a_unet_fast_mode_cannot_run_is_refused_by_name(fp32_model):
    unet = fp32_model.components.unet
    saved = unet.class_embedding
    unet.class_embedding = torch.nn.Embedding(2, 8)
    try:
        with pytest.raises(InputError, match="fast mode cannot run this UNet: it has class embeddings; use speed"):
            check_cacheable(unet)
    finally:
        unet.class_embedding = saved


def test_fast_mode_with_a_controlnet_follows_the_hint(fp32_model, tiny_folder, tmp_path):
    """The ControlNet runs on every step; on cached steps its residuals reach the shallow skip connections."""
    from ip2p_nodes.pipeline_core import add_control, load_controlnet, make_control

    module = tiny_controlnet.make_controlnet(tiny_controlnet.unet_config_of(tiny_folder))
    controlnet = load_controlnet(tiny_controlnet.write_diffusers_file(module, tmp_path / "cn.safetensors"), fp32_model)
    cond = encode_instruction(fp32_model, "turn it blue")
    plain = _edit(fp32_model, cond, speed="fast")
    with_a = _edit(fp32_model, add_control(cond, make_control(controlnet, torch.zeros(1, 40, 56, 3))), speed="fast")
    with_b = _edit(fp32_model, add_control(cond, make_control(controlnet, torch.ones(1, 40, 56, 3))), speed="fast")
    assert with_a.images.shape == plain.images.shape
    assert (with_a.images - with_b.images).abs().max() > 1e-3
    assert (with_a.images - plain.images).abs().max() > 1e-3


def test_fast_mode_with_a_lora_applies_the_lora(tiny_folder, tmp_path):
    lora = lora_files.write_diffusers_lora(tiny_folder, tmp_path, rank=4, alpha=8.0, seed=0)
    cache = ModelCache()
    key = cache.key_for(ModelSource("diffusers", str(tiny_folder)), "fp32", "cpu")
    base = cache.get(key)
    base_fast = _edit(base, encode_instruction(base, "turn it blue"), speed="fast")
    with_lora = cache.get(key.with_lora(LoraRef.of(lora.path, 1.0)))
    lora_fast = _edit(with_lora, encode_instruction(with_lora, "turn it blue"), speed="fast")
    assert lora_fast.images.shape == base_fast.images.shape
    assert (lora_fast.images - base_fast.images).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------- CLI and batch


def test_cli_fast_gives_the_api_fast_picture_and_help_explains_it(tmp_path, tiny_folder, capsys):
    import numpy as np
    from PIL import Image

    from ip2p_nodes.pipeline_core import cli

    photo = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(photo)
    args = ["edit", str(photo), "make it winter", "--model", str(tiny_folder), "--steps", str(STEPS),
            "--precision", "fp32", "--seed", "7", "--scheduler", "euler_ancestral"]
    assert cli.main([*args, "-o", str(tmp_path / "fast.png"), "--fast", "--fast-interval", "2"]) == 0
    assert cli.main([*args, "-o", str(tmp_path / "quality.png")]) == 0
    fast, quality = (np.asarray(Image.open(tmp_path / n)) for n in ("fast.png", "quality.png"))
    assert fast.shape == quality.shape == (40, 56, 3) and not np.array_equal(fast, quality)

    model = ModelCache().get(ModelCache().key_for(ModelSource("diffusers", str(tiny_folder)), "fp32", "cpu"))
    from ip2p_nodes.pipeline_core.editing.images import load_image

    api = edit(model, encode_instruction(model, "make it winter"), load_image(str(photo)), SeedPlan.single(7),
               steps=STEPS, scheduler="euler_ancestral", speed="fast", fast_interval=2)
    assert np.abs(np.round(api.images[0].numpy() * 255) - fast.astype(np.float64)).max() <= 1

    for command in ("edit", "batch"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--fast " in text and "--fast-interval" in text and "DeepCache" in text, command


def test_cli_refuses_a_bad_fast_interval_before_loading(tmp_path, no_model_load, caplog):
    from ip2p_nodes.pipeline_core import cli

    rc = cli.main(["edit", str(tmp_path / "in.png"), "x", "-o", str(tmp_path / "o.png"), "--model", "toy", "--fast",
                   "--fast-interval", "11"])
    assert rc == 2
    assert "fast interval must be between 1 and 10, got 11" in caplog.text


def test_batch_keys_of_quality_rows_are_unchanged_and_fast_rows_get_their_own():
    """A store written before fast mode existed keeps its rows (same keys); fast rows are never taken for them."""
    from dataclasses import asdict

    from ip2p_nodes.pipeline_core.batch.keys import settings_fingerprint
    from ip2p_nodes.pipeline_core.editing.settings import EditSettings

    quality = EditSettings().checked()
    before = {k: v for k, v in asdict(quality).items()
              if k not in ("text_guidance", "image_guidance", "max_batch", "speed", "fast_interval", "vram")}
    assert settings_fingerprint(quality, "", "fp32", "cpu") == {**before, "negative": "", "precision": "fp32",
                                                                 "device": "cpu"}
    # Nor does low-VRAM mode give a row a new key: it moves model parts, not pixels.
    assert settings_fingerprint(EditSettings(vram="low").checked(), "", "fp32", "cpu") == settings_fingerprint(
        quality, "", "fp32", "cpu")
    fast = settings_fingerprint(EditSettings(speed="fast").checked(), "", "fp32", "cpu")
    assert fast["speed"] == "fast" and fast["fast_interval"] == 2
    assert settings_fingerprint(EditSettings(speed="fast", fast_interval=4).checked(), "", "fp32", "cpu") != fast
