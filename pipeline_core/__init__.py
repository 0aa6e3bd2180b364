"""InstructPix2Pix editing in plain torch + diffusers. Never imports ComfyUI (the nodes adapt it)."""

from .cache import MODEL_CACHE, CachedModel, ModelCache, ModelKey, Residency
from .conditioning import Conditioning, encode_instruction
from .errors import InputError, IP2PError, ModelLoadError
from .guidance import dual_guidance, required_passes
from .loading import ModelSource, load_components, save_single_file
from .sampler import EditResult, decode_latents, edit
from .schedulers import DEFAULT_SCHEDULER, SCHEDULER_NAMES
from .seeds import PlanItem, SeedPlan, make_plan

__all__ = [
    "MODEL_CACHE", "CachedModel", "ModelCache", "ModelKey", "Residency", "Conditioning", "encode_instruction",
    "InputError", "IP2PError", "ModelLoadError", "dual_guidance", "required_passes", "ModelSource",
    "load_components", "save_single_file", "EditResult", "decode_latents", "edit", "DEFAULT_SCHEDULER",
    "SCHEDULER_NAMES", "PlanItem", "SeedPlan", "make_plan",
]
