"""Our own loop must produce diffusers' InstructPix2Pix image for the same scheduler, seed, steps and input."""

import logging

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline

from ip2p_nodes.pipeline_core import SeedPlan, edit, encode_instruction
from ip2p_nodes.pipeline_core.models.schedulers import SCHEDULER_NAMES, make_scheduler

log = logging.getLogger(__name__)


def _image(h=64, w=48, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, h, w, 3, generator=g)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("s_t,s_i", [(7.5, 1.5), (3.0, 1.0)])
def test_image_equals_diffusers_pipeline(tiny_folder, fp32_model, scheduler, s_t, s_i):
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_folder, safety_checker=None)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    img = _image()
    seed, steps = 1234, 4
    ref = pipe(
        "turn it blue",
        image=img.permute(0, 3, 1, 2),
        num_inference_steps=steps,
        guidance_scale=s_t,
        image_guidance_scale=s_i,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images  # [1,3,H,W] in 0..1
    ours = edit(fp32_model, encode_instruction(fp32_model, "turn it blue"), img, SeedPlan.single(seed),
                steps=steps, text_guidance=s_t, image_guidance=s_i, scheduler=scheduler)
    diff = (ours.images.permute(0, 3, 1, 2) - ref).abs().max().item()
    log.info("max abs difference vs diffusers (%s, s_T=%s, s_I=%s): %.3g", scheduler, s_t, s_i, diff)
    print(f"\n[parity] {scheduler} s_T={s_t} s_I={s_i}: max |ours - diffusers| = {diff:.3g}")
    assert ours.images.shape == (1, 64, 48, 3)
    assert diff < 1e-4
