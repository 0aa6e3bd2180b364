"""IP2P Load Model: a picked name (or a typed Hub id) -> a model held by the shared cache."""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import io

from ..pipeline_core import MODEL_CACHE, ModelKey
from ..pipeline_core.errors import InputError
from ..pipeline_core.models.precision import PRECISIONS
from . import model_paths
from .types import CATEGORY, ModelType


class IP2PModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IP2PModelLoader",
            display_name="IP2P Load Model",
            category=CATEGORY,
            description=(
                "Loads an InstructPix2Pix-family model — SD1.x IP2P (instruct-pix2pix, MagicBrush), SDXL "
                "InstructPix2Pix or CosXL Edit, recognised from the file itself — from models/instructpix2pix, "
                "models/checkpoints or models/diffusers, or the pack's embedded toy demo model (coloured shapes). "
                "The log names the family it found. Loaded once and shared by every IP2P node; ComfyUI's 'Unload "
                "models' frees it and the next run reloads it. Nothing is downloaded unless you type a hub_id."
            ),
            inputs=[
                io.Combo.Input(
                    "model",
                    options=model_paths.list_choices(),
                    tooltip=(
                        "The editing model: single files from models/instructpix2pix and models/checkpoints, "
                        "diffusers folders (with model_index.json) from models/diffusers. It must be an "
                        "InstructPix2Pix-family model (8-channel UNet: instruct-pix2pix-00-22000.safetensors, a "
                        "MagicBrush fine-tune, sdxl-instructpix2pix-768, cosxl_edit.safetensors); a plain SD/SDXL "
                        "checkpoint is refused because it would ignore the picture. Press R after adding files. "
                        "The last entry, toy-ip2p, is a tiny demo model shipped with the pack: it only knows "
                        "32x32 pictures of coloured shapes and instructions like 'make the circle red' (best at "
                        "text guidance 3, image guidance 1.5); try it with "
                        "the 'Toy demo, no download' workflow template."
                    ),
                ),
                io.String.Input(
                    "hub_id",
                    default="",
                    tooltip=(
                        "Leave empty to use 'model'. A Hugging Face id such as timbrooks/instruct-pix2pix is "
                        "used instead, downloaded once into the Hugging Face cache (the only time this pack "
                        "uses the network); a local folder or file path also works, and 'toy' is the embedded demo "
                        "model."
                    ),
                ),
                io.Combo.Input(
                    "precision",
                    options=list(PRECISIONS),
                    default="auto",
                    tooltip=(
                        "Number format of the weights. auto: fp16 on GPUs, bf16 on CPUs with fast bf16 "
                        "(about 3x faster than fp32 there), else fp32; the VAE stays in fp32 wherever fp16 "
                        "would turn pictures black. Results differ from fp32 only in fine detail."
                    ),
                ),
            ],
            outputs=[
                ModelType.Output(
                    display_name="model",
                    tooltip="The loaded model; connect it to IP2P Instruction and IP2P Dual-Guidance Sampler.",
                )
            ],
        )

    @classmethod
    def execute(cls, model: str, hub_id: str, precision: str) -> io.NodeOutput:
        source = model_paths.resolve(model, hub_id)
        key = MODEL_CACHE.key_for(source, precision, mm.get_torch_device())
        MODEL_CACHE.get(key)  # load here, so a wrong file fails on this node, with its reason
        return io.NodeOutput(key)


def model_key(value) -> ModelKey:
    """What an IP2P_MODEL socket carries, checked: the ``ModelKey`` of a cache entry."""
    if not isinstance(value, ModelKey):
        raise InputError(f"expected a model from IP2P Load Model, got {type(value).__name__}")
    return value


def cached_model(key: ModelKey):
    """The cache entry an IP2P_MODEL socket names (loaded again if the cache let it go)."""
    return MODEL_CACHE.get(model_key(key))
