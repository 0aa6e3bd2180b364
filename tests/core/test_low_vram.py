"""Low-VRAM mode (pipeline_core/editing/vram.py): the picture of a normal edit, with one model part on the device
at a time, the UNet one batch row at a time and the VAE in tiles; ``auto`` picks it only when the device reports
too little free memory.

No GPU here: the mode runs on the CPU as it would on a GPU (rows apart, tiles, the offload calls), which is what
the picture depends on; where modules go is asserted through the residency, the interface a memory manager
implements (ComfyUI's, or the default one that moves them to the CPU).
"""

import pytest
import torch

from ip2p_nodes.pipeline_core import ModelCache, ModelSource, PlanItem, SeedPlan, edit, encode_instruction
from ip2p_nodes.pipeline_core.editing import vram
from ip2p_nodes.pipeline_core.editing.control import add_control, make_control
from ip2p_nodes.pipeline_core.errors import InputError
from ip2p_nodes.pipeline_core.models.cache import Residency
from ip2p_nodes.pipeline_core.models.controlnet import load_controlnet
from support import tiny_controlnet


class ReportingResidency(Residency):
    """The default residency, with the free memory a small GPU would report and a log of what it was asked."""

    def __init__(self, free: int | None = None, forced: bool = False):
        self.free, self.forced, self.calls = free, forced, []

    def load(self, components, handle, names, memory_required=0):
        self.calls.append(("load", tuple(names)))
        super().load(components, handle, names, memory_required)

    def offload(self, components, handle, names):
        self.calls.append(("offload", tuple(names)))
        super().offload(components, handle, names)

    def free_memory(self, device):
        return self.free

    def low_vram_forced(self):
        return self.forced


def _model(folder, residency=None):
    cache = ModelCache(residency=residency)
    return cache.get(cache.key_for(ModelSource("diffusers", str(folder)), "fp32", "cpu"))


def _unet_rows(model):
    """Batch rows of every UNet call, recorded while the returned list is alive."""
    rows = []
    handle = model.components.unet.register_forward_pre_hook(lambda m, args, kwargs: rows.append(len(args[0])),
                                                             with_kwargs=True)
    return rows, handle


PLAN = [PlanItem(seed=3, text_guidance=7.5, image_guidance=1.5), PlanItem(seed=4, text_guidance=5.0,
                                                                          image_guidance=1.2)]


def test_low_vram_gives_the_normal_picture_running_the_unet_one_row_at_a_time(tiny_folder):
    model = _model(tiny_folder)
    cond = encode_instruction(model, "make it winter")
    img = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(1))
    pictures = {}
    for mode in ("normal", "low"):
        rows, hook = _unet_rows(model)
        pictures[mode] = edit(model, cond, img, PLAN, steps=3, vram=mode)
        hook.remove()
        # Two items x three guidance passes: one call of 6 rows per step, or 6 calls of 1.
        assert set(rows) == ({6} if mode == "normal" else {1})
    assert (pictures["low"].images - pictures["normal"].images).abs().max() < 1e-3
    assert (pictures["low"].latents - pictures["normal"].latents).abs().max() < 1e-3


def test_low_vram_keeps_fast_mode_and_controlnets_working(tiny_folder):
    model = _model(tiny_folder)
    controlnet = tiny_controlnet.make_controlnet(tiny_controlnet.unet_config_of(tiny_folder))
    path = tiny_controlnet.write_diffusers_file(controlnet, tiny_folder.parent / "low_vram_cn.safetensors")
    hint = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(5))
    cond = add_control(encode_instruction(model, "make it winter"),
                       make_control(load_controlnet(path, model), hint, 0.8))
    img = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(1))
    # Each row keeps its own step cache in fast mode; the ControlNet's residuals follow their rows.
    normal, low = (edit(model, cond, img, PLAN, steps=4, speed="fast", vram=mode).images for mode in ("normal", "low"))
    assert (low - normal).abs().max() < 1e-3


def test_low_vram_decodes_a_frame_larger_than_the_vae_tile_in_tiles(tiny_folder):
    model = _model(tiny_folder)
    cond = encode_instruction(model, "make it winter")
    vae = model.components.vae
    tile = vae.tile_latent_min_size
    sides = []
    hook = vae.decoder.register_forward_pre_hook(lambda m, args: sides.append(max(args[0].shape[-2:])))
    img = torch.rand(1, 8 * (tile + 4), 8 * (tile + 4), 3, generator=torch.Generator().manual_seed(1))
    edit(model, cond, img, SeedPlan.single(3), steps=1, vram="normal", working_resolution=img.shape[1])
    whole = max(sides)
    sides.clear()
    edit(model, cond, img, SeedPlan.single(3), steps=1, vram="low", working_resolution=img.shape[1])
    hook.remove()
    assert whole > tile and max(sides) <= tile
    assert not vae.use_tiling  # the mode's tiling ends with its edit


def test_low_vram_has_one_part_on_the_device_at_a_time(tiny_folder):
    residency = ReportingResidency()
    model = _model(tiny_folder, residency)
    cond = encode_instruction(model, "make it winter")
    residency.calls.clear()
    edit(model, cond, torch.rand(1, 32, 32, 3), SeedPlan.single(3), steps=2, vram="low")
    # A module asked for twice in a row is loaded once (the VAE's encode asks again).
    calls = [c for i, c in enumerate(residency.calls) if i == 0 or c != residency.calls[i - 1]]
    assert calls == [("offload", ("text_encoder", "unet")), ("load", ("vae",)), ("offload", ("vae",)),
                     ("load", ("unet",)), ("offload", ("unet",)), ("load", ("vae",))]
    residency.calls.clear()
    edit(model, cond, torch.rand(1, 32, 32, 3), SeedPlan.single(3), steps=2, vram="normal")
    assert not [c for c in residency.calls if c[0] == "offload"]


def test_auto_picks_low_vram_only_on_an_accelerator_short_of_memory(tiny_folder, monkeypatch):
    residency = ReportingResidency(free=1)
    model = _model(tiny_folder, residency)
    # On a CPU never: RAM is --memory's concern, whatever a residency reports.
    assert not vram.use_low_vram(model, "auto", 64, 3)
    # The same model as a GPU user's, its weights not on the device yet: they and a UNet call's activations
    # must fit in what is free.
    monkeypatch.setattr(model.components, "device", torch.device("cuda", 0))
    c = model.components
    weights = sum(p.numel() * p.element_size() for m in (c.unet, c.vae) for p in m.parameters())
    needed = weights + vram.unet_activation_bytes(model, 64, 3)
    assert vram.bytes_to_bring(model, ("unet", "vae")) == weights
    residency.free = needed - 1
    assert vram.use_low_vram(model, "auto", 64, 3)
    residency.free = needed
    assert not vram.use_low_vram(model, "auto", 64, 3)
    residency.free = None  # a device that reports nothing: normal
    assert not vram.use_low_vram(model, "auto", 64, 3)
    residency.forced = True  # a manager in low-VRAM mode (ComfyUI --lowvram)
    assert vram.use_low_vram(model, "auto", 64, 3)
    assert not vram.use_low_vram(model, "normal", 64, 3) and vram.use_low_vram(model, "low", 64, 3)


def test_a_bad_vram_mode_is_refused_before_any_model_work(fp32_model):
    cond = encode_instruction(fp32_model, "make it winter")
    with pytest.raises(InputError, match="vram must be one of auto, normal, low"):
        edit(fp32_model, cond, torch.rand(1, 32, 32, 3), SeedPlan.single(3), steps=2, vram="tiny")
