"""ControlNet steering the edit: the same picture as a denoising loop written from diffusers' modules, nothing at
all when it is off, the same ControlNet in every file layout, clear refusals, and masks, denoise, crop-to-mask,
batches and SDXL working with it."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file

from ip2p_nodes.pipeline_core import SeedPlan, edit, encode_instruction, make_plan
from ip2p_nodes.pipeline_core.editing.control import add_control, make_control
from ip2p_nodes.pipeline_core.errors import InputError
from ip2p_nodes.pipeline_core.models.controlnet import ControlNetCache, load_controlnet
from ip2p_nodes.pipeline_core.models.schedulers import make_scheduler
from support import tiny_controlnet

log = logging.getLogger(__name__)

SCHEDULER = "euler_ancestral"  # draws noise every step: a wrong pass order or generator shows at once


def _img(h=64, w=48, b=1, seed=3):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _hint(h=64, w=48, b=1, seed=11):
    # A hint with structure at the latent's scale (blocks of 8 px, black or white), as an edge or depth map has:
    # per-pixel noise would average out in the hint encoder's downsampling, and two hints would look alike.
    g = torch.Generator().manual_seed(seed)
    blocks = (torch.rand(b, 1, -(-h // 8), -(-w // 8), generator=g) > 0.7).float()
    hint = torch.nn.functional.interpolate(blocks, scale_factor=8, mode="nearest")[:, :, :h, :w]
    return hint.permute(0, 2, 3, 1).expand(b, h, w, 3).contiguous()


@pytest.fixture(scope="module")
def controlnet_module(tiny_folder):
    return tiny_controlnet.make_controlnet(tiny_controlnet.unet_config_of(tiny_folder))


@pytest.fixture(scope="module")
def controlnet_files(tmp_path_factory, controlnet_module):
    """The same ControlNet as users have it: diffusers keys, the original layout, lllyasviel's .pth, a folder."""
    root = tmp_path_factory.mktemp("controlnets")
    folder = root / "tiny-controlnet"
    controlnet_module.save_pretrained(str(folder))
    return {
        "diffusers": tiny_controlnet.write_diffusers_file(controlnet_module, root / "tiny_cn_diffusers.safetensors"),
        "original": tiny_controlnet.write_original_file(controlnet_module, root / "control_tiny_fp16.safetensors"),
        "pth": tiny_controlnet.write_original_file(controlnet_module, root / "control_tiny.pth",
                                                    prefix="control_model."),
        "folder": folder,
    }


@pytest.fixture
def cond(fp32_model):
    return encode_instruction(fp32_model, "turn it blue")


def _controlled(model, cond, path, hint, strength=1.0, start=0.0, end=1.0):
    return add_control(cond, make_control(load_controlnet(path, model), hint, strength, start, end))


# ----------------------------------------------------------------------------------------------------------
# The reference: diffusers' modules in a loop written out here


def _encode(pipe, text: str) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


@torch.inference_mode()
def reference_edit(pipe, controlnet, img, hint, seed, steps, s_t, s_i, strength=1.0, start=0.0, end=1.0):
    """InstructPix2Pix with a ControlNet, from diffusers' modules: the ControlNet runs on the 4-channel latents of
    each of the three passes with that pass's text, its residuals times ``strength`` go into the UNet, steps
    ``i`` with ``start <= i/steps < end`` only, and the paper's formula combines e_T, e_I, e_U
    (shared/REFERENCE.md §2)."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    text, neg = _encode(pipe, "turn it blue"), _encode(pipe, "")
    embeds = torch.cat([text, neg, neg])
    picture = img.permute(0, 3, 1, 2) * 2.0 - 1.0
    image_latents = pipe.vae.encode(picture).latent_dist.mode()
    image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
    generator = torch.Generator().manual_seed(seed)
    latents = randn_tensor((1, 4, *image_latents.shape[-2:]), generator=generator) * scheduler.init_noise_sigma
    control_cond = None if hint is None else torch.cat([hint.permute(0, 3, 1, 2)] * 3)
    for i, t in enumerate(scheduler.timesteps):
        scaled = scheduler.scale_model_input(torch.cat([latents] * 3), t)
        residuals = {}
        if controlnet is not None and start <= i / steps < end:
            down, mid = controlnet(scaled, t, encoder_hidden_states=embeds, controlnet_cond=control_cond,
                                   conditioning_scale=strength, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        out = pipe.unet(torch.cat([scaled, image_latents], dim=1), t, encoder_hidden_states=embeds,
                        **residuals).sample
        e_t, e_i, e_u = out.chunk(3)
        noise = e_u + s_t * (e_t - e_i) + s_i * (e_i - e_u)
        latents = scheduler.step(noise, t, latents, generator=generator).prev_sample
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    p = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_folder, safety_checker=None)
    p.scheduler = make_scheduler(SCHEDULER, dict(p.scheduler.config))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("s_t,s_i", [(7.5, 1.5), (3.0, 1.0)])
def test_the_reference_loop_without_controlnet_is_diffusers_ip2p_pipeline(pipe, s_t, s_i):
    """So the reference below is the paper's sampler as diffusers runs it, with nothing of ours in it."""
    img = _img()
    ref = reference_edit(pipe, None, img, None, seed=5, steps=4, s_t=s_t, s_i=s_i)
    official = pipe("turn it blue", image=img.permute(0, 3, 1, 2), num_inference_steps=4, guidance_scale=s_t,
                    image_guidance_scale=s_i, generator=torch.Generator().manual_seed(5), output_type="pt").images
    diff = (ref.permute(0, 3, 1, 2) - official).abs().max().item()
    print(f"\n[controlnet] reference loop vs diffusers pipeline (s_T={s_t}, s_I={s_i}): {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.parametrize("s_t,s_i,strength,start,end", [
    (7.5, 1.5, 1.0, 0.0, 1.0),
    (3.0, 1.0, 0.7, 0.0, 1.0),  # s_I 1: we skip the uncond pass, the reference runs it
    (7.5, 1.5, 1.3, 0.25, 0.75),  # 4 steps: only steps 1 and 2 are steered
])
def test_edit_with_controlnet_equals_the_reference_loop(fp32_model, cond, pipe, controlnet_module,
                                                         controlnet_files, s_t, s_i, strength, start, end):
    img, hint = _img(), _hint()
    ours = edit(fp32_model, _controlled(fp32_model, cond, controlnet_files["diffusers"], hint, strength, start, end),
                img, SeedPlan.single(5), steps=4, text_guidance=s_t, image_guidance=s_i, scheduler=SCHEDULER)
    ref = reference_edit(pipe, controlnet_module, img, hint, 5, 4, s_t, s_i, strength, start, end)
    plain = reference_edit(pipe, None, img, None, 5, 4, s_t, s_i)
    diff = (ours.images - ref).abs().max().item()
    effect = (ref - plain).abs().max().item()
    print(f"\n[controlnet] ours vs reference (s_T={s_t}, s_I={s_i}, strength {strength}, {start}-{end}): "
          f"{diff:.3g}; the ControlNet changes the picture by up to {effect:.3g}")
    assert diff < 1e-4
    assert effect > 0.05, "the ControlNet must change the picture, or this test proves nothing"


# ----------------------------------------------------------------------------------------------------------
# Off means off


@pytest.mark.parametrize("strength,start,end", [(0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (1.0, 0.5, 0.5)])
def test_a_controlnet_that_steers_no_step_leaves_the_edit_bit_for_bit_unchanged(fp32_model, cond, controlnet_files,
                                                                                 strength, start, end):
    img = _img()
    plain = edit(fp32_model, cond, img, SeedPlan.single(2), steps=3)
    off = edit(fp32_model, _controlled(fp32_model, cond, controlnet_files["diffusers"], _hint(), strength, start, end),
               img, SeedPlan.single(2), steps=3)
    assert torch.equal(off.images, plain.images) and torch.equal(off.latents, plain.latents)


def test_the_hint_decides_the_picture(fp32_model, cond, controlnet_files):
    img = _img()
    a = edit(fp32_model, _controlled(fp32_model, cond, controlnet_files["diffusers"], _hint(seed=1)), img,
             SeedPlan.single(2), steps=3)
    b = edit(fp32_model, _controlled(fp32_model, cond, controlnet_files["diffusers"], _hint(seed=2)), img,
             SeedPlan.single(2), steps=3)
    assert (a.images - b.images).abs().max() > 0.05


def test_chained_controlnets_add_their_residuals(fp32_model, cond, controlnet_files):
    """Two halves of one ControlNet steer exactly as the whole (residuals summed, as diffusers' MultiControlNet)."""
    img, hint = _img(), _hint()
    loaded = load_controlnet(controlnet_files["diffusers"], fp32_model)
    half = make_control(loaded, hint, 0.5)
    chained = add_control(add_control(cond, half), half)
    assert len(chained.controls) == 2 and cond.controls == ()
    whole = edit(fp32_model, add_control(cond, make_control(loaded, hint, 1.0)), img, SeedPlan.single(2), steps=3)
    both = edit(fp32_model, chained, img, SeedPlan.single(2), steps=3)
    assert (both.images - whole.images).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------
# Files


def test_every_file_layout_of_one_controlnet_gives_the_same_edit(fp32_model, cond, controlnet_files):
    img, hint = _img(), _hint()
    results = {
        layout: edit(fp32_model, _controlled(fp32_model, cond, path, hint), img, SeedPlan.single(4), steps=2).images
        for layout, path in controlnet_files.items()
    }
    for layout, images in results.items():
        assert torch.equal(images, results["diffusers"]), f"the {layout} file gives another edit"
    assert load_controlnet(controlnet_files["pth"], fp32_model).layout == "original"


def test_a_checkpoint_that_is_not_a_controlnet_is_refused_by_name(fp32_model, tiny_single_file, tmp_path):
    with pytest.raises(InputError, match=f"{tiny_single_file.name}: a full Stable Diffusion checkpoint, not a"):
        load_controlnet(tiny_single_file, fp32_model)
    other = tmp_path / "upscaler.safetensors"
    save_file({"conv_first.weight": torch.zeros(4, 3, 3, 3)}, str(other))
    with pytest.raises(InputError, match="upscaler.safetensors: not a ControlNet"):
        load_controlnet(other, fp32_model)
    lora = tmp_path / "style_lora.safetensors"
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(4, 4)}, str(lora))
    with pytest.raises(InputError, match="style_lora.safetensors: a LoRA, not a ControlNet"):
        load_controlnet(lora, fp32_model)


def test_a_controlnet_for_another_base_model_is_refused_by_name(fp32_model, tiny_folder, tmp_path):
    config = tiny_controlnet.unet_config_of(tiny_folder)
    wide = tiny_controlnet.make_controlnet({**config, "cross_attention_dim": 64})
    path = tiny_controlnet.write_original_file(wide, tmp_path / "control_sd21_depth.safetensors")
    with pytest.raises(InputError, match="control_sd21_depth.safetensors: a ControlNet for another model "
                                         r"\(text width 64\)"):
        load_controlnet(path, fp32_model)
    narrow = tiny_controlnet.make_controlnet({**config, "block_out_channels": [64, 64]})
    path = tiny_controlnet.write_diffusers_file(narrow, tmp_path / "other_arch.safetensors")
    with pytest.raises(InputError, match="other_arch.safetensors: its UNet blocks are 64 channels wide"):
        load_controlnet(path, fp32_model)


def test_the_cache_reads_a_file_once_and_again_when_it_changes(fp32_model, controlnet_files):
    cache = ControlNetCache()
    path = controlnet_files["original"]
    first = cache.get(path, fp32_model)
    assert cache.get(path, fp32_model) is first and cache.loads == 1
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache.get(path, fp32_model) is not first and cache.loads == 2


def test_the_controlnet_runs_in_the_models_precision_and_device(cache, tiny_folder, controlnet_files):
    from ip2p_nodes.pipeline_core import ModelSource

    bf16 = cache.get(cache.key_for(ModelSource("diffusers", str(tiny_folder)), "bf16", "cpu"))
    loaded = load_controlnet(controlnet_files["diffusers"], bf16)
    assert loaded.module.dtype == torch.bfloat16 and loaded.module.device.type == "cpu"
    out = edit(bf16, add_control(encode_instruction(bf16, "turn it blue"), make_control(loaded, _hint())), _img(),
               SeedPlan.single(1), steps=1)
    assert torch.isfinite(out.images).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"strength": 2.5}, "ControlNet strength must be a number between 0 and 2"),
    ({"start": 0.8, "end": 0.2}, r"ControlNet start \(0.8\) is after its end \(0.2\)"),
    ({"end": 1.5}, "ControlNet end must be a number between 0 and 1"),
])
def test_bad_control_settings_get_a_clear_error(fp32_model, controlnet_files, kwargs, match):
    with pytest.raises(InputError, match=match):
        make_control(load_controlnet(controlnet_files["diffusers"], fp32_model), _hint(), **kwargs)


def test_a_hint_batch_that_fits_no_picture_batch_is_refused_before_sampling(fp32_model, cond, controlnet_files):
    controlled = _controlled(fp32_model, cond, controlnet_files["diffusers"], _hint(b=2))
    with pytest.raises(InputError, match="has 2 hint images for 3 pictures"):
        edit(fp32_model, controlled, _img(b=3), SeedPlan.single(1), steps=1)


# ----------------------------------------------------------------------------------------------------------
# With the sampler's other options


def test_masked_edit_with_controlnet_keeps_the_unmasked_pixels(fp32_model, cond, controlnet_files):
    img = _img()
    mask = torch.zeros(1, 64, 48)
    mask[:, 16:48, 8:40] = 1.0
    controlled = _controlled(fp32_model, cond, controlnet_files["diffusers"], _hint())
    out = edit(fp32_model, controlled, img, SeedPlan.single(3), steps=3, mask=mask)
    plain = edit(fp32_model, cond, img, SeedPlan.single(3), steps=3, mask=mask)
    keep = mask[0] == 0
    assert torch.equal(out.images[0][keep], img[0][keep])
    assert (out.images[0][~keep] - plain.images[0][~keep]).abs().max() > 0.05


def test_denoise_counts_start_and_end_on_the_whole_schedule(fp32_model, cond, controlnet_files):
    """At denoise 0.5 of 4 steps only steps 2 and 3 run: a ControlNet ending at 0.5 steers none of them."""
    img, hint = _img(), _hint()
    plain = edit(fp32_model, cond, img, SeedPlan.single(3), steps=4, denoise=0.5)
    early = edit(fp32_model, _controlled(fp32_model, cond, controlnet_files["diffusers"], hint, end=0.5), img,
                 SeedPlan.single(3), steps=4, denoise=0.5)
    late = edit(fp32_model, _controlled(fp32_model, cond, controlnet_files["diffusers"], hint, start=0.5), img,
                SeedPlan.single(3), steps=4, denoise=0.5)
    assert torch.equal(early.images, plain.images)
    assert (late.images - plain.images).abs().max() > 0.02


def test_crop_to_mask_shows_the_controlnet_the_hint_of_the_box(fp32_model, cond, controlnet_files):
    """The hint is cut with the picture: what it holds outside the edited box changes nothing."""
    img = _img(96, 128)
    mask = torch.zeros(1, 96, 128)
    mask[:, 40:56, 60:76] = 1.0
    hint = _hint(96, 128)
    other_outside = _hint(96, 128, seed=99)
    box = (32, 52, 64, 84)  # the padded box at crop_padding 8 (test_masked_edit checks the box rule)
    other_outside[:, box[0]:box[2], box[1]:box[3]] = hint[:, box[0]:box[2], box[1]:box[3]]
    other_inside = hint.clone()
    other_inside[:, box[0]:box[2], box[1]:box[3]] = 1.0 - hint[:, box[0]:box[2], box[1]:box[3]]

    def run(h):
        return edit(fp32_model, _controlled(fp32_model, cond, controlnet_files["diffusers"], h), img,
                    SeedPlan.single(4), steps=2, mask=mask, crop_to_mask=True, crop_padding=8,
                    working_resolution=64).images

    a, b, c = run(hint), run(other_outside), run(other_inside)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.02
    outside = torch.ones(96, 128, dtype=torch.bool)
    outside[box[0]:box[2], box[1]:box[3]] = False
    assert torch.equal(a[0][outside], img[0][outside])


def test_a_two_seed_batch_gives_each_seed_its_own_controlled_edit(fp32_model, cond, controlnet_files):
    img = _img()
    controlled = _controlled(fp32_model, cond, controlnet_files["diffusers"], _hint())
    batch = edit(fp32_model, controlled, img, make_plan(20, 2, "increment"), steps=2, max_batch=2)
    for k, seed in enumerate((20, 21)):
        alone = edit(fp32_model, controlled, img, SeedPlan.single(seed), steps=2)
        assert (batch.images[k] - alone.images[0]).abs().max() < 1e-4
    assert (batch.images[0] - batch.images[1]).abs().max() > 1e-2


def test_one_hint_per_picture_steers_each_picture_with_its_own(fp32_model, cond, controlnet_files):
    imgs, hints = _img(b=2), torch.cat([_hint(seed=1), _hint(seed=2)])
    both = edit(fp32_model, _controlled(fp32_model, cond, controlnet_files["diffusers"], hints), imgs,
                SeedPlan.single(6), steps=2)
    for b in range(2):
        alone = edit(fp32_model, _controlled(fp32_model, cond, controlnet_files["diffusers"], hints[b:b + 1]),
                     imgs[b:b + 1], SeedPlan.single(6), steps=2)
        assert (both.images[b] - alone.images[0]).abs().max() < 1e-4


def test_a_hint_of_another_size_is_stretched_to_the_picture(fp32_model, cond, controlnet_files):
    """A hint made at another resolution (e.g. a preprocessor's 512 px output) steers as the same hint at size."""
    from ip2p_nodes.pipeline_core.editing.resolution import resize_image

    img, small = _img(), _hint(32, 24)
    at_size = resize_image(small, (64, 48))
    a = edit(fp32_model, _controlled(fp32_model, cond, controlnet_files["diffusers"], small), img,
             SeedPlan.single(1), steps=2)
    b = edit(fp32_model, _controlled(fp32_model, cond, controlnet_files["diffusers"], at_size), img,
             SeedPlan.single(1), steps=2)
    assert torch.equal(a.images, b.images)


# ----------------------------------------------------------------------------------------------------------
# SDXL


def test_sdxl_controlnet_gets_the_pooled_text_and_size_ids(sdxl_model, sdxl_folder, tmp_path):
    """An SDXL ControlNet needs SDXL's added conditioning, as diffusers' SDXL ControlNet pipeline passes it."""
    cn = tiny_controlnet.make_controlnet(tiny_controlnet.unet_config_of(sdxl_folder))
    path = tiny_controlnet.write_diffusers_file(cn, tmp_path / "tiny_sdxl_cn.safetensors")
    cond = encode_instruction(sdxl_model, "turn it blue")
    img = _img()
    plain = edit(sdxl_model, cond, img, SeedPlan.single(1), steps=2)
    steered = edit(sdxl_model, _controlled(sdxl_model, cond, path, _hint()), img, SeedPlan.single(1), steps=2)
    off = edit(sdxl_model, _controlled(sdxl_model, cond, path, _hint(), strength=0.0), img, SeedPlan.single(1),
               steps=2)
    assert torch.equal(off.images, plain.images)
    assert (steered.images - plain.images).abs().max() > 0.02


def test_an_sd15_controlnet_on_an_sdxl_model_is_refused_by_name(sdxl_model, controlnet_files):
    with pytest.raises(InputError, match="control_tiny_fp16.safetensors: a ControlNet for"):
        load_controlnet(controlnet_files["original"], sdxl_model)
