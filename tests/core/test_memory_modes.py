"""Memory-tight mode: the UNet read when the first edit needs it, text encoders released after encoding.

What a user relies on: a released module computes exactly what it did before (the picture does not depend on the
policy), every family and LoRA stack keeps working, the text encoders and the UNet are never in memory together
in release mode, and nothing is released that could not be read back (single files, LoRA adapters, ComfyUI's
managed modules).
"""

import pytest
import torch

from ip2p_nodes.pipeline_core import ModelCache, ModelSource, SeedPlan, edit, encode_instruction
from ip2p_nodes.pipeline_core.models import releasing as text_encoders
from ip2p_nodes.pipeline_core.models.lora import LoraRef
from support import lora_files

TEXTS = ("make it winter", "turn the dog into a cat")


def _load(folder, policy, kind="diffusers"):
    cache = ModelCache(memory=policy)
    return cache, cache.get(cache.key_for(ModelSource(kind, str(folder)), "fp32", "cpu"))


def _te_tensors(model):
    return [t for name, m in model.components.modules().items() if name.startswith("text_encoder")
            for t in (*m.parameters(), *m.buffers())]


@pytest.mark.parametrize("folder", ["tiny_folder", "sdxl_folder", "cosxl_folder"])
def test_a_released_text_encoder_is_read_back_and_encodes_exactly_as_before(request, folder):
    path = request.getfixturevalue(folder)
    _, kept = _load(path, "keep")
    _, lean = _load(path, "low")
    for text in TEXTS:
        want, got = kept.encode(text), lean.encode(text)
        assert lean.released.text_encoders_released, "the text encoder stays in memory after encoding"
        assert all(t.is_meta for t in _te_tensors(lean))  # its memory is gone, the module stays
        assert torch.equal(want.embeds, got.embeds)
        assert (want.pooled is None) == (got.pooled is None)
        if want.pooled is not None:
            assert torch.equal(want.pooled, got.pooled)
    assert lean.released.releases == 2
    assert not kept.released.text_encoders_released and not any(t.is_meta for t in _te_tensors(kept))
    # A text already encoded is remembered: nothing is read back for it.
    lean.encode(TEXTS[0])
    assert lean.released.text_encoders_released and lean.encode_calls == 2


def _resident(model):
    return sorted(name for name, m in model.components.modules().items() if not any(p.is_meta for p in m.parameters()))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_low_memory_mode_keeps_one_module_in_memory_at_a_time_and_edits_the_same_picture(
        tiny_folder, precision, monkeypatch):
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    pictures = {}
    for mode in ("keep", "low"):
        cache = ModelCache(memory=mode)
        model = cache.get(cache.key_for(ModelSource("diffusers", str(tiny_folder)), precision, "cpu"))
        assert _resident(model) == ([] if mode == "low" else ["text_encoder", "unet", "vae"])  # nothing read yet
        reads = []  # (module read, modules in memory at that moment)
        real_read = text_encoders.read_safetensors

        def watching_read(path, dtype, channels_last=False):
            reads.append((path.parent.name, _resident(model)))
            return real_read(path, dtype, channels_last)

        monkeypatch.setattr(text_encoders, "read_safetensors", watching_read)
        cond = encode_instruction(model, "make it winter")
        pictures[mode] = [edit(model, cond, image, SeedPlan.single(3), steps=3).images for _ in range(2)]
        monkeypatch.undo()
        if mode == "keep":
            assert reads == [] and _resident(model) == ["text_encoder", "unet", "vae"]
            continue
        # Instruction and negative: one read, one release. Then each edit: the VAE encodes the input, the UNet
        # samples, the VAE decodes; whatever is read, nothing else big is in memory beside it.
        assert model.released.releases == 1
        edit_reads = [("unet", []), ("vae", ["unet"]), ("vae", [])]
        assert reads == [("text_encoder", [])] + edit_reads * 2
        assert _resident(model) == []
        if precision == "bf16":  # read back in the layout it was first loaded in
            model.ensure_loaded("unet")
            assert all(p.is_contiguous(memory_format=torch.channels_last)
                       for p in model.components.unet.parameters() if p.dim() == 4)
    for keep, low in zip(pictures["keep"], pictures["low"]):
        assert torch.equal(keep, low)


def test_auto_releases_only_when_less_memory_is_available_than_the_model_needs(tiny_folder, monkeypatch):
    _, model = _load(tiny_folder, "auto")
    size = text_encoders.weights_bytes(model.components)
    monkeypatch.setattr(text_encoders, "available_memory", lambda: 100 * size)
    model.encode(TEXTS[0])
    assert not model.released.text_encoders_released
    monkeypatch.setattr(text_encoders, "available_memory", lambda: size // 2)
    model.encode(TEXTS[1])
    assert model.released.text_encoders_released
    monkeypatch.setattr(text_encoders, "available_memory", lambda: None)  # unknown: keep
    _, other = _load(tiny_folder, "auto")
    other.encode(TEXTS[0])
    assert not other.released.text_encoders_released


def test_a_single_file_checkpoint_keeps_its_text_encoder(tiny_single_file):
    """Reading it back would mean reading the whole checkpoint again: not worth the memory it frees."""
    _, model = _load(tiny_single_file, "low", kind="single_file")
    model.encode(TEXTS[0])
    assert not model.released.text_encoders_released and not any(t.is_meta for t in _te_tensors(model))


def test_a_lora_after_a_release_lands_on_the_real_weights_and_its_text_encoder_is_kept(tiny_folder,
                                                                                       tmp_path_factory):
    lora = lora_files.write_diffusers_lora(tiny_folder, tmp_path_factory.mktemp("lora"), seed=3)
    ref = LoraRef.of(lora.path, 0.8)
    kept_cache, kept = _load(tiny_folder, "keep")
    lean_cache, lean = _load(tiny_folder, "low")
    lean.encode(TEXTS[0])
    assert lean.released.text_encoders_released
    want = kept_cache.get(kept.key.with_lora(ref)).encode(TEXTS[1])
    view = lean_cache.get(lean.key.with_lora(ref))
    assert not lean.released.text_encoders_released  # read back before the adapters went in
    got = view.encode(TEXTS[1])
    assert torch.equal(want.embeds, got.embeds)
    # Adapters now live in the text encoder: releasing it would lose them, so neither view releases it.
    lean.encode("make it autumn")
    assert not lean.released.text_encoders_released and not view.released.text_encoders_released


def test_a_residency_that_manages_the_modules_itself_keeps_them(tiny_folder):
    from ip2p_nodes.pipeline_core.models.cache import Residency

    class Managed(Residency):
        def allows_release(self):
            return False

    cache = ModelCache(residency=Managed(), memory="low")
    model = cache.get(cache.key_for(ModelSource("diffusers", str(tiny_folder)), "fp32", "cpu"))
    model.encode(TEXTS[0])
    assert not model.released.text_encoders_released


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="auto, keep, low"):
        ModelCache(memory="sometimes")
