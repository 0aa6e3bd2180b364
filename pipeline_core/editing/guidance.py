"""Dual classifier-free guidance of InstructPix2Pix, written once.

Brooks, Holynski, Efros, "InstructPix2Pix: Learning to Follow Image Editing Instructions" (CVPR 2023), eq. 3:

    e = e_U + s_T * (e_T - e_I) + s_I * (e_I - e_U)

with the three noise predictions batched as (instruction, image), (negative, image), (negative, zero image).
The same weights expanded, ``s_T*e_T + (s_I - s_T)*e_I + (1 - s_I)*e_U``, show which passes a pair of scales
needs: a pass whose weight is zero contributes nothing and is not run. At s_I == 1 that drops e_U (the
formula becomes ``e_I + s_T (e_T - e_I)``), and at s_T == s_I == 1 only e_T is left.
"""

from __future__ import annotations

import torch

TEXT = "text"  # instruction + image latent
IMAGE = "image"  # negative prompt + image latent
UNCOND = "uncond"  # negative prompt + zero image latent
PASS_ORDER = (TEXT, IMAGE, UNCOND)


def dual_guidance(e_t: torch.Tensor, e_i: torch.Tensor, e_u: torch.Tensor, s_t, s_i) -> torch.Tensor:
    """The paper's formula, in the same operation order as the original code and diffusers."""
    return e_u + s_t * (e_t - e_i) + s_i * (e_i - e_u)


def pass_weights(s_t: float, s_i: float) -> dict[str, float]:
    """Weight of each pass in the expanded formula; the weights always sum to 1."""
    return {TEXT: s_t, IMAGE: s_i - s_t, UNCOND: 1.0 - s_i}


def required_passes(s_t: float, s_i: float) -> tuple[str, ...]:
    """The passes whose prediction the formula needs at these scales, in batch order."""
    weights = pass_weights(float(s_t), float(s_i))
    # The weights sum to 1, so at least one of them is non-zero and the tuple is never empty.
    return tuple(name for name in PASS_ORDER if weights[name] != 0.0)


def combine(predictions: dict[str, torch.Tensor], s_t, s_i) -> torch.Tensor:
    """Guided noise from whichever passes were run (see :func:`required_passes`).

    With all three passes this is exactly :func:`dual_guidance`. With fewer, it is the same formula with the
    zero-weight terms removed, so skipping a pass changes the result by float rounding only.
    """
    if all(name in predictions for name in PASS_ORDER):
        return dual_guidance(predictions[TEXT], predictions[IMAGE], predictions[UNCOND], s_t, s_i)
    if isinstance(s_t, torch.Tensor) or isinstance(s_i, torch.Tensor):
        # Per-item scales of one batch (a guidance sweep): its items were grouped by the passes they need.
        weights = pass_weights(s_t, s_i)
    else:
        weights = pass_weights(float(s_t), float(s_i))
        missing = [n for n in PASS_ORDER if weights[n] != 0.0 and n not in predictions]
        if missing:
            raise ValueError(f"guidance at s_T={s_t}, s_I={s_i} needs the {', '.join(missing)} pass(es)")
    if set(predictions) == {TEXT, IMAGE}:
        # s_I == 1: e_I + s_T (e_T - e_I), the form the formula takes with e_U cancelled.
        return predictions[IMAGE] + s_t * (predictions[TEXT] - predictions[IMAGE])
    if set(predictions) == {TEXT}:
        return predictions[TEXT]
    out = None
    for name, pred in predictions.items():
        term = weights[name] * pred
        out = term if out is None else out + term
    return out

