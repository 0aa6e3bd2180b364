"""InstructPix2Pix editing in plain torch + diffusers. Never imports ComfyUI (the nodes adapt it).

The public API users' scripts rely on is what this module exports; the sub-packages are ``models`` (families,
loading, cache), ``editing`` (one edit, picture in, picture out) and ``training`` (tooling; runtime never
imports it).
"""

from .editing.conditioning import Conditioning, encode_instruction
from .editing.control import Control, add_control, make_control
from .editing.edit import EditResult, edit
from .editing.guidance import dual_guidance, required_passes
from .editing.seeds import PlanItem, SeedPlan, make_plan
from .editing.settings import EditSettings
from .editing.vae import decode_latents, encode_images
from .errors import InputError, IP2PError, ModelLoadError
from .models.cache import MODEL_CACHE, CachedModel, ModelCache, ModelKey, Residency
from .models.controlnet import CONTROLNET_CACHE, load_controlnet
from .models.families import FAMILIES
from .models.loading import ModelSource, load_components, save_single_file
from .models.lora import LoraRef
from .models.schedulers import AUTO as AUTO_SCHEDULER
from .models.schedulers import DEFAULT_SCHEDULER, SCHEDULER_CHOICES, SCHEDULER_NAMES

__all__ = [
    "MODEL_CACHE", "CachedModel", "ModelCache", "ModelKey", "Residency", "Conditioning", "encode_instruction",
    "InputError", "IP2PError", "ModelLoadError", "dual_guidance", "required_passes", "ModelSource",
    "load_components", "save_single_file", "EditResult", "decode_latents", "encode_images", "edit",
    "EditSettings", "DEFAULT_SCHEDULER", "AUTO_SCHEDULER", "SCHEDULER_CHOICES", "SCHEDULER_NAMES", "FAMILIES",
    "PlanItem", "SeedPlan", "make_plan", "LoraRef", "Control", "add_control", "make_control", "CONTROLNET_CACHE",
    "load_controlnet",
]
