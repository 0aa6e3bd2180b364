"""IP2P Apply ControlNet: a ControlNet from ComfyUI's ``controlnet`` folder steering the edit.

Loading, checking and steering are ``pipeline_core``'s (:mod:`pipeline_core.models.controlnet`,
:mod:`pipeline_core.editing.control`); this node picks the file, loads it for the conditioning's model through
the shared ControlNet cache and appends it to the conditioning.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..pipeline_core import limits
from ..pipeline_core.editing.conditioning import Conditioning
from ..pipeline_core.editing.control import add_control, make_control
from ..pipeline_core.errors import InputError
from ..pipeline_core.models.controlnet import CONTROLNET_CACHE
from . import model_paths
from .loader import cached_model
from .types import CATEGORY, ConditioningType


class IP2PApplyControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PApplyControlNet",
            display_name="IP2P Apply ControlNet",
            category=CATEGORY,
            description=(
                "Steers the edit with a ControlNet of the IP2P model's base model (an SD1.5 ControlNet for SD1.5 "
                "IP2P models): with a Canny map of the input the edit keeps the picture's edges, with a depth map "
                "its shapes. Chain several to combine them. Works with masks, denoise, crop-to-mask and batches."
            ),
            inputs=[
                ConditioningType.Input(
                    "conditioning",
                    tooltip="The instruction from IP2P Instruction (or another Apply ControlNet, to chain them).",
                ),
                io.Combo.Input(
                    "control_net",
                    options=model_paths.controlnet_choices(),
                    tooltip=(
                        "A ControlNet file in models/controlnet (.safetensors in the original or diffusers layout, "
                        "or .pth), made for the IP2P model's base model, e.g. control_v11p_sd15_canny for SD1.5."
                    ),
                ),
                io.Image.Input(
                    "image",
                    tooltip=(
                        "The hint the ControlNet reads (e.g. from Canny or a depth preprocessor), any size: it is "
                        "stretched to the edited picture and cropped with it. One hint for every picture, or one "
                        "per picture."
                    ),
                ),
                io.Float.Input(
                    "strength",
                    default=limits.CONTROL_STRENGTH.default,
                    min=limits.CONTROL_STRENGTH.low,
                    max=limits.CONTROL_STRENGTH.high,
                    step=limits.CONTROL_STRENGTH.step,
                    tooltip=(
                        "How strongly the hint holds the picture: 0.5-1 usual, higher locks the structure but may "
                        "fight the instruction; 0 turns the ControlNet off (the edit is exactly the one without it)."
                    ),
                ),
                io.Float.Input(
                    "start",
                    default=limits.CONTROL_START.default,
                    min=limits.CONTROL_START.low,
                    max=limits.CONTROL_START.high,
                    step=limits.CONTROL_START.step,
                    tooltip=(
                        "Fraction of the steps at which steering begins (0 = from the first step). Starting later "
                        "lets the instruction set the layout first."
                    ),
                ),
                io.Float.Input(
                    "end",
                    default=limits.CONTROL_END.default,
                    min=limits.CONTROL_END.low,
                    max=limits.CONTROL_END.high,
                    step=limits.CONTROL_END.step,
                    tooltip=(
                        "Fraction of the steps at which steering stops (1 = to the last step). 0.5-0.8 fixes the "
                        "structure early and leaves the fine detail free; 0 turns the ControlNet off."
                    ),
                ),
            ],
            outputs=[
                ConditioningType.Output(
                    display_name="conditioning",
                    tooltip="The instruction with this ControlNet added; connect it to the sampler or chain another.",
                )
            ],
        )

    @classmethod
    def execute(cls, conditioning, control_net: str, image: torch.Tensor, strength: float, start: float,
                end: float) -> io.NodeOutput:
        if not isinstance(conditioning, Conditioning):
            raise InputError(f"expected IP2P conditioning from the instruction node, got {type(conditioning).__name__}")
        model = cached_model(conditioning.model_key)
        loaded = CONTROLNET_CACHE.get(model_paths.resolve_controlnet(control_net), model)
        return io.NodeOutput(add_control(conditioning, make_control(loaded, image, strength, start, end)))
