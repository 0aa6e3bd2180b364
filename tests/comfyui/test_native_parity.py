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

The files are 2 GB (SD1.5); they are written once per module and deleted at its end. Everything runs in fp32 on
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

from support import comfy_harness, model_files

comfy_harness.import_comfyui()  # skips this module, saying why, without COMFYUI_DIR

import comfy.model_management as mm  # noqa: E402
import comfy.samplers  # noqa: E402
import folder_paths  # noqa: E402
from comfy_extras.nodes_custom_sampler import DualCFGGuider  # noqa: E402
from comfy_extras.nodes_ip2p import InstructPixToPixConditioning  # noqa: E402

import nodes as comfy_nodes  # noqa: E402
from ip2p_nodes.nodes import extension  # noqa: E402
from ip2p_nodes.nodes.instruction import IP2PInstruction  # noqa: E402
from ip2p_nodes.nodes.loader import IP2PModelLoader, cached_model  # noqa: E402
from ip2p_nodes.nodes.sampler import IP2PSampler  # noqa: E402
from ip2p_nodes.pipeline_core import MODEL_CACHE, dual_guidance, encode_images  # noqa: E402
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
