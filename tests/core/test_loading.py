"""Loading: single files offline, both forms give the same model, wrong or broken models get clear errors."""

import socket

import pytest
import torch

from ip2p_nodes.pipeline_core import ModelCache, ModelSource, SeedPlan, edit, encode_instruction
from ip2p_nodes.pipeline_core.errors import ModelLoadError
from ip2p_nodes.pipeline_core.models.loading import load_components, save_single_file
from ip2p_nodes.pipeline_core.models.precision import resolve_precision
from support import tiny_models

FP32 = resolve_precision("fp32", "cpu")


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a network connection fails loudly (and is recorded)."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in this test (tried {address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return attempts


def test_single_file_checkpoint_loads_with_the_network_cut(tiny_single_file, no_network):
    comps = load_components(ModelSource("single_file", str(tiny_single_file)), FP32, "cpu")
    assert comps.unet.config.in_channels == 8
    assert no_network == []


def test_single_file_and_diffusers_folder_give_the_same_edit(tiny_folder, tiny_single_file):
    cache = ModelCache()
    results = []
    for source in (ModelSource("diffusers", str(tiny_folder)), ModelSource("single_file", str(tiny_single_file))):
        model = cache.get(cache.key_for(source, "fp32", "cpu"))
        img = torch.rand(1, 32, 40, 3, generator=torch.Generator().manual_seed(0))
        results.append(edit(model, encode_instruction(model, "make it red"), img, SeedPlan.single(4), steps=2).images)
    assert torch.equal(results[0], results[1])


def test_sd15_single_file_without_metadata_uses_shipped_configs_and_comfyui_style_tokenizer(tmp_path, no_network):
    """A real-layout SD1.5 IP2P file has no embedded config: the shipped SD1.5 configs must describe it."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from ip2p_nodes.pipeline_core.models import ldm_format
    from ip2p_nodes.pipeline_core.models.loading import CONFIG_DIR

    cfg = {n: json.loads((CONFIG_DIR / "sd15" / f"{n}.json").read_text()) for n in ("unet", "vae", "text_encoder")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    # Full-size SD1.5 shapes without allocating 4 GB: zero-stride tensors, written as real files would be.
    state = {k: torch.zeros(1, dtype=torch.float16).expand(v.shape).contiguous() if v.numel() < 2_000_000
             else torch.zeros(v.shape, dtype=torch.float16)
             for k, v in ldm_format.to_ldm_state_dict(unet, vae, te).items()}
    path = tmp_path / "instruct-pix2pix-00-22000.safetensors"
    save_file(state, str(path))
    del state
    tok = tiny_models.write_tokenizer(tmp_path / "tok")  # stands in for ComfyUI's comfy/sd1_tokenizer folder
    comps = load_components(ModelSource("single_file", str(path), tokenizer_dir=str(tmp_path / "tok")), FP32, "cpu")
    assert list(comps.unet.config.block_out_channels) == [320, 640, 1280, 1280]  # a tuple or a list, by version
    assert comps.text_encoder.config.hidden_size == 768
    assert comps.tokenizer.get_vocab() == tok.get_vocab()
    assert no_network == []


def test_plain_text_to_image_checkpoint_is_refused_naming_the_file(tmp_path):
    unet, vae, te, _ = tiny_models.make_components(in_channels=4)
    path = save_single_file((unet, vae, te), tmp_path / "v1-5-pruned-emaonly.safetensors")
    with pytest.raises(ModelLoadError, match=r"v1-5-pruned-emaonly\.safetensors: UNet has 4 input channels.*8"):
        load_components(ModelSource("single_file", str(path)), FP32, "cpu")


def test_plain_diffusers_folder_is_refused(tmp_path):
    folder = tiny_models.save_diffusers_folder(tmp_path / "sd15-txt2img", in_channels=4)
    with pytest.raises(ModelLoadError, match="sd15-txt2img/unet: UNet has 4 input channels"):
        load_components(ModelSource("diffusers", str(folder)), FP32, "cpu")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x00" * 100])
def test_broken_file_gets_a_clear_error_and_the_cache_still_works(tmp_path, tiny_single_file, content):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(content)
    cache = ModelCache()
    with pytest.raises(ModelLoadError, match="broken.safetensors: cannot be read"):
        cache.get(cache.key_for(ModelSource("single_file", str(bad)), "fp32", "cpu"))
    assert len(cache) == 0
    good = cache.get(cache.key_for(ModelSource("single_file", str(tiny_single_file)), "fp32", "cpu"))
    assert good.components.unet is not None


def test_truncated_checkpoint_is_refused(tmp_path, tiny_single_file):
    data = tiny_single_file.read_bytes()
    bad = tmp_path / "half.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="half.safetensors"):
        load_components(ModelSource("single_file", str(bad)), FP32, "cpu")


def test_ckpt_pickle_loads_only_through_weights_only(tmp_path, tiny_single_file):
    from safetensors.torch import load_file

    state = load_file(str(tiny_single_file))
    good = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, good)
    # Without embedded configs the tiny model does not fit SD1.5: the error says so (weights_only read it fine).
    with pytest.raises(ModelLoadError, match="do not fit an SD1.x InstructPix2Pix model"):
        load_components(ModelSource("single_file", str(good)), FP32, "cpu")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, evil)
    with pytest.raises(ModelLoadError, match="evil.ckpt: cannot be read"):
        load_components(ModelSource("single_file", str(evil)), FP32, "cpu")


def test_lora_or_vae_file_is_refused_as_not_a_full_checkpoint(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "some_lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.ones(1)}, str(path))
    with pytest.raises(ModelLoadError, match="some_lora.safetensors: no UNet weights"):
        load_components(ModelSource("single_file", str(path)), FP32, "cpu")


def test_hub_id_offline_says_where_to_put_the_files(no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    said = r"timbrooks/instruct-pix2pix: could not be downloaded.*models/diffusers.*If you meant a local path: "
    with pytest.raises(ModelLoadError, match=said + r".*timbrooks/instruct-pix2pix does not exist"):
        load_components(ModelSource("hub", "timbrooks/instruct-pix2pix"), FP32, "cpu")


def test_from_path_tells_folders_files_and_hub_ids_apart(tiny_folder, tiny_single_file):
    assert ModelSource.from_path(str(tiny_folder)).kind == "diffusers"
    assert ModelSource.from_path(str(tiny_single_file)).kind == "single_file"
    assert ModelSource.from_path("timbrooks/instruct-pix2pix").kind == "hub"
    with pytest.raises(ModelLoadError, match=r"/nonexistent/model.safetensors: no such file or folder .*Check the"):
        ModelSource.from_path("/nonexistent/model.safetensors")


def test_second_get_loads_nothing_and_a_freed_cache_reloads(tiny_folder):
    cache = ModelCache()
    key = cache.key_for(ModelSource("diffusers", str(tiny_folder)), "fp32", "cpu")
    first = cache.get(key)
    assert cache.get(key) is first and cache.loads == 1
    cache.clear()
    again = cache.get(key)
    assert again is not first and cache.loads == 2


def test_encodings_are_cached_per_model_and_text(fp32_model):
    fp32_model.encode("make it winter")
    fp32_model.encode("")
    calls = fp32_model.encode_calls
    a = encode_instruction(fp32_model, "make it winter")
    assert fp32_model.encode_calls == calls
    b = encode_instruction(fp32_model, "make it summer")
    assert fp32_model.encode_calls == calls + 1
    assert not torch.equal(a.instruction_embeds, b.instruction_embeds)


def test_bf16_precision_runs_and_stays_close_to_fp32(tiny_folder, fp32_model):
    cache = ModelCache()
    bf16 = cache.get(cache.key_for(ModelSource("diffusers", str(tiny_folder)), "bf16", "cpu"))
    assert bf16.components.unet.dtype == torch.bfloat16
    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    a = edit(bf16, encode_instruction(bf16, "x"), img, SeedPlan.single(1), steps=2, scheduler="ddim").images
    b = edit(fp32_model, encode_instruction(fp32_model, "x"), img, SeedPlan.single(1), steps=2, scheduler="ddim").images
    assert (a - b).abs().mean() < 0.05


def test_fp16_on_cpu_is_refused_with_advice():
    from ip2p_nodes.pipeline_core.errors import InputError

    with pytest.raises(InputError, match="bf16"):
        resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("folder", ["tiny_folder", "sdxl_folder"])
def test_a_bf16_load_of_an_fp32_folder_casts_tensor_by_tensor_to_the_weights_diffusers_would_give(
        request, folder, monkeypatch):
    """The fp32 file is never held whole next to its bf16 copy (a 6 GB peak for SD1.5 that was 3.5 GB after)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ip2p_nodes.pipeline_core.models import weights

    path = request.getfixturevalue(folder)
    read = []
    real_read = weights.read_safetensors

    def recording_read(file, dtype, channels_last=False):
        state = real_read(file, dtype, channels_last)
        read.append((file.parent.name, {t.dtype for t in state.values() if t.is_floating_point()}))
        return state

    def no_from_pretrained(*args, **kwargs):
        raise AssertionError("from_pretrained memory-maps the fp32 file and casts from the mapping")

    monkeypatch.setattr(weights, "read_safetensors", recording_read)
    for cls in (UNet2DConditionModel, AutoencoderKL, CLIPTextModel):
        monkeypatch.setattr(cls, "from_pretrained", no_from_pretrained)
    c = load_components(ModelSource("diffusers", str(path)), resolve_precision("bf16", "cpu"), "cpu")
    monkeypatch.undo()

    assert all(dtypes == {torch.bfloat16} for _, dtypes in read)
    assert {name for name, _ in read} == set(c.modules())
    for role, module in c.modules().items():
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, role
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()]), role
    # Bit for bit what diffusers' own loader gives once cast to bf16.
    reference = UNet2DConditionModel.from_pretrained(path, subfolder="unet").to(torch.bfloat16)
    ours = c.unet.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items())
    # Read in the layout oneDNN's bf16 convolutions want, so nothing is re-laid out (and reallocated) after.
    for role in ("unet", "vae"):
        convs = [p for p in c.modules()[role].parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs), role


@pytest.mark.parametrize("channels_last", [False, True])
def test_reading_a_file_a_few_rows_at_a_time_gives_every_tensor_exactly(tmp_path, monkeypatch, channels_last):
    """Tensors larger than the read buffer are filled over several reads, each row where it belongs."""
    from safetensors.torch import save_file

    from ip2p_nodes.pipeline_core.models import weights

    g = torch.Generator().manual_seed(0)
    tensors = {
        "conv": torch.randn(7, 5, 3, 3, generator=g), "linear": torch.randn(9, 4, generator=g),
        "bias": torch.randn(6, generator=g), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3),
        "ids": torch.arange(12).reshape(3, 4), "half": torch.randn(4, 4, generator=g).half(),
    }
    save_file(tensors, tmp_path / "w.safetensors")
    monkeypatch.setattr(weights, "READ_CHUNK", 64)  # 2-4 rows per read for most of the tensors above
    for dtype in (torch.float32, torch.bfloat16):
        state = weights.read_safetensors(tmp_path / "w.safetensors", dtype, channels_last=channels_last)
        assert set(state) == set(tensors)
        for name, t in tensors.items():
            want = t.to(dtype) if t.is_floating_point() else t
            assert state[name].dtype == want.dtype and torch.equal(state[name], want), (name, dtype)
        assert state["conv"].is_contiguous(memory_format=torch.channels_last) == channels_last
    # A file cut short names the tensor it stopped in.
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-20])
    with pytest.raises(ValueError, match="truncated at tensor"):
        weights.read_safetensors(tmp_path / "cut.safetensors", torch.bfloat16)
