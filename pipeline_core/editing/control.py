"""ControlNet steering the edit: a :class:`Control` on the conditioning, and its residuals in every UNet pass.

As diffusers' ControlNet pipelines do under classifier-free guidance, each ControlNet runs once per UNet pass
(all three of the paper's passes, or those the scales need): on the same 4-channel scaled latents, with that
pass's text embeddings (and SDXL's pooled text and size ids), with the hint. Its residuals, times the
strength, summed over the ControlNets, are added to the UNet's skip connections and middle block. The image
latent never reaches a ControlNet: it was trained on text-to-image latents.

Conventions:

- The hint is a ComfyUI IMAGE ``[b,H,W,3]`` in 0..1 (what a Canny or depth preprocessor outputs, and what
  SD ControlNets were trained on: diffusers feeds them 0..1 too). Any size: it is stretched to its picture's
  size, cut with the picture when crop-to-mask edits a box, and resized and padded to the working frame
  exactly as the picture is. One hint serves every picture of a batch; ``b`` hints serve ``b`` pictures in order.
- ``start`` / ``end`` are fractions of the whole schedule: step ``i`` of ``N`` (counted from the schedule's
  beginning, also when ``denoise`` < 1 skips the first ones) is steered when ``start <= i/N < end``. That is
  diffusers' ``control_guidance_start/end`` on a grid of steps, and ComfyUI's Apply ControlNet (Advanced) up to
  its mapping of percents to noise levels (it compares sigmas, so its cut can fall one step either side).
  ``end`` 1 steers every step; ``end <= start`` none.
- Strength 0 or no steered step: the ControlNet is left out completely, so the edit is bit for bit the one
  without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import limits
from ..errors import InputError
from ..models.controlnet import LoadedControlNet
from .checks import check_float
from .images import padding_for, to_rgb
from .resolution import resize_image


@dataclass(frozen=True)
class Control:
    """One ControlNet with its hint and how strongly and when it steers."""

    controlnet: LoadedControlNet
    hint: torch.Tensor  # IMAGE [b,H,W,3], 0..1, float32 on the CPU
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0

    @property
    def active(self) -> bool:
        """False when it can change nothing: then it is not run at all."""
        return self.strength > 0.0 and self.end > self.start

    def steers(self, fraction: float) -> bool:
        return self.start <= fraction < self.end


def make_control(controlnet: LoadedControlNet, hint: torch.Tensor, strength: float = 1.0, start: float = 0.0,
                 end: float = 1.0) -> Control:
    """A checked :class:`Control`; an :class:`InputError` says which value is wrong."""
    if not isinstance(controlnet, LoadedControlNet):
        raise InputError(f"expected a loaded ControlNet, got {type(controlnet).__name__}")
    if isinstance(hint, torch.Tensor) and hint.ndim == 3:
        hint = hint[None]
    # Grey edge maps become RGB, alpha is dropped, 8-bit values are scaled: the same rules as the pictures.
    hint = to_rgb(hint).float().cpu().contiguous()
    strength = check_float(strength, "ControlNet strength", limits.CONTROL_STRENGTH, " (1 is the usual)")
    start = check_float(start, "ControlNet start", limits.CONTROL_START)
    end = check_float(end, "ControlNet end", limits.CONTROL_END)
    if start > end:
        raise InputError(f"ControlNet start ({start:g}) is after its end ({end:g}); the ControlNet would never steer "
                         "— set start below end (0 and 1 steer every step)")
    return Control(controlnet, hint, strength, start, end)


def add_control(cond, control: Control):
    """``cond`` with ``control`` appended: chained ControlNets all steer, their residuals summed."""
    if not isinstance(control, Control):
        raise InputError(f"expected a ControlNet control, got {type(control).__name__}")
    return dataclasses.replace(cond, controls=(*cond.controls, control))


def check_hints(controls: Sequence[Control], pictures: int) -> None:
    """Each hint batch is 1 (shared) or one per picture: checked before any model work."""
    for control in controls:
        b = control.hint.shape[0]
        if b not in (1, pictures):
            raise InputError(
                f"the ControlNet {control.controlnet.name} has {b} hint images for {pictures} pictures; give one "
                "hint for all pictures or one per picture"
            )


def hint_frame(hint: torch.Tensor, picture_size: tuple[int, int], box: tuple[int, int, int, int],
               content: tuple[int, int], multiple: int) -> torch.Tensor:
    """One picture's hint ``[1,H',W',3]`` as the model sees the picture: ``[1,3,h,w]``, its working frame.

    Stretched to the picture's size, cut to the edited ``box`` (top, left, bottom, right), resized to the
    working ``content`` size and padded to the frame like :func:`.images.comfy_to_vae` pads the picture.
    """
    top, left, bottom, right = box
    if tuple(hint.shape[1:3]) != tuple(picture_size):
        hint = resize_image(hint, picture_size)
    hint = resize_image(hint[:, top:bottom, left:right], content)
    x = hint.permute(0, 3, 1, 2)
    h, w = content
    pad_h, pad_w = padding_for(h, w, multiple)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x.contiguous()


@dataclass
class BatchControl:
    """One :class:`Control` prepared for a batch: its hints at the working frame, one per item."""

    control: Control
    hints: torch.Tensor  # [n,3,h,w]

    def residuals(self, latents: torch.Tensor, t, encoder_states: torch.Tensor, passes: int,
                  added_cond: dict | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(down residuals, mid residual) for the UNet's batch of ``passes`` x items, already times strength."""
        module = self.control.controlnet.module
        dtype = module.dtype
        hint = torch.cat([self.hints] * passes).to(latents.device, dtype)
        kwargs = {} if added_cond is None else {"added_cond_kwargs": added_cond}
        down, mid = module(
            latents.to(dtype), t, encoder_hidden_states=encoder_states, controlnet_cond=hint,
            conditioning_scale=self.control.strength, return_dict=False, **kwargs,
        )
        return list(down), mid


def sum_residuals(parts: list[tuple[list[torch.Tensor], torch.Tensor]]):
    """Several ControlNets steer together by adding their residuals (as diffusers' MultiControlNetModel)."""
    down, mid = parts[0]
    for other_down, other_mid in parts[1:]:
        down = [a + b for a, b in zip(down, other_down)]
        mid = mid + other_mid
    return down, mid
