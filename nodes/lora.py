"""IP2P Load LoRA: a LoRA file from ComfyUI's ``loras`` folder on top of an IP2P model; chainable."""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..pipeline_core import LoraRef
from ..pipeline_core.errors import InputError
from ..pipeline_core.models.lora import STRENGTH_RANGE
from .loader import cached_model, model_key
from .types import CATEGORY, ModelType

LORA_FOLDER = "loras"


class IP2PLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PLoraLoader",
            display_name="IP2P Load LoRA",
            category=CATEGORY,
            description=(
                "Applies a LoRA from models/loras to an InstructPix2Pix model: kohya/A1111 files (lora_unet_…, "
                "with text-encoder keys too) and diffusers/peft files, such as the pack's trainer writes. Chain "
                "several for a stack. The base weights stay loaded once: changing a strength or switching LoRAs "
                "reads nothing from disk again. The LoRA must be made for the model's family (SD1.x LoRAs for SD1.x "
                "IP2P models, SDXL LoRAs for SDXL-IP2P and CosXL Edit); any other is refused with what matched."
            ),
            inputs=[
                ModelType.Input("model", tooltip="The model from IP2P Load Model (or another IP2P Load LoRA)."),
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list(LORA_FOLDER),
                    tooltip="A LoRA file in models/loras (press R after adding files).",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=STRENGTH_RANGE[0],
                    max=STRENGTH_RANGE[1],
                    step=0.05,
                    tooltip=(
                        "How much of the LoRA to apply, on the UNet and the text encoder alike: 1 as trained, 0 "
                        "exactly the model without it, negative values push the other way."
                    ),
                ),
            ],
            outputs=[
                ModelType.Output(
                    display_name="model",
                    tooltip="The model with this LoRA on top; connect it to IP2P Instruction and the sampler.",
                )
            ],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength: float) -> io.NodeOutput:
        base = model_key(model)
        path = folder_paths.get_full_path(LORA_FOLDER, lora_name)
        if path is None:
            raise InputError(f"LoRA {lora_name!r} is not in models/loras any more; press R and pick another")
        key = base.with_lora(LoraRef.of(path, strength))
        cached_model(key)  # reads and checks the file now, so a LoRA that does not fit fails on this node
        return io.NodeOutput(key)
