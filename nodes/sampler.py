"""IP2P Dual-Guidance Sampler: ComfyUI types in and out of ``pipeline_core.edit``."""

from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
import torch
from comfy_api.latest import io

from ..pipeline_core import SeedPlan, edit, limits
from ..pipeline_core.models.schedulers import AUTO, SCHEDULER_CHOICES, SCHEDULER_TOOLTIPS
from .loader import cached_model
from .preview import make_preview
from .types import CATEGORY, ConditioningType, ModelType, SeedPlanType


def labels_for(result, text_guidance: float, image_guidance: float, n_inputs: int) -> str:
    """One line per output picture: what made it, so a grid of variations can be read (and re-made)."""
    lines = []
    for index, item in result.items:
        s_t = item.text_guidance if item.text_guidance is not None else text_guidance
        s_i = item.image_guidance if item.image_guidance is not None else image_guidance
        line = f"seed {item.seed} · text {s_t:g} · image {s_i:g}"
        lines.append(f"input {index + 1} · {line}" if n_inputs > 1 else line)
    return "\n".join(lines)


class IP2PSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        schedulers = "; ".join(f"{n}: {SCHEDULER_TOOLTIPS[n]}" for n in SCHEDULER_CHOICES)
        return io.Schema(
            node_id="IP2PSampler",
            display_name="IP2P Dual-Guidance Sampler",
            category=CATEGORY,
            description=(
                "Edits the image by the instruction with InstructPix2Pix's two guidance scales (text: how much to "
                "change, image: how much to keep). The output has exactly the input's size. Optional: a mask "
                "to edit one region only, an edit strength (denoise) for subtle changes, the working resolution. "
                "Shows progress and a live preview of the picture forming (as set by ComfyUI's preview method) "
                "after every step, and stops within a fraction of a step on Cancel."
            ),
            inputs=[
                ModelType.Input("model", tooltip="The model from IP2P Load Model (the same one the instruction used)."),
                ConditioningType.Input("conditioning", tooltip="The instruction from IP2P Instruction."),
                io.Image.Input(
                    "image",
                    tooltip=(
                        "The picture(s) to edit, any size; the output has the same size (alpha is ignored). "
                        "Pictures larger than the working resolution are edited at it and scaled back, with the "
                        "fine detail the edit left alone restored. Every image of a batch is edited with every "
                        "seed of the plan."
                    ),
                ),
                io.Int.Input(
                    "seed",
                    default=int(limits.SEED.default),
                    min=int(limits.SEED.low),
                    max=int(limits.SEED.high),
                    control_after_generate=True,
                    tooltip=(
                        "Noise seed: the same seed and settings give the same picture. Ignored when a plan is "
                        "connected."
                    ),
                ),
                io.Int.Input(
                    "steps",
                    default=int(limits.STEPS.default),
                    min=int(limits.STEPS.low),
                    max=int(limits.STEPS.high),
                    tooltip=(
                        "Denoising steps: 20 is the usual balance, 10-15 for drafts, 30-50 for fine detail; time "
                        "grows linearly."
                    ),
                ),
                io.Float.Input(
                    "text_guidance",
                    default=limits.TEXT_GUIDANCE.default,
                    min=limits.TEXT_GUIDANCE.low,
                    max=limits.TEXT_GUIDANCE.high,
                    step=limits.TEXT_GUIDANCE.step,
                    tooltip=(
                        "How strongly the instruction is applied (s_T). Useful 5-12: raise it when the edit is too "
                        "weak, lower it when the picture gets overcooked. 7.5 is the paper's default for SD1.5 models; "
                        "SDXL-IP2P is made for 3.0, CosXL Edit for about 5.0, the toy model for 3.0."
                    ),
                ),
                io.Float.Input(
                    "image_guidance",
                    default=limits.IMAGE_GUIDANCE.default,
                    min=limits.IMAGE_GUIDANCE.low,
                    max=limits.IMAGE_GUIDANCE.high,
                    step=limits.IMAGE_GUIDANCE.step,
                    tooltip=(
                        "How closely the result keeps the input picture (s_I). Useful 1.0-2.5: raise it when too "
                        "much changes, lower it for bolder edits; below 1 drifts away from the input. 1.5 is the "
                        "paper's default; at exactly 1 a third of the work is skipped."
                    ),
                ),
                io.Combo.Input(
                    "scheduler",
                    options=list(SCHEDULER_CHOICES),
                    default=AUTO,
                    tooltip=f"Sampling method. {schedulers}.",
                ),
                SeedPlanType.Input(
                    "plan",
                    optional=True,
                    tooltip=(
                        "Optional, from IP2P Seed Batch: several seeds (and guidance values) in one run; replaces "
                        "seed, and the guidance values it lists."
                    ),
                ),
                io.Mask.Input(
                    "mask",
                    optional=True,
                    tooltip=(
                        "Optional: where to edit (1/white = edit, 0/black = keep). Outside the mask the output is "
                        "the input, pixel for pixel. Any size (resized to the picture); one mask for the whole "
                        "batch or one per picture. An empty mask returns the input unchanged."
                    ),
                ),
                io.Float.Input(
                    "denoise",
                    default=limits.DENOISE.default,
                    min=limits.DENOISE.low,
                    max=limits.DENOISE.high,
                    step=limits.DENOISE.step,
                    optional=True,
                    tooltip=(
                        "Edit strength. 1 = the full edit (the paper's sampler, from pure noise). Lower values "
                        "start from the picture itself and keep its layout and colours: 0.5-0.8 for clear but "
                        "faithful edits, 0.2-0.4 for subtle ones. Runs steps x denoise steps."
                    ),
                ),
                io.Int.Input(
                    "feather",
                    default=int(limits.FEATHER.default),
                    min=int(limits.FEATHER.low),
                    max=int(limits.FEATHER.high),
                    optional=True,
                    tooltip=(
                        "Soft edge of the mask, in pixels: the edit fades in over this width inside the mask's "
                        "border, so it blends into the kept part. 0 = hard edge; 8-32 px suits most pictures, "
                        "more for large ones. Needs a mask."
                    ),
                ),
                io.Boolean.Input(
                    "crop_to_mask",
                    default=False,
                    optional=True,
                    tooltip=(
                        "Edit only a box around the mask, at the model's full working resolution, and paste it "
                        "back: more detail for small regions of large pictures, and faster. Nothing outside the "
                        "box changes. Needs a mask."
                    ),
                ),
                io.Int.Input(
                    "working_resolution",
                    default=0,
                    min=0,
                    max=int(limits.WORKING_RESOLUTION.high),
                    step=int(limits.WORKING_RESOLUTION.step),
                    optional=True,
                    tooltip=(
                        "The size the model edits at, as the side of a square of the same area (aspect is kept). "
                        "0 = the model's own (512 for SD1.5, 768 for SDXL-IP2P-768, 1024 for CosXL, 32 for the toy "
                        "model). Larger pictures are scaled to it and back; smaller ones are edited at their own "
                        "size. Useful 384-768 for SD1.5, 768-1280 for SDXL-based models: higher is slower and may "
                        "repeat subjects."
                    ),
                ),
                # Last and optional: saved workflows list widget values by position, so older ones load as before
                # and get the default.
                io.Combo.Input(
                    "speed",
                    options=list(limits.SPEEDS),
                    default="quality",
                    optional=True,
                    tooltip=(
                        "quality: the whole model on every step. fast: the whole model on one step in "
                        f"{int(limits.FAST_INTERVAL.default)} and on the last, only its outer layers on the others, "
                        "reusing the deep features of the last full step (DeepCache): about 0.75x the time of an "
                        "SD1.5 edit on a CPU, for a slightly different picture (the same seed no longer gives the "
                        "quality picture). Good for drafts and sweeps; use quality for the final edit."
                    ),
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="image",
                    tooltip=(
                        "The edited picture(s), exactly the input's size; input-major order (all plan items of "
                        "input 1 first)."
                    ),
                ),
                io.Latent.Output(
                    display_name="latent",
                    tooltip=(
                        "The result as a ComfyUI LATENT (the model's VAE space: SD1.5 or SDXL) at the working "
                        "resolution, before the mask blend, e.g. for VAEDecode or a second pass; with "
                        "crop_to_mask, the final picture encoded at the whole picture's working resolution."
                    ),
                ),
                io.String.Output(
                    display_name="labels",
                    tooltip="One line per output picture with its seed and guidance values, e.g. for a labelled grid.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        conditioning,
        image: torch.Tensor,
        seed: int,
        steps: int,
        text_guidance: float,
        image_guidance: float,
        scheduler: str,
        plan: SeedPlan | None = None,
        mask: torch.Tensor | None = None,
        denoise: float = 1.0,
        feather: int = 0,
        crop_to_mask: bool = False,
        working_resolution: int = 0,
        speed: str = "quality",
    ) -> io.NodeOutput:
        cached = cached_model(model)
        progress_bar = comfy.utils.ProgressBar(steps)
        c = cached.components
        preview = make_preview(c.spec.latent_format, int(c.vae.config.latent_channels), c.device)

        def progress(done: int, total: int, latents) -> None:
            shown = preview(latents) if preview is not None and latents is not None else None
            progress_bar.update_absolute(done, total, shown)

        result = edit(
            cached,
            conditioning,
            image,
            plan if plan is not None else SeedPlan.single(seed),
            steps=steps,
            text_guidance=text_guidance,
            image_guidance=image_guidance,
            scheduler=scheduler,
            progress=progress,
            # Checked before every UNet block, so Cancel stops within a fraction of a step (a minute-long step of a
            # big batch on a CPU included); the raise leaves the cached model untouched.
            check_cancel=mm.throw_exception_if_processing_interrupted,
            mask=mask,
            denoise=denoise,
            feather=feather,
            crop_to_mask=crop_to_mask,
            working_resolution=working_resolution or None,
            speed=speed,
        )
        device = mm.intermediate_device()
        latent = {"samples": result.latents.to(device)}
        labels = labels_for(result, text_guidance, image_guidance, n_inputs=image.shape[0])
        return io.NodeOutput(result.images.to(device), latent, labels)
