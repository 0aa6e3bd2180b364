"""Any size in, the same size out: the working-resolution policy, detail restoration, VAE tiling, size limits."""

import math

import pytest
import torch

from ip2p_nodes.pipeline_core import SeedPlan, edit, encode_instruction
from ip2p_nodes.pipeline_core.editing import resolution
from ip2p_nodes.pipeline_core.editing.resolution import working_size
from ip2p_nodes.pipeline_core.errors import InputError


def _img(h, w, b=1, seed=5):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "h,w,family,res",
    [
        (2048, 2048, "sd15", None),
        (3000, 4000, "sd15", None),
        (512, 3584, "sd15", None),  # 7:1 panorama
        (1500, 200, "sd15", 64),
        (1080, 1920, "sdxl", None),
        (999, 1001, "sd15", 300),
    ],
)
def test_working_size_is_a_multiple_of_8_near_the_family_area_with_the_aspect_kept(h, w, family, res):
    size = working_size(h, w, family, res)
    target = res or {"sd15": 512, "sdxl": 1024}[family]
    fh, fw = size.frame
    assert fh % 8 == 0 and fw % 8 == 0
    assert fh - size.content_height < 8 and fw - size.content_width < 8
    # aspect kept to the rounding of one pixel per side
    ch, cw = size.content
    assert abs(cw / ch - w / h) <= (w / h) * (1 / ch + 1 / cw) + 1e-9
    assert 0.95 < math.sqrt(ch * cw) / target < 1.05


def test_small_pictures_are_edited_at_their_own_size_unless_upscaling_is_asked():
    size = working_size(300, 200, "sd15")
    assert size.content == (300, 200) and not size.resized
    assert size.frame == (304, 200)  # padded to the VAE factor, not resized
    up = working_size(300, 200, "sd15", upscale=True)
    assert up.content_height > 300 and abs(math.sqrt(up.content_height * up.content_width) - 512) < 2


def test_sdxl_models_work_at_four_times_the_sd15_area():
    sd15, sdxl = working_size(3000, 3000, "sd15"), working_size(3000, 3000, "sdxl")
    assert sd15.content == (512, 512) and sdxl.content == (1024, 1024)


def test_max_side_caps_the_longer_working_side():
    size = working_size(512, 3584, "sd15", max_side=768)
    assert size.content_width == 768 and size.content_height == round(512 * 768 / 3584)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"resolution": 10000}, "working resolution 10000 is outside 64..4096"), ({"max_side": 20}, "max side 20")],
)
def test_impossible_working_sizes_are_refused_with_the_value_and_the_limit(kwargs, match):
    with pytest.raises(InputError, match=match):
        working_size(1000, 1000, "sd15", **kwargs)


def test_a_picture_above_the_input_limit_is_refused_before_any_work(fp32_model):
    cond = encode_instruction(fp32_model, "add snow")
    huge = torch.zeros(1, 1, 1, 3).expand(1, 12000, 12000, 3)  # no memory behind it
    with pytest.raises(InputError, match=r"12000x12000 \(144 MP\); the limit is 134 MP"):
        edit(fp32_model, cond, huge, SeedPlan.single(1), steps=1)


@pytest.mark.parametrize(
    "h,w,res",
    [
        (1, 1, None),
        (9, 13, None),
        (37, 53, None),
        (64, 448, None),  # 7:1 panorama at native size
        (200, 1500, 64),  # large panorama at a low working resolution
        (1500, 200, 64),
        (333, 121, 96),
    ],
)
def test_output_has_exactly_the_input_size_for_any_shape(family_model, h, w, res):
    cond = encode_instruction(family_model, "add snow")
    out = edit(family_model, cond, _img(h, w), SeedPlan.single(1), steps=2, working_resolution=res)
    assert out.images.shape == (1, h, w, 3)
    assert out.images.min() >= 0 and out.images.max() <= 1
    size = working_size(h, w, family_model.components.working_resolution, res)
    assert out.latents.shape == (1, 4, *size.latent)  # the LATENT is the working-resolution latent


def test_resized_edit_latent_decodes_to_the_working_resolution_picture(fp32_model):
    cond = encode_instruction(fp32_model, "add snow")
    out = edit(fp32_model, cond, _img(300, 200), SeedPlan.single(3), steps=2, working_resolution=96)
    size = working_size(300, 200, "sd15", 96)
    with torch.no_grad():
        decoded = fp32_model.components.vae.decode(out.latents).sample
    low = ((decoded + 1) / 2).clamp(0, 1)[..., : size.content_height, : size.content_width]
    # resized back without detail restoration, it is the IMAGE output
    plain = edit(fp32_model, cond, _img(300, 200), SeedPlan.single(3), steps=2, working_resolution=96,
                 restore_detail=False)
    assert (resolution.resize(low, (300, 200)).permute(0, 2, 3, 1) - plain.images).abs().max() < 1e-4


def _textured(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 16, w // 16, generator=g)
    coarse = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic")
    fine = 0.5 + 0.5 * torch.sin(torch.arange(w).float() * 2.2)[None, None, None, :] * torch.ones(1, 3, h, 1)
    return (0.6 * coarse + 0.4 * fine).clamp(0, 1)


def _psnr(a, b):
    return 10 * math.log10(1 / ((a - b) ** 2).mean().item())


def test_detail_restoration_brings_back_fine_texture_only_where_the_edit_left_the_picture_alone():
    original = _textured(256, 256, 0)
    low_input = resolution.resize(original, (64, 64))
    low_edit = low_input.clone()
    low_edit[:, :, :, 32:] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # right half painted red
    plain = resolution.resize(low_edit, (256, 256))
    restored = resolution.restore_detail(original, low_input, low_edit)
    left, right = (..., slice(0, 112)), (..., slice(144, None))
    # the unedited half comes back nearly exactly; plain resizing has lost its 3 px stripes
    assert _psnr(plain[left], original[left]) < 25
    assert _psnr(restored[left], original[left]) > 60
    # the edited half is as plain resizing has it: none of the old picture's detail is put back there
    assert torch.equal(restored[right], plain[right])


def test_large_frames_go_through_the_vae_in_tiles(fp32_model, monkeypatch):
    vae = fp32_model.components.vae
    seen = []
    hook = vae.decoder.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    cond = encode_instruction(fp32_model, "add snow")
    try:
        monkeypatch.setattr(resolution, "VAE_TILE_AREA", 96 * 96)
        out = edit(fp32_model, cond, _img(160, 200), SeedPlan.single(1), steps=1)
    finally:
        hook.remove()
    assert out.images.shape == (1, 160, 200, 3)
    # the tiny VAE's tile is 64 px = 8 latents; whole-frame decoding would show one 20 x 25 call
    assert seen and all(h <= 8 and w <= 8 for h, w in seen)
    assert vae.use_tiling is False  # the shared model is left as it was


@pytest.mark.parametrize("stage", ["encode", "decode"])
def test_a_vae_pass_out_of_device_memory_is_retried_in_tiles(fp32_model, monkeypatch, caplog, stage):
    """A GPU with little free memory fails a whole-frame VAE pass that tiles fit (as ComfyUI's VAE nodes do, the
    pass is retried tiled). No GPU here: the first untiled call raises the error CUDA would."""
    from ip2p_nodes.pipeline_core.editing.vae import decode_latents, encode_images

    vae = fp32_model.components.vae
    part = getattr(vae, stage)
    failures = []

    def first_untiled_call_fails(*args, **kwargs):
        if not vae.use_tiling and not failures:
            failures.append(stage)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return part(*args, **kwargs)

    img = _img(160, 200)
    latents = torch.randn(1, 4, 20, 25, generator=torch.Generator().manual_seed(2))

    def run():
        if stage == "encode":
            return encode_images(fp32_model, img)[0]
        return decode_latents(fp32_model, latents, (160, 200))

    monkeypatch.setattr(resolution, "VAE_TILE_AREA", 96 * 96)
    in_tiles = run()  # the expected result: the same pass in tiles
    monkeypatch.setattr(resolution, "VAE_TILE_AREA", 1 << 30)  # never tiled by size from here
    whole = run()
    monkeypatch.setattr(vae, stage, first_untiled_call_fails)
    with caplog.at_level("WARNING"):
        retried = run()
    assert failures == [stage]
    assert f"out of device memory in the VAE {stage}" in caplog.text
    assert torch.equal(retried, in_tiles) and not torch.equal(retried, whole)
    assert vae.use_tiling is False  # the shared model is left as it was
    # A whole edit gets through too, with the one failed pass retried.
    failures.clear()
    cond = encode_instruction(fp32_model, "add snow")
    assert edit(fp32_model, cond, img, SeedPlan.single(1), steps=1).images.shape == (1, 160, 200, 3)
    assert failures == [stage]


def test_a_vae_pass_already_in_tiles_that_runs_out_of_memory_fails_with_that_error(fp32_model, monkeypatch):
    vae = fp32_model.components.vae
    monkeypatch.setattr(resolution, "VAE_TILE_AREA", 96 * 96)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(vae, "decode", out_of_memory)
    cond = encode_instruction(fp32_model, "add snow")
    with pytest.raises(torch.OutOfMemoryError):
        edit(fp32_model, cond, _img(160, 200), SeedPlan.single(1), steps=1)
    monkeypatch.undo()
    assert vae.use_tiling is False
    assert edit(fp32_model, cond, _img(40, 40), SeedPlan.single(1), steps=1).images.shape == (1, 40, 40, 3)
