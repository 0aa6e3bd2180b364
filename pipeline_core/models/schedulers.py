"""The samplers users can pick, as diffusers schedulers built from the model's own scheduler config.

Names keep their meaning across families; a family that samples differently (CosXL's EDM) maps the names it can
honour to its own classes (see ``Family.make_scheduler``). ``auto`` is the model's own: the scheduler its
diffusers folder names, else its family's default.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from ..errors import InputError

# name -> (scheduler class, config overrides). Euler ancestral first: it is the paper's sampler and the
# default of timbrooks/instruct-pix2pix.
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}
SCHEDULER_NAMES = tuple(SCHEDULERS)
DEFAULT_SCHEDULER = "euler_ancestral"
AUTO = "auto"
SCHEDULER_CHOICES = (AUTO,) + SCHEDULER_NAMES  # what the sampler node and the CLI offer

SCHEDULER_TOOLTIPS = {
    AUTO: "the model's own: its folder's scheduler, else its family's (euler_ancestral for SD1.5, EDM euler for CosXL)",
    "euler_ancestral": "the paper's sampler; adds fresh noise each step, so the seed matters more",
    "euler": "deterministic Euler; smoother, steadier across seeds",
    "ddim": "deterministic DDIM (eta 0)",
    "dpmpp_2m": "DPM++ 2M; good quality in 20-30 steps",
    "dpmpp_2m_karras": "DPM++ 2M with Karras sigmas; often the best at 15-25 steps",
    "unipc": "UniPC; good results at very few steps (10-20)",
}


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler (schedulers hold per-run state, so one per run) of the named kind."""
    try:
        cls, overrides = SCHEDULERS[name]
    except KeyError:
        raise InputError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}") from None
    return cls.from_config(dict(base_config), **overrides)


def name_for_class(class_name: str | None) -> str | None:
    """The name whose scheduler is ``class_name`` with default settings (a folder's own), or None."""
    for name, (cls, overrides) in SCHEDULERS.items():
        if cls.__name__ == class_name and not overrides:
            return name
    return None
