"""Our pipeline against ComfyUI's own native InstructPix2Pix path, on the same weights (COMFYUI_DIR tier).

One full-size SD1.5 InstructPix2Pix file with random weights, written by the pack's ``save_single_file``, is
loaded by ComfyUI's ``CheckpointLoaderSimple`` and by our loader node. Then:

- one denoiser evaluation: our :class:`Denoiser` (the paper's dual guidance) equals native
  ``InstructPixToPixConditioning`` + ``DualCFGGuider`` (style "regular") at one sigma, on the same noisy
  latent. Whole runs cannot be compared: the two draw their noise differently.
- our LATENT output decodes with native ``VAEDecode`` to our IMAGE output.

How ComfyUI's guider maps onto the paper (``comfy_extras/nodes_custom_sampler.py`` ``Guider_DualCFG``, regular
style): ``out[0] + cfg2 (out[1] - out[0]) + cfg1 (out[2] - out[1])`` over the conds (negative, cond2, cond1).
With cond1 = the instruction + picture, cond2 = the negative prompt + picture (both from
``InstructPixToPixConditioning``) and negative = the plain negative prompt (no picture, so ``IP2P.concat_cond``
gives it a zero image latent), that is ``e_U + cfg2 (e_I - e_U) + cfg1 (e_T - e_I)``: **cfg_conds is the text
guidance s_T and cfg_cond2_negative the image guidance s_I**. ComfyUI combines x0 predictions, we combine noise
predictions; the weights sum to 1, so the two agree (x0 = x - sigma * eps, linearly).

For SDXL-IP2P and CosXL Edit the same one-sigma check runs on a *tiny* SDXL-shaped file written by our
``save_single_file`` (a real-size SDXL pair would need ~15 GB of RAM in fp32 on both sides): ComfyUI recognises
SDXL only by the real UNet's shapes, so its model is built the way ``load_state_dict_guess_config`` builds it,
with the ``SDXL_instructpix2pix`` model config named instead of detected (detection of the real-size layout is
``test_ldm_sdxl_comfyui.py``'s job). Everything after that is ComfyUI's own: reading ``edm_vpred.*`` into EDM
v-prediction, the UNet, the concat latent and its family scaling (CosXL scales it, SDXL-IP2P does not),
SDXL's pooled text and size embedding, the guider and the model sampling's input/output scaling. ComfyUI's
VAE and CLIP classes only build the real architectures, so the picture latent and text embeddings going into
the native nodes are ours (the same tensors both sides see).

The SD1.5 files are 2 GB; they are written once per module and deleted at its end. Everything runs in fp32 on
the CPU, with tiny latents (one UNet call per side per check), so the module takes well under a minute.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import time

import pytest
import torch

from support import comfy_harness, model_files, tiny_sdxl

comfy_harness.import_comfyui()  # skips this module, saying why, without COMFYUI_DIR

import comfy.model_base  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from comfy_extras.nodes_custom_sampler import DualCFGGuider  # noqa: E402
from comfy_extras.nodes_ip2p import InstructPixToPixConditioning  # noqa: E402

import nodes as comfy_nodes  # noqa: E402
from ip2p_nodes.nodes import extension  # noqa: E402
from ip2p_nodes.nodes.instruction import IP2PInstruction  # noqa: E402
from ip2p_nodes.nodes.loader import IP2PModelLoader, cached_model  # noqa: E402
from ip2p_nodes.nodes.sampler import IP2PSampler  # noqa: E402
from ip2p_nodes.pipeline_core import (  # noqa: E402
    MODEL_CACHE,
    ModelCache,
    ModelSource,
    dual_guidance,
    encode_images,
    encode_instruction,
    save_single_file,
)
from ip2p_nodes.pipeline_core.editing.denoiser import Denoiser  # noqa: E402

pytestmark = pytest.mark.comfyui
log = logging.getLogger(__name__)  # measured differences and timings: run with --log-cli-level=INFO

SD15_FILE = "ip2p-sd15-full-size-random.safetensors"
INSTRUCTION = "turn the sky into a sunset"
NEGATIVE = "blurry"


def picture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth picture with some detail: a gradient plus a little noise, IMAGE layout [1, h, w, 3]."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, h)[:, None, None]
    xs = torch.linspace(0, 1, w)[None, :, None]
    base = torch.cat([ys.expand(h, w, 1), xs.expand(h, w, 1), (ys * xs).expand(h, w, 1)], dim=-1)
    return (0.8 * base + 0.2 * torch.rand(h, w, 3, generator=g))[None].clamp(0, 1)


def first(output):
    """The first output of a node, V1 (tuple) or V3 (NodeOutput)."""
    return output[0]


def one_sigma_native(model_patcher, guider, latent: torch.Tensor, sigma: float, noise: torch.Tensor):
    """Run the guider through ComfyUI's own sampling entry at exactly one sigma; returns (x, denoised).

    A one-step "sampler" (``KSAMPLER`` around a function with k-diffusion's signature) evaluates the model once
    at ``sigmas[0]`` and keeps the noisy latent it was given and the guided x0 prediction. Everything else
    (cond processing, concat latents, the guider's formula, model sampling) is ComfyUI's unchanged path.
    """
    seen = {}

    def evaluate_once(model, x, sigmas, extra_args=None, callback=None, disable=None):
        denoised = model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        seen["x"], seen["denoised"] = x.detach().clone(), denoised.detach().clone()
        return denoised

    sigmas = torch.tensor([sigma, 0.0])
    guider.sample(noise, latent, comfy.samplers.KSAMPLER(evaluate_once), sigmas, disable_pbar=True, seed=0)
    return seen["x"], seen["denoised"]


@contextlib.contextmanager
def capture_output(module: torch.nn.Module):
    """The outputs of every call of ``module`` while the block runs (the raw, unguided UNet passes)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _args, out: seen.append(out[0].detach().clone()))
    try:
        yield seen
    finally:
        handle.remove()


def free_everything() -> None:
    MODEL_CACHE.clear()
    mm.unload_all_models()
    gc.collect()


# -- SD1.5 ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """Both loaders on one full-size random SD1.5 IP2P file: (native (model, clip, vae), our IP2P_MODEL)."""
    root = tmp_path_factory.mktemp("native-sd15")
    folder = root / "checkpoints"
    patch = pytest.MonkeyPatch()
    try:
        start = time.perf_counter()
        model_files.write_full_size_ip2p_checkpoint(folder / SD15_FILE)
        written = time.perf_counter() - start
        patch.setattr(folder_paths, "models_dir", str(root))
        patch.setattr(folder_paths, "filename_list_cache", {})
        patch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(folder)], {".safetensors"}))
        patch.delitem(folder_paths.folder_names_and_paths, "instructpix2pix", raising=False)
        previous_residency = MODEL_CACHE.residency
        MODEL_CACHE.clear()
        extension.setup()
        start = time.perf_counter()
        native = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(SD15_FILE)
        ours = first(IP2PModelLoader.execute(SD15_FILE, "", "fp32"))
        log.info("SD1.5 file written in %.1f s, loaded by both in %.1f s", written, time.perf_counter() - start)
        yield native, ours
    finally:
        native = ours = None
        free_everything()
        MODEL_CACHE.residency = previous_residency
        patch.undo()
        # 2 GB of random weights: pytest keeps the last few temp dirs, so do not leave them behind.
        shutil.rmtree(root, ignore_errors=True)


def test_native_loader_reads_our_sd15_file_as_instructpix2pix(sd15):
    (model_patcher, clip, vae), ours = sd15
    assert type(model_patcher.model).__name__ == "SD15_instructpix2pix"
    assert model_patcher.model.model_type.name == "EPS"
    assert cached_model(ours).components.family == "sd15"


def test_sd15_guided_prediction_at_one_sigma_equals_native_dual_cfg(sd15):
    (model_patcher, clip, vae), ours = sd15
    s_t, s_i = 7.5, 1.5
    pixels = picture(64, 64)

    # Native: the graph a user builds (CLIPTextEncode x2 -> InstructPixToPixConditioning -> DualCFGGuider).
    positive = first(comfy_nodes.CLIPTextEncode().encode(clip, INSTRUCTION))
    negative = first(comfy_nodes.CLIPTextEncode().encode(clip, NEGATIVE))
    cond1, cond2, empty_latent = InstructPixToPixConditioning.execute(positive, negative, pixels, vae).result
    guider = first(DualCFGGuider.execute(model_patcher, cond1, cond2, negative, s_t, s_i, "regular"))

    # Ours: the same texts and picture through our nodes' core, one denoiser at the scheduler's sigma for t.
    model = cached_model(ours)
    c = model.components
    cond = first(IP2PInstruction.execute(ours, INSTRUCTION, NEGATIVE))
    image_latents, _ = encode_images(model, pixels)
    native_latent = cond1[0][1]["concat_latent_image"]
    latent_err = (image_latents - native_latent).abs().max().item()
    assert latent_err < 1e-4, "the VAE encodings of the picture differ"

    scheduler = c.spec.make_scheduler("euler", c.scheduler_config)
    scheduler.set_timesteps(10)
    k = 4  # a middle step: t = 555, sigma ~ 2.0 (10 linspace steps land on whole timesteps)
    t, sigma = scheduler.timesteps[k], float(scheduler.sigmas[k])
    assert float(t) == int(t)
    assert int(model_patcher.model.model_sampling.timestep(torch.tensor(sigma))) == int(t)

    noise = torch.randn(empty_latent["samples"].shape, generator=torch.Generator().manual_seed(3))
    x, native_denoised = one_sigma_native(model_patcher, guider, empty_latent["samples"], sigma, noise)

    denoiser = Denoiser(model, cond, image_latents, s_t, s_i)
    scheduler._step_index = k
    with capture_output(c.unet) as passes:
        eps = denoiser(scheduler.scale_model_input(x, t), t)
    ours_denoised = x - sigma * eps
    native_eps = (x - native_denoised) / sigma

    eps_err = (eps - native_eps).abs().max().item()
    x0_err = (ours_denoised - native_denoised).abs().max().item()
    # The same three passes combined with the two scales swapped: what a wrong cfg1/cfg2 mapping would give.
    swapped = dual_guidance(*passes[0].float().chunk(3), s_i, s_t)
    swapped_err = (swapped - native_eps).abs().max().item()
    scale = native_eps.abs().max().item()
    log.info("SD1.5 one sigma (t=%d, sigma=%.4f): |eps| max %.3f, eps diff %.2e, x0 diff %.2e, image latent diff "
             "%.2e; swapped scales: eps diff %.2e", int(t), sigma, scale, eps_err, x0_err, latent_err, swapped_err)
    # fp32 on both sides; what differs is only the order of float operations (ComfyUI's own UNet, attention and
    # CLIP code vs diffusers/transformers), ~1e-6 relative per pass, amplified by s_T in s_T (e_T - e_I).
    assert eps_err < 1e-4 * scale
    assert swapped_err > 1e-2 * scale


def test_native_vae_decode_of_our_latent_is_our_image(sd15):
    """Our LATENT output is a native LATENT: ComfyUI's VAEDecode with its VAE gives our IMAGE output."""
    (model_patcher, clip, vae), ours = sd15
    pixels = picture(48, 64, seed=1)  # native size (below the 512 px working area), not square
    cond = first(IP2PInstruction.execute(ours, INSTRUCTION, ""))
    image, latent, _ = IP2PSampler.execute(ours, cond, pixels, 7, 2, 7.5, 1.5, "euler_ancestral").result
    assert image.shape == pixels.shape and latent["samples"].shape == (1, 4, 6, 8)
    decoded = first(comfy_nodes.VAEDecode().decode(vae, latent))
    err = (decoded - image).abs().max().item()
    log.info("SD1.5 native VAEDecode(our LATENT) vs our IMAGE: max diff %.2e (IMAGE std %.3f)", err, image.std())
    assert decoded.shape == image.shape
    assert err < 1e-3


# -- SDXL-IP2P and CosXL Edit -----------------------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."


class OurVAE:
    """The one method of ComfyUI's VAE that ``InstructPixToPixConditioning`` calls, done by our VAE: ComfyUI's VAE
    class only builds the full-size architecture. Returns raw (unscaled) latents, as ComfyUI's ``VAE.encode``."""

    def __init__(self, model):
        self.model = model

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_images(self.model, pixels)[0]


@pytest.fixture(scope="module", params=["sdxl", "cosxl"])
def sdxl_pair(request, tmp_path_factory):
    """One tiny SDXL-shaped file read by both: (family, native ModelPatcher, our CachedModel)."""
    family = request.param
    root = tmp_path_factory.mktemp(f"native-{family}")
    tiny = tiny_sdxl.make_components(5, tokenizer_dir=root / "tokenizer", sample_size=128,
                                     time_embed_width=tiny_sdxl.COMFYUI_TIME_EMBED_WIDTH)
    scheduler_config = tiny_sdxl.COSXL_SCHEDULER_CONFIG if family == "cosxl" else tiny_sdxl.SDXL_SCHEDULER_CONFIG
    path = save_single_file(tiny.modules(), root / f"tiny-{family}.safetensors", tokenizer_dir=root / "tokenizer",
                            family=family, scheduler_config=scheduler_config)

    # ComfyUI's load_state_dict_guess_config, with the model config named: the tiny shapes match no SDXL entry.
    state = comfy.utils.load_torch_file(str(path))
    config = comfy.supported_models.SDXL_instructpix2pix(comfy.model_detection.detect_unet_config(state, UNET_PREFIX))
    unet = tiny.unet.config
    config.unet_config["num_head_channels"] = unet.block_out_channels[-1] // unet.attention_head_dim[-1]
    config.set_inference_dtype(torch.float32, None)
    native = config.get_model(state, UNET_PREFIX, device=torch.device("cpu"))
    unet_keys = {k[len(UNET_PREFIX):] for k in state if k.startswith(UNET_PREFIX)}
    native.load_model_weights(state, UNET_PREFIX)  # pops the UNet's keys from state
    assert unet_keys == set(native.diffusion_model.state_dict()), "our file's UNet keys are not ComfyUI's"
    patcher = comfy.model_patcher.ModelPatcher(native, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))

    cache = ModelCache()
    ours = cache.get(cache.key_for(ModelSource.from_path(str(path)), "fp32", "cpu"))
    yield family, patcher, ours
    cache.clear()
    mm.unload_all_models()


def test_native_model_reads_our_sdxl_file_with_its_prediction_type(sdxl_pair):
    family, patcher, ours = sdxl_pair
    native = patcher.model
    assert type(native).__name__ == "SDXL_instructpix2pix"
    assert ours.components.family == family
    if family == "cosxl":
        assert native.model_type == comfy.model_base.ModelType.V_PREDICTION_EDM
        assert float(native.model_sampling.sigma_max) == pytest.approx(120.0)
        assert float(native.model_sampling.sigma_min) == pytest.approx(0.002)
        assert float(native.model_sampling.sigma_data) == 1.0
    else:
        assert native.model_type == comfy.model_base.ModelType.EPS


def test_sdxl_guided_prediction_at_one_sigma_equals_native_dual_cfg(sdxl_pair):
    family, patcher, ours = sdxl_pair
    c = ours.components
    s_t, s_i = 5.0, 1.5
    h, w = 48, 64  # not square, so a swapped height/width in the size ids would show
    pixels = picture(h, w, seed=2)

    cond = encode_instruction(ours, INSTRUCTION, NEGATIVE)
    image_latents, _ = encode_images(ours, pixels)
    # The size conditioning CLIPTextEncodeSDXL gives for this picture; ours comes from the picture itself.
    sizes = {"width": w, "height": h, "crop_w": 0, "crop_h": 0, "target_width": w, "target_height": h}
    positive = [[cond.instruction_embeds, {"pooled_output": cond.instruction_pooled, **sizes}]]
    negative = [[cond.negative_embeds, {"pooled_output": cond.negative_pooled, **sizes}]]
    cond1, cond2, empty_latent = InstructPixToPixConditioning.execute(positive, negative, pixels, OurVAE(ours)).result
    guider = first(DualCFGGuider.execute(patcher, cond1, cond2, negative, s_t, s_i, "regular"))

    scheduler = c.spec.make_scheduler("euler", c.scheduler_config)
    scheduler.set_timesteps(10)
    k = 4
    t, sigma = scheduler.timesteps[k], float(scheduler.sigmas[k])
    native_t = float(patcher.model.model_sampling.timestep(torch.tensor(sigma)))
    assert native_t == pytest.approx(float(t), abs=1e-5), "the two map sigma to a different UNet timestep"

    noise = torch.randn(empty_latent["samples"].shape, generator=torch.Generator().manual_seed(4))
    x, native_denoised = one_sigma_native(patcher, guider, empty_latent["samples"], sigma, noise)

    time_ids = c.spec.time_ids(c, (h, w), (h, w))
    denoiser = Denoiser(ours, cond, image_latents, s_t, s_i, time_ids)
    scheduler._step_index = k
    with capture_output(c.unet) as passes:
        prediction = denoiser(scheduler.scale_model_input(x, t), t)

    def x0_of(guided: torch.Tensor) -> torch.Tensor:
        """The scheduler's own x0 (EulerDiscrete: x - sigma eps; EDM Euler: c_skip x + c_out v), as the sampler
        gets it; each step() advances the step index, so set it back first."""
        scheduler._step_index = k
        return scheduler.step(guided, t, x).pred_original_sample

    ours_denoised = x0_of(prediction)
    x0_err = (ours_denoised - native_denoised).abs().max().item()
    scale = native_denoised.abs().max().item()
    swapped_err = (x0_of(dual_guidance(*passes[0].float().chunk(3), s_i, s_t)) - native_denoised).abs().max().item()
    log.info("%s one sigma (t=%.4f, sigma=%.4f): |x0| max %.3f, x0 diff %.2e; swapped scales: %.2e",
             family, float(t), sigma, scale, x0_err, swapped_err)
    assert x0_err < 1e-4 * scale
    assert swapped_err > 1e-2 * scale


def test_cosxl_scales_the_picture_latent_and_sdxl_ip2p_does_not_as_comfyui_does(sdxl_pair):
    """The one convention the two SDXL IP2P families differ in (diffusers' ``is_cosxl_edit``, ComfyUI's
    ``process_ip2p_image_in``): what the native model feeds its UNet equals what our denoiser does."""
    family, patcher, ours = sdxl_pair
    latents = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(6))
    theirs = patcher.model.process_ip2p_image_in(latents)
    expected = 0.13025 if family == "cosxl" else 1.0
    assert ours.components.spec.image_latent_scale(ours.components) == pytest.approx(expected)
    assert torch.allclose(theirs, latents * expected)
