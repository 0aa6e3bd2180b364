"""Single-file SDXL checkpoints (SDXL InstructPix2Pix, CosXL Edit) in the original ("SGM") layout, both ways.

The layout is the one Stability's ``sgm`` code saves and ComfyUI's ``CheckpointLoaderSimple`` /
``CheckpointSave`` read and write:

- ``model.diffusion_model.*``: the UNet, LDM names as in SD1.x, plus ``label_emb.0.0`` / ``label_emb.0.2`` for
  diffusers' ``add_embedding.linear_1`` / ``linear_2`` (the pooled-text + size embedding);
- ``first_stage_model.*``: the VAE, as in SD1.x;
- ``conditioner.embedders.0.transformer.text_model.*``: CLIP-L in transformers' own names;
- ``conditioner.embedders.1.model.*``: CLIP-G (OpenCLIP bigG) in open_clip's names: ``transformer.resblocks.N``
  with ``attn.in_proj_weight``/``in_proj_bias`` (q, k, v stacked on the first axis), ``attn.out_proj``,
  ``ln_1``/``ln_2``, ``mlp.c_fc``/``mlp.c_proj``; ``token_embedding.weight``, ``positional_embedding``,
  ``ln_final`` and ``text_projection`` (open_clip multiplies ``x @ text_projection``, so it is the transpose of
  transformers' ``text_projection.weight``);
- CosXL only: ``edm_vpred.sigma_max`` / ``edm_vpred.sigma_min``, 0-d float32 tensors. ComfyUI's
  ``CheckpointSave`` writes them for a continuous-EDM v-prediction model (``comfy_extras/nodes_model_merging.py``)
  and ``supported_models.SDXL.model_type`` reads them back as ``V_PREDICTION_EDM``.

Reading goes through diffusers' own converters (``convert_ldm_unet_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``, ``convert_ldm_vae_checkpoint``) so a real file reads exactly as
``from_single_file`` reads it; writing is the inverse, reusing the SD1.x UNet/VAE names of :mod:`ldm_format`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

import torch

from . import ldm_format

UNET_PREFIX = ldm_format.UNET_PREFIX
VAE_PREFIX = ldm_format.VAE_PREFIX
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
EDM_SIGMA_MAX = "edm_vpred.sigma_max"
EDM_SIGMA_MIN = "edm_vpred.sigma_min"
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")

_ADD_EMBEDDING_TO_LDM = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}

# transformers CLIP encoder-layer names -> open_clip resblock names (q/k/v are handled apart: they are stacked).
_CLIP_LAYER_TO_OPEN_CLIP = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_CLIP_TOP_TO_OPEN_CLIP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def unet_key_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """A diffusers SDXL ``UNet2DConditionModel`` key in the LDM layout (without the prefix)."""
    for old, new in _ADD_EMBEDDING_TO_LDM.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    return ldm_format.unet_key_to_ldm(key, dict(config))


def open_clip_state_dict(text_encoder_2) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` as open_clip's text tower (keys without the prefix)."""
    state = text_encoder_2.state_dict()
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue  # a derived buffer, rebuilt on load
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
            continue
        name = key[len("text_model."):] if key.startswith("text_model.") else key
        if name in _CLIP_TOP_TO_OPEN_CLIP:
            out[_CLIP_TOP_TO_OPEN_CLIP[name]] = value
            continue
        parts = name.split(".")  # encoder.layers.N.<rest>
        if parts[:2] != ["encoder", "layers"]:
            raise KeyError(f"no open_clip name for CLIP-G key {key!r}")
        block, rest = f"transformer.resblocks.{parts[2]}", ".".join(parts[3:])
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            which, kind = rest.split(".")[1][0], rest.split(".")[2]  # "q"/"k"/"v", "weight"/"bias"
            qkv.setdefault(f"{block}.attn.in_proj_{kind}", {})[which] = value
            continue
        for old, new in _CLIP_LAYER_TO_OPEN_CLIP.items():
            if rest.startswith(old + "."):
                out[f"{block}.{new}{rest[len(old):]}"] = value
                break
        else:
            raise KeyError(f"no open_clip name for CLIP-G key {key!r}")
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"CLIP-G {key}: q, k and v are not all present ({sorted(parts)})")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def is_edm_vpred(scheduler_config: Mapping[str, Any] | None) -> bool:
    """Whether a scheduler config describes a continuous-EDM v-prediction model (CosXL)."""
    return bool(scheduler_config) and scheduler_config.get("_class_name") in EDM_SCHEDULERS and (
        scheduler_config.get("prediction_type") == "v_prediction"
    )


def edm_vpred_keys(scheduler_config: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """The ``edm_vpred.*`` keys ComfyUI writes for an EDM v-prediction model; none for any other scheduler.

    ComfyUI writes ``torch.tensor(model_sampling.sigma_max).float()``: a 0-d float32 tensor. Its value there is
    the last of 1000 log-spaced float32 sigmas (120.0 can come out as 119.99998); we write the config's value.
    """
    if not scheduler_config or scheduler_config.get("_class_name") not in EDM_SCHEDULERS:
        return {}
    if not is_edm_vpred(scheduler_config):
        # ComfyUI has no single-file marker for EDM epsilon-prediction with these keys; writing none would make
        # the file load as a plain eps model and sample wrongly, so refuse instead.
        raise ValueError(
            f"an EDM scheduler with prediction_type {scheduler_config.get('prediction_type')!r} cannot be "
            "recorded in a single file; only EDM v-prediction (CosXL) has the edm_vpred.* keys"
        )
    return {
        EDM_SIGMA_MAX: torch.tensor(float(scheduler_config["sigma_max"]), dtype=torch.float32),
        EDM_SIGMA_MIN: torch.tensor(float(scheduler_config["sigma_min"]), dtype=torch.float32),
    }


def edm_vpred_sigmas(checkpoint: Mapping[str, torch.Tensor]) -> tuple[float, float] | None:
    """``(sigma_min, sigma_max)`` from a file's ``edm_vpred.*`` keys, as ComfyUI reads them; None without them.

    ComfyUI needs only ``sigma_max`` to take the file for EDM v-prediction; ``sigma_min`` defaults to 0.002.
    """
    if EDM_SIGMA_MAX not in checkpoint:
        return None
    sigma_min = float(checkpoint[EDM_SIGMA_MIN].item()) if EDM_SIGMA_MIN in checkpoint else 0.002
    return sigma_min, float(checkpoint[EDM_SIGMA_MAX].item())


def to_ldm_state_dict(unet, vae, text_encoder, text_encoder_2, scheduler_config=None) -> dict[str, torch.Tensor]:
    """One SGM-layout state dict holding the four modules (and CosXL's ``edm_vpred.*`` keys)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.state_dict().items():
        out[UNET_PREFIX + unet_key_to_ldm(key, unet.config)] = value
    # The VAE and CLIP-L are laid out as in SD1.x; only CLIP-L's prefix differs.
    out.update(ldm_format.vae_to_ldm(vae))
    out.update(ldm_format.clip_to_ldm(text_encoder, CLIP_L_PREFIX))
    for key, value in open_clip_state_dict(text_encoder_2).items():
        out[CLIP_G_PREFIX + key] = value
    out.update(edm_vpred_keys(scheduler_config))
    return {k: v.detach().contiguous() for k, v in out.items()}


def match_text_encoder_2_keys(state: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """:func:`ldm_format.match_text_encoder_keys` for CLIP-G: ``text_projection`` sits outside ``text_model``."""
    projection = {k: v for k, v in state.items() if k.startswith("text_projection.")}
    rest = {k: v for k, v in state.items() if k not in projection}
    return {**ldm_format.match_text_encoder_keys(rest, expected), **projection}


def from_ldm_state_dict(checkpoint: Mapping[str, torch.Tensor], unet_config: Mapping, vae_config: Mapping,
                        text_encoder_2_config: Mapping):
    """Split an SGM-layout checkpoint into diffusers/transformers state dicts: unet, vae, CLIP-L, CLIP-G.

    CLIP-L keys come back with the ``text_model.`` level; pass them through
    :func:`ldm_format.match_text_encoder_keys` for the installed transformers.
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    checkpoint = dict(checkpoint)
    unet = convert_ldm_unet_checkpoint(checkpoint, dict(unet_config))
    vae = convert_ldm_vae_checkpoint(checkpoint, dict(vae_config))
    clip_l = convert_ldm_clip_checkpoint(checkpoint)  # conditioner.embedders.0.transformer.* -> text_model.*
    # convert_open_clip_checkpoint reads only ``text_model.config.hidden_size`` (when the file lacks a
    # text_projection): a stand-in with the config is enough, no module needs to be built here.
    stand_in = SimpleNamespace(config=SimpleNamespace(**dict(text_encoder_2_config)))
    clip_g = convert_open_clip_checkpoint(stand_in, checkpoint, prefix=CLIP_G_PREFIX)
    return unet, vae, clip_l, clip_g
