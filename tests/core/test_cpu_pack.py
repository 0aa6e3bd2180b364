"""Prepacked convolution weights (bf16 on a CPU): the same numbers as the plain convolution, made only where
memory allows, remade when the weight changes, and gone with a released module."""

import pytest
import torch

from ip2p_nodes.pipeline_core import ModelCache, ModelSource, SeedPlan, edit, encode_instruction
from ip2p_nodes.pipeline_core.models import cpu_pack
from ip2p_nodes.pipeline_core.models.lora import LoraRef
from support import lora_files

pytestmark = pytest.mark.skipif(not cpu_pack.available(), reason="this torch build has no oneDNN ops")


def _packed(unet):
    return [m for m in unet.modules() if "forward" in m.__dict__]


def _load(folder, memory="keep", precision="bf16"):
    cache = ModelCache(memory=memory)
    return cache, cache.get(cache.key_for(ModelSource("diffusers", str(folder)), precision, "cpu"))


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_packed_convolution_gives_exactly_the_plain_one(channels_last):
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1, stride=2).to(torch.bfloat16)
    plain = torch.nn.Conv2d(32, 48, 3, padding=1, stride=2).to(torch.bfloat16)
    plain.load_state_dict(conv.state_dict())
    assert cpu_pack.pack_convolutions(conv) == 1 and cpu_pack.pack_convolutions(conv) == 0  # idempotent
    with torch.no_grad():  # as every edit runs
        for shape in ((3, 32, 8, 8), (5, 32, 13, 9)):  # packed again for each new input shape
            x = torch.randn(shape, generator=g).to(torch.bfloat16)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            assert torch.equal(conv(x), plain(x))
            # channels_last inputs (what a bf16 UNet runs on) take the packed weight; others run plain.
            assert ("_ip2p_packed" in conv.__dict__) is channels_last
        # A weight changed in place (or replaced) is packed again, not served stale.
        conv.weight.mul_(2)
        plain.weight.mul_(2)
        assert torch.equal(conv(x), plain(x))
        conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight))
        plain.weight = torch.nn.Parameter(conv.weight.detach().clone())
        assert torch.equal(conv(x), plain(x))
    # Training through a packed module still gets gradients (the packed op has no backward).
    conv(x).float().sum().backward()
    plain(x).float().sum().backward()
    assert conv.weight.grad is not None and torch.equal(conv.weight.grad, plain.weight.grad)
    cpu_pack.unpack_convolutions(conv)
    assert "forward" not in conv.__dict__ and "_ip2p_packed" not in conv.__dict__


def test_weights_made_in_inference_mode_run_packed_and_a_replaced_one_is_seen():
    # ComfyUI loads and runs every node under torch.inference_mode: its tensors have no version counter.
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        conv = torch.nn.Conv2d(16, 24, 3, padding=1).to(torch.bfloat16)
        plain = torch.nn.Conv2d(16, 24, 3, padding=1).to(torch.bfloat16)
        plain.load_state_dict(conv.state_dict())
        cpu_pack.pack_convolutions(conv)
        x = torch.randn((2, 16, 6, 6), generator=g).to(torch.bfloat16)
        assert torch.equal(conv(x), plain(x))
        conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight), requires_grad=False)
        plain.weight = torch.nn.Parameter(conv.weight.clone(), requires_grad=False)
        assert torch.equal(conv(x), plain(x))


def test_a_bf16_cpu_model_runs_packed_and_edits_the_same_picture(tiny_folder):
    _, packed = _load(tiny_folder)
    assert _packed(packed.components.unet)
    _, plain = _load(tiny_folder)
    cpu_pack.unpack_convolutions(plain.components.unet)
    img = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(1))
    a, b = (edit(m, encode_instruction(m, "make it winter"), img, SeedPlan.single(4), steps=3).images
            for m in (packed, plain))
    assert torch.equal(a, b)


def test_packing_is_left_out_in_fp32_in_low_memory_mode_and_when_memory_is_short(tiny_folder, monkeypatch):
    from ip2p_nodes.pipeline_core.models import cache as cache_module

    assert not _packed(_load(tiny_folder, precision="fp32")[1].components.unet)
    _, low = _load(tiny_folder, memory="low")
    low.ensure_loaded("unet")
    assert not _packed(low.components.unet)
    monkeypatch.setattr(cache_module, "available_memory", lambda: 1000)
    assert not _packed(_load(tiny_folder, memory="auto")[1].components.unet)
    monkeypatch.setattr(cache_module, "available_memory", lambda: 1 << 40)
    assert _packed(_load(tiny_folder, memory="auto")[1].components.unet)


def test_a_released_unet_drops_its_packed_copies(tiny_folder):
    cache, model = _load(tiny_folder)
    unet = model.components.unet
    model.encode("make it winter")
    edit(model, encode_instruction(model, "make it winter"), torch.rand(1, 32, 32, 3), SeedPlan.single(0), steps=1)
    assert any("_ip2p_packed" in m.__dict__ for m in unet.modules())
    cache.memory = "low"
    model.done_with("unet")
    assert not _packed(unet) and not any("_ip2p_packed" in m.__dict__ for m in unet.modules())


def test_a_lora_on_a_packed_unet_gives_the_picture_of_the_plain_one(tiny_folder, tmp_path_factory):
    lora = lora_files.write_diffusers_lora(tiny_folder, tmp_path_factory.mktemp("lora"), seed=5)
    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(2))
    out = []
    for pack in (True, False):
        cache, base = _load(tiny_folder)
        if not pack:
            cpu_pack.unpack_convolutions(base.components.unet)
        model = cache.get(base.key.with_lora(LoraRef.of(lora.path, 0.9)))
        out.append(edit(model, encode_instruction(model, "make it winter"), img, SeedPlan.single(1), steps=2).images)
    assert torch.equal(*out)
