"""The denoiser: one UNet call with the image condition, the family's text conditioning and dual guidance.

As in k-diffusion, the sampling loop (:mod:`.sampling`) only asks "what is the guided prediction for these
latents at this timestep"; everything a prediction depends on — which guidance passes run, the image latent
and its scaling, the text embeddings, SDXL's pooled text and size conditioning, ControlNet hints — is set up here
once per batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..models.cache import CachedModel
from . import guidance
from .conditioning import Conditioning
from .control import BatchControl, sum_residuals
from .step_cache import StepCache


def per_item_scales(s_t, s_i, n: int, device) -> tuple:
    """(s_t, s_i, passes) for a batch: floats where every item has the same scale (the arithmetic of a single
    edit, bit for bit), else ``[n,1,1,1]`` tensors. Every item must need the same passes (batches are grouped so).
    """
    s_t = [float(s_t)] * n if isinstance(s_t, (int, float)) else [float(v) for v in s_t]
    s_i = [float(s_i)] * n if isinstance(s_i, (int, float)) else [float(v) for v in s_i]
    passes = {guidance.required_passes(a, b) for a, b in zip(s_t, s_i)}
    if len(passes) != 1:
        raise ValueError(f"a batch's items need different guidance passes: {sorted(passes)}")

    def one(values):
        if len(set(values)) == 1:
            return values[0]
        return torch.tensor(values, dtype=torch.float32, device=device).view(n, 1, 1, 1)

    return one(s_t), one(s_i), passes.pop()


class Denoiser:
    """Guided model output for a batch of ``n`` items that need the same guidance passes (scales may differ).

    ``image_latents`` ``[n,4,h,w]`` are unscaled VAE latents of each item's picture; the family says how the UNet
    sees them (:meth:`Family.image_latent_scale`). ``time_ids`` ``[n,k]`` is the family's size conditioning, or
    None. The passes are batched in the paper's order (text, image, uncond), only those the scales need.
    ``controls``: the conditioning's active ControlNets with their hints at this batch's working frame
    (see :mod:`.control`); each runs on every pass of the steps it steers.
    ``fast_interval``: fast mode (see :mod:`.step_cache`), the whole UNet on one call of every ``fast_interval``
    and its shallow branch on cached deep features in between; None runs the whole UNet on every call.
    ``steps``: the number of calls the sampler will make, so fast mode runs the last one whole.
    ``unet_rows``: at most this many batch rows (passes x items) per UNet call, None: all at once. Low-VRAM mode
    runs one row at a time (:mod:`.vram`); in fast mode each group of rows keeps its own step cache.
    """

    def __init__(self, model: CachedModel, cond: Conditioning, image_latents: torch.Tensor,
                 s_t: float | Sequence[float], s_i: float | Sequence[float],
                 time_ids: torch.Tensor | None = None, controls: Sequence[BatchControl] = (),
                 fast_interval: int | None = None, steps: int | None = None, unet_rows: int | None = None):
        c = model.components
        self.unet = c.unet
        self.dtype = c.precision.unet
        n = len(image_latents)
        device = c.device
        self.s_t, self.s_i, self.passes = per_item_scales(s_t, s_i, n, device)
        rows = n * len(self.passes)
        step = rows if unet_rows is None else max(1, min(int(unet_rows), rows))
        self.row_groups = [slice(i, min(i + step, rows)) for i in range(0, rows, step)]
        # A new cache per Denoiser (i.e. per batch) and per group of rows: kept features never cross batches,
        # edits or rows.
        self.run_unets = [self.unet if fast_interval is None else StepCache(c.unet, fast_interval, steps)
                          for _ in self.row_groups]
        img = image_latents.to(device, torch.float32) * c.spec.image_latent_scale(c)
        pass_images = {guidance.TEXT: img, guidance.IMAGE: img, guidance.UNCOND: torch.zeros_like(img)}
        self.cond_images = torch.cat([pass_images[p] for p in self.passes])

        def per_pass(instruction: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
            by_pass = {guidance.TEXT: instruction, guidance.IMAGE: negative, guidance.UNCOND: negative}
            return torch.cat([by_pass[p].to(device, self.dtype).expand(n, *by_pass[p].shape[1:]) for p in self.passes])

        self.encoder_states = per_pass(cond.instruction_embeds, cond.negative_embeds)
        self.added_cond = None
        if cond.instruction_pooled is not None:
            # SDXL's micro-conditioning: pooled text per pass, the same size ids for every pass of an item.
            if time_ids is None:
                raise ValueError("a family with pooled text conditioning needs time ids")
            self.added_cond = {
                "text_embeds": per_pass(cond.instruction_pooled, cond.negative_pooled),
                # float32 whatever the UNet's dtype: the UNet embeds them in float32 (diffusers' Timesteps, ComfyUI's
                # Timestep embedder), and bf16 would round the sizes first (1023 px -> 1024).
                "time_ids": time_ids.to(device, torch.float32).repeat(len(self.passes), 1),
            }
        self.channels_last = self.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        self.controls = list(controls)

    @property
    def batch_multiplier(self) -> int:
        """UNet batch entries per item: the number of guidance passes."""
        return len(self.passes)

    def __call__(self, scaled_latents: torch.Tensor, t, fraction: float = 0.0) -> torch.Tensor:
        """Guided prediction (noise, or v for v-prediction models) for ``scheduler.scale_model_input`` output.

        ``fraction``: where this step lies in the whole schedule (step index / steps), for ControlNet start/end.
        """
        noisy = torch.cat([scaled_latents] * len(self.passes))
        unet_in = torch.cat([noisy, self.cond_images], dim=1).to(self.dtype)
        if self.channels_last:
            unet_in = unet_in.contiguous(memory_format=torch.channels_last)
        kwargs = {} if self.added_cond is None else {"added_cond_kwargs": self.added_cond}
        steering = [c for c in self.controls if c.control.steers(fraction)]
        if steering:
            # The ControlNets see the 4-channel noisy latent of every pass, never the image latent.
            down, mid = sum_residuals([
                c.residuals(noisy, t, self.encoder_states, len(self.passes), self.added_cond) for c in steering
            ])
            kwargs["down_block_additional_residuals"] = down
            kwargs["mid_block_additional_residual"] = mid
        if len(self.row_groups) == 1:
            out = self.run_unets[0](unet_in, t, encoder_hidden_states=self.encoder_states, return_dict=False,
                                **kwargs)[0]
        else:
            out = torch.cat([run(unet_in[rows], t, encoder_hidden_states=self.encoder_states[rows], return_dict=False,
                                 **_rows_of(kwargs, rows))[0]
                             for run, rows in zip(self.run_unets, self.row_groups)])
        predictions = dict(zip(self.passes, out.float().chunk(len(self.passes))))
        # Guidance is linear in the prediction, so it is the same for eps, v and x0 predictions.
        return guidance.combine(predictions, self.s_t, self.s_i)


def _rows_of(kwargs: dict, rows: slice) -> dict:
    """The UNet's extra inputs (SDXL's added conditions, ControlNet residuals) for some rows of its batch."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, dict):
            out[key] = {k: v[rows] for k, v in value.items()}
        elif isinstance(value, (list, tuple)):
            out[key] = [v[rows] for v in value]
        else:
            out[key] = value[rows]
    return out
