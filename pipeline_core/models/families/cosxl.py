"""CosXL Edit (Stability AI's ``cosxl_edit.safetensors``): SDXL InstructPix2Pix with EDM v-prediction.

Everything of :class:`SDXLFamily` (two text encoders, pooled text, size ids, empty negative encoded as text), and:

- the image latent is multiplied by the VAE scaling factor before it is concatenated (ComfyUI's
  ``SDXL_instructpix2pix`` for ``V_PREDICTION_EDM`` runs it through ``latent_formats.SDXL().process_in``;
  diffusers' ``is_cosxl_edit=True``);
- continuous EDM sampling with v-prediction, sigma 0.002..120, sigma_data 1.0 (the file's ``edm_vpred.*``
  keys, ComfyUI's ``ModelSamplingContinuousEDM``): UNet input ``x / sqrt(sigma² + 1)``, time ``0.25 ln sigma``,
  ``x0 = x / (sigma² + 1) - v · sigma / sqrt(sigma² + 1)``, as diffusers' EDM schedulers precondition;
- its schedulers are diffusers' EDM ones. ``euler`` is ``EDMEulerScheduler`` with the model's own sigma
  schedule; the shipped config (single files) gives it the log-linear ("exponential") sigmas that ComfyUI's
  ``normal`` scheduler gives a continuous-EDM model — the sampler and schedule of ComfyUI's CosXL Edit example.
  diffusers' EDM default is Karras sigmas, one reason ``EDMEulerScheduler(...)`` as written in diffusers issue
  7621 does not give ComfyUI's pictures (the other: the pipeline zeroes the empty negative prompt).
  ``dpmpp_2m`` / ``dpmpp_2m_karras`` are ``EDMDPMSolverMultistepScheduler`` (DPM-Solver++ 2M) with exponential
  / Karras sigmas, as ``dpmpp_2m`` / ``dpmpp_2m_karras`` are plain / Karras for SD. Ancestral, DDIM and UniPC
  have no EDM form in diffusers and are refused, naming the ones that work;
- defaults: guidance 5.0 / 1.5 and 20 Euler steps (ComfyUI's example), working area 1024².
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from .. import ldm_sdxl, schedulers
from .sdxl import SDXLFamily, has_sdxl_text_encoders, is_cosxl_folder, sdxl_conditioning_fits


def _edm_schedulers() -> dict[str, tuple[type, dict[str, Any]]]:
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    return {
        "euler": (EDMEulerScheduler, {}),  # the model's own sigma schedule (shipped: exponential)
        "dpmpp_2m": (EDMDPMSolverMultistepScheduler,
                     {"sigma_schedule": "exponential", "algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_2m_karras": (EDMDPMSolverMultistepScheduler,
                            {"sigma_schedule": "karras", "algorithm_type": "dpmsolver++", "solver_order": 2}),
    }


EDM_SCHEDULER_NAMES = ("euler", "dpmpp_2m", "dpmpp_2m_karras")


class CosXLFamily(SDXLFamily):
    name = "cosxl"
    label = "CosXL Edit"
    latent_format = "SDXL"
    config_dir = "cosxl"
    default_resolution = 1024
    default_guidance = (5.0, 1.5)
    default_scheduler = "euler"
    scale_image_latent = True
    scheduler_names: ClassVar[tuple[str, ...]] = EDM_SCHEDULER_NAMES

    @classmethod
    def matches_checkpoint(cls, state: Mapping[str, torch.Tensor]) -> bool:
        return (
            ldm_sdxl.edm_vpred_sigmas(state) is not None
            and has_sdxl_text_encoders(state)
            and sdxl_conditioning_fits(state)
        )

    @classmethod
    def matches_folder(cls, index: dict, unet_config: dict, scheduler_config: dict) -> bool:
        return (
            "text_encoder_2" in index
            and unet_config.get("addition_embed_type") == "text_time"
            and is_cosxl_folder(index, scheduler_config)
        )

    def folder_scheduler_config(self, scheduler_config: dict) -> dict:
        if ldm_sdxl.is_edm_vpred(scheduler_config):
            return scheduler_config
        # Marked CosXL by model_index.json but with SDXL's discrete scheduler: sample as CosXL is trained.
        return self.edm_config()

    def single_file_scheduler_config(self, configs: dict, state: Mapping[str, torch.Tensor]) -> dict:
        """The shipped (or embedded) EDM config with the file's own sigmas, as ComfyUI reads them."""
        config = dict(configs["scheduler"])
        if not ldm_sdxl.is_edm_vpred(config):
            config = self.edm_config()
        sigma_min, sigma_max = ldm_sdxl.edm_vpred_sigmas(state)
        return {**config, "sigma_min": sigma_min, "sigma_max": sigma_max}

    def make_scheduler(self, name: str | None, scheduler_config: dict):
        """A fresh EDM scheduler of the named kind from the model's EDM config (``auto``: the config's own)."""
        config = dict(scheduler_config) if ldm_sdxl.is_edm_vpred(scheduler_config) else self.edm_config()
        cls, overrides = _edm_schedulers()[self.resolve_scheduler(name, config)]
        return cls.from_config(config, **overrides)

    def resolve_scheduler(self, name: str | None, scheduler_config: dict) -> str:
        if name in (None, "", schedulers.AUTO):
            own = scheduler_config.get("_class_name")
            if own == "EDMDPMSolverMultistepScheduler":
                return "dpmpp_2m_karras" if scheduler_config.get("sigma_schedule") == "karras" else "dpmpp_2m"
            return self.default_scheduler
        return super().resolve_scheduler(name, scheduler_config)

    def edm_config(self) -> dict:
        return self.shipped_configs(("scheduler",))["scheduler"]
