"""IP2P Instruction: the edit, in words, encoded once per (model, text)."""

from __future__ import annotations

from comfy_api.latest import io

from ..pipeline_core import encode_instruction
from .loader import cached_model
from .types import CATEGORY, ConditioningType, ModelType


class IP2PInstruction(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PInstruction",
            display_name="IP2P Instruction",
            category=CATEGORY,
            description=(
                "Encodes the edit instruction (and an optional negative prompt) with the model's text encoder. "
                "Write the change, not the result: 'make it winter', 'turn the car red'. Encodings are cached, "
                "so re-queuing with a new seed does not re-encode."
            ),
            inputs=[
                ModelType.Input("model", tooltip="The model from IP2P Load Model; use the same one in the sampler."),
                io.String.Input(
                    "instruction",
                    multiline=True,
                    default="make it look like a watercolor painting",
                    tooltip=(
                        "What to change, as an imperative sentence ('add fireworks to the sky'). Short and "
                        "concrete works best; CLIP reads the first 75 tokens. Text guidance sets how strongly "
                        "it is followed."
                    ),
                ),
                io.String.Input(
                    "negative",
                    multiline=True,
                    default="",
                    tooltip=(
                        "What to steer away from ('blurry, distorted'). Empty is the paper's setting and usually "
                        "best: the negative replaces the empty text in both guidance references, so it shifts "
                        "the whole edit."
                    ),
                ),
            ],
            outputs=[
                ConditioningType.Output(
                    display_name="conditioning",
                    tooltip="The encoded instruction; works only with the sampler of the same model.",
                )
            ],
        )

    @classmethod
    def execute(cls, model, instruction: str, negative: str) -> io.NodeOutput:
        return io.NodeOutput(encode_instruction(cached_model(model), instruction, negative))
