"""LoRA files on an IP2P model: the same picture as diffusers' pipeline after ``load_lora_weights``, any strength
without reloading the base, kohya/A1111 files like diffusers ones, and clear errors for files that do not fit."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from safetensors.torch import load_file, save_file

from ip2p_nodes.pipeline_core import InputError, ModelCache, ModelSource, SeedPlan, edit, encode_instruction
from ip2p_nodes.pipeline_core.models.lora import LoraRef, parse_lora_arg
from support import lora_files, tiny_sdxl

log = logging.getLogger(__name__)

STEPS, SEED, TEXT = 3, 1234, "turn it blue"


def _image(h=48, w=40, seed=3):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd15_lora(tiny_folder, tmp_path_factory):
    return lora_files.write_diffusers_lora(tiny_folder, tmp_path_factory.mktemp("lora-a"), rank=4, alpha=8.0, seed=0)


@pytest.fixture(scope="module")
def sd15_lora_b(tiny_folder, tmp_path_factory):
    return lora_files.write_diffusers_lora(tiny_folder, tmp_path_factory.mktemp("lora-b"), rank=2, alpha=1.0, seed=7)


@pytest.fixture(scope="module")
def sdxl_lora(sdxl_folder, tmp_path_factory):
    return lora_files.write_diffusers_lora(sdxl_folder, tmp_path_factory.mktemp("lora-xl"), rank=4, alpha=8.0,
                                           seed=3, sdxl=True)


def _key(cache: ModelCache, folder, precision="fp32"):
    return cache.key_for(ModelSource("diffusers", str(folder)), precision, "cpu")


def _ours(model, img=None, s_t=7.5, s_i=1.5):
    img = _image() if img is None else img
    return edit(model, encode_instruction(model, TEXT), img, SeedPlan.single(SEED), steps=STEPS, text_guidance=s_t,
                image_guidance=s_i).images


def _sd15_reference(folder, img, adapters: list[tuple[str, float]]):
    """diffusers' IP2P pipeline with ``load_lora_weights`` of each file at its scale (``set_adapters``)."""
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    for i, (path, _) in enumerate(adapters):
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
    if adapters:
        pipe.set_adapters([f"a{i}" for i in range(len(adapters))], [s for _, s in adapters])
    return pipe(TEXT, image=img.permute(0, 3, 1, 2), num_inference_steps=STEPS, guidance_scale=7.5,
                image_guidance_scale=1.5, generator=torch.Generator().manual_seed(SEED),
                output_type="pt").images.permute(0, 2, 3, 1)


def test_lora_equals_diffusers_load_lora_weights(tiny_folder, sd15_lora):
    cache = ModelCache()
    key = _key(cache, tiny_folder)
    img = _image()
    base = _ours(cache.get(key), img)
    ours = _ours(cache.get(key.with_lora(LoraRef.of(sd15_lora.path, 0.7))), img)
    ref = _sd15_reference(tiny_folder, img, [(sd15_lora.path, 0.7)])
    diff = (ours - ref).abs().max().item()
    effect = (ours - base).abs().max().item()
    print(f"\n[lora parity] SD1.5 strength 0.7: max |ours - diffusers| = {diff:.3g}; LoRA changes up to {effect:.3g}")
    assert effect > 0.05, "the LoRA must visibly change the picture, or this test proves nothing"
    assert diff < 1e-4


def test_two_loras_equal_diffusers_set_adapters(tiny_folder, sd15_lora, sd15_lora_b):
    cache = ModelCache()
    key = _key(cache, tiny_folder)
    key = key.with_lora(LoraRef.of(sd15_lora.path, 0.5)).with_lora(LoraRef.of(sd15_lora_b.path, -1.2))
    img = _image()
    ours = _ours(cache.get(key), img)
    ref = _sd15_reference(tiny_folder, img, [(sd15_lora.path, 0.5), (sd15_lora_b.path, -1.2)])
    diff = (ours - ref).abs().max().item()
    print(f"\n[lora parity] two LoRAs (0.5, -1.2): max |ours - diffusers| = {diff:.3g}")
    assert diff < 1e-4


def test_sdxl_lora_equals_diffusers(sdxl_folder, sdxl_lora):
    cache = ModelCache()
    key = _key(cache, sdxl_folder)
    img = _image(48, 64)
    ours = _ours(cache.get(key.with_lora(LoraRef.of(sdxl_lora.path, 0.7))), img, s_t=3.0)
    base = _ours(cache.get(key), img, s_t=3.0)
    # The reference runs on its own copy of the weights: diffusers injects its adapters into the modules it gets.
    c = ModelCache().get(key).components
    pipe = tiny_sdxl.make_pipeline(tiny_sdxl.TinySDXL(c.unet, c.vae, c.text_encoder, c.text_encoder_2, c.tokenizer,
                                                      c.tokenizer_2))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(sdxl_lora.path), adapter_name="a")
    pipe.set_adapters(["a"], [0.7])
    ref = pipe(TEXT, image=img.permute(0, 3, 1, 2), height=48, width=64, num_inference_steps=STEPS, guidance_scale=3.0,
               image_guidance_scale=1.5, generator=torch.Generator().manual_seed(SEED),
               output_type="pt").images.permute(0, 2, 3, 1)
    diff = (ours - ref).abs().max().item()
    effect = (ours - base).abs().max().item()
    print(f"\n[lora parity] SDXL strength 0.7: max |ours - diffusers| = {diff:.3g}; LoRA changes up to {effect:.3g}")
    assert effect > 0.05
    assert diff < 1e-4


@pytest.mark.parametrize("sdxl,sgm", [(False, False), (True, False), (True, True)],
                         ids=["sd15", "sdxl-diffusers-names", "sdxl-sgm-names"])
def test_kohya_file_gives_the_diffusers_files_picture(tiny_folder, sdxl_folder, sd15_lora, sdxl_lora, tmp_path, sdxl,
                                                      sgm):
    folder, lora = (sdxl_folder, sdxl_lora) if sdxl else (tiny_folder, sd15_lora)
    cache = ModelCache()
    key = _key(cache, folder)
    unet_config = dict(cache.get(key).components.unet.config) if sgm else None
    kohya = lora_files.write_kohya_lora(lora, tmp_path / "kohya.safetensors", sdxl=sdxl, sgm_unet_config=unet_config)
    keys = list(load_file(str(kohya)))
    assert any(k.startswith("lora_unet_input_blocks_" if sgm else "lora_unet_down_blocks_") for k in keys)
    assert any(k.startswith("lora_te2_" if sdxl else "lora_te_text_model_") for k in keys)
    img = _image(48, 64)
    a = _ours(cache.get(key.with_lora(LoraRef.of(lora.path, 0.8))), img, s_t=3.0)
    b = _ours(cache.get(key.with_lora(LoraRef.of(kohya, 0.8))), img, s_t=3.0)
    diff = (a - b).abs().max().item()
    print(f"\n[lora] kohya vs diffusers format ({'SDXL' if sdxl else 'SD1.5'}): max diff {diff:.3g}")
    assert diff < 1e-5


def test_strength_zero_and_switching_back_are_the_base_bit_for_bit(tiny_folder, sd15_lora):
    cache = ModelCache()
    key = _key(cache, tiny_folder)
    base = _ours(cache.get(key))
    zero = _ours(cache.get(key.with_lora(LoraRef.of(sd15_lora.path, 0.0))))
    assert torch.equal(zero, base)
    with_lora = _ours(cache.get(key.with_lora(LoraRef.of(sd15_lora.path, 1.0))))
    assert not torch.equal(with_lora, base)
    assert torch.equal(_ours(cache.get(key)), base), "the base model after a LoRA run must be the base again"


def test_new_strength_reads_neither_the_base_nor_the_lora_again(tiny_folder, sd15_lora, monkeypatch):
    from ip2p_nodes.pipeline_core.models import lora as lora_module

    reads = []
    real_read = lora_module.read_state_dict
    monkeypatch.setattr(lora_module, "read_state_dict", lambda path: reads.append(path) or real_read(path))
    cache = ModelCache()
    key = _key(cache, tiny_folder)
    outs = {s: _ours(cache.get(key.with_lora(LoraRef.of(sd15_lora.path, s)))) for s in (0.4, 1.0, 0.4, -0.5)}
    assert cache.loads == 1 and len(reads) == 1
    assert len(cache) == 1, "stacks are views of one base model, not more models in the cache"
    first = _ours(cache.get(key.with_lora(LoraRef.of(sd15_lora.path, 0.4))))
    assert torch.equal(first, outs[0.4])
    assert not torch.equal(outs[1.0], outs[0.4])


def test_text_encoder_lora_changes_the_embedding_and_is_memoised_per_stack(tiny_folder, sd15_lora):
    cache = ModelCache()
    key = _key(cache, tiny_folder)
    base, lora = cache.get(key), cache.get(key.with_lora(LoraRef.of(sd15_lora.path, 1.0)))
    e_lora = lora.encode(TEXT).embeds
    e_base = base.encode(TEXT).embeds
    assert not torch.allclose(e_lora, e_base)
    assert torch.equal(lora.encode(TEXT).embeds, e_lora) and lora.encode_calls == 1
    assert torch.equal(cache.get(key).encode(TEXT).embeds, e_base)


def test_lora_runs_in_bf16(tiny_folder, sd15_lora):
    cache = ModelCache()
    img = _image()
    fp32 = _ours(cache.get(_key(cache, tiny_folder).with_lora(LoraRef.of(sd15_lora.path, 1.0))), img)
    bf16_model = cache.get(_key(cache, tiny_folder, "bf16").with_lora(LoraRef.of(sd15_lora.path, 1.0)))
    for module in (bf16_model.components.unet, bf16_model.components.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, "adapters take the model's precision"
    bf16 = _ours(bf16_model, img)
    assert (bf16 - fp32).abs().mean().item() < 0.05


# ------------------------------------------------------------------------------------------------ bad files


def test_lora_for_another_family_is_refused_naming_what_matched(sdxl_folder, sd15_lora):
    cache = ModelCache()
    key = _key(cache, sdxl_folder)
    img = _image(48, 64)
    before = _ours(cache.get(key), img, s_t=3.0)
    with pytest.raises(InputError, match=r"pytorch_lora_weights\.safetensors: \d+ of its \d+ LoRA layers fit this "
                                         r"SDXL"):
        cache.get(key.with_lora(LoraRef.of(sd15_lora.path, 1.0)))
    assert torch.equal(_ours(cache.get(key), img, s_t=3.0), before), "a refused file leaves the model untouched"


@pytest.mark.parametrize("content, message", [
    ({"foo.weight": torch.zeros(2, 2)}, "not a LoRA in a format this pack reads"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, "a full model checkpoint, not a LoRA"),
    ({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, "LyCORIS"),
    ({"lora_unet_nonexistent_layer.lora_down.weight": torch.zeros(2, 8),
      "lora_unet_nonexistent_layer.lora_up.weight": torch.zeros(8, 2)}, "0 of its 1 LoRA layers fit"),
])
def test_unusable_files_get_a_clear_error(tiny_folder, tmp_path, content, message):
    path = save_file(content, str(tmp_path / "odd.safetensors")) or tmp_path / "odd.safetensors"
    cache = ModelCache()
    with pytest.raises(InputError, match="odd.safetensors") as info:
        cache.get(_key(cache, tiny_folder).with_lora(LoraRef.of(path, 1.0)))
    assert message in str(info.value)
    log.info("error: %s", info.value)


def test_broken_and_missing_files_and_bad_strengths(tiny_folder, tmp_path, sd15_lora):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    cache = ModelCache()
    with pytest.raises(InputError, match="broken.safetensors: cannot be read as a LoRA file"):
        cache.get(_key(cache, tiny_folder).with_lora(LoraRef.of(broken)))
    with pytest.raises(InputError, match="LoRA file not found"):
        LoraRef.of(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="outside -4..4"):
        LoraRef.of(sd15_lora.path, 5.0)
    with pytest.raises(InputError, match="not a LoRA weights file"):
        LoraRef.of(tiny_folder / "model_index.json")
    assert _ours(cache.get(_key(cache, tiny_folder))).shape == (1, 48, 40, 3), "the model still edits"


def test_rewritten_file_is_read_again(tiny_folder, sd15_lora, sd15_lora_b, tmp_path):
    path = tmp_path / "mine.safetensors"
    path.write_bytes(sd15_lora.path.read_bytes())
    cache = ModelCache()
    key = _key(cache, tiny_folder)
    first = _ours(cache.get(key.with_lora(LoraRef.of(path))))
    path.write_bytes(sd15_lora_b.path.read_bytes())
    second = _ours(cache.get(key.with_lora(LoraRef.of(path))))
    assert not torch.equal(first, second)
    assert torch.equal(second, _ours(cache.get(key.with_lora(LoraRef.of(sd15_lora_b.path)))))


@pytest.mark.parametrize("text, expected", [
    ("a.safetensors", ("a.safetensors", 1.0)),
    ("a.safetensors:0.5", ("a.safetensors", 0.5)),
    ("dir/a.safetensors:-1", ("dir/a.safetensors", -1.0)),
    ("C:\\loras\\a.safetensors", ("C:\\loras\\a.safetensors", 1.0)),
    ("C:\\loras\\a.safetensors:2", ("C:\\loras\\a.safetensors", 2.0)),
])
def test_cli_lora_argument(text, expected):
    assert parse_lora_arg(text) == expected
