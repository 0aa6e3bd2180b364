"""Fast mode: a step cache in the style of DeepCache (Ma, Fang, Wang, "DeepCache: Accelerating Diffusion Models
for Free", CVPR 2024).

Adjacent denoising steps change the UNet's deep, low-resolution features very little; what moves from step to
step is carried mostly by the shallow skip connections. So on a *full* step the whole UNet runs and the input of
its shallowest up block (``up_blocks[-1]``, the features the whole deep path produced, besides its skip
connections) is kept; on the *cached* steps after it only the shallowest branch runs — ``conv_in`` and
``down_blocks[0]`` for fresh skip connections, then ``up_blocks[-1]`` on the kept deep features and the output
head — which is a small part of an SD1.5 UNet's work.

The schedule is DeepCache's uniform one — of every ``interval`` UNet calls the first is full, the others cached,
the very first call always full — plus a full last call: the last step draws the fine detail the picture keeps,
and on the toy model's held-out set a cached last step cost 4-7 points of success at interval 3 and 3-10 at
interval 2 (text guidance 3 / 7.5) that one more full call buys back. Interval 1 makes every call full, which is
exactly the plain UNet.

One :class:`StepCache` serves one batch of one edit (the :class:`~.denoiser.Denoiser` builds it): the kept
features belong to that batch's latents and are never shared between batches or calls.

The shallow branch repeats the first and last lines of diffusers' ``UNet2DConditionModel.forward`` (time and
added-condition embeddings, ``conv_in``, the first down block, the last up block, the output head) with the
same modules, so LoRA layers injected into them by peft apply as in a full call, the Cancel hooks on the
blocks fire, and SDXL's ``added_cond_kwargs`` (pooled text, size ids) are embedded as diffusers embeds them.
ControlNet residuals are taken as the full call takes them: on a cached step those of the shallow skip
connections are added to them; the middle block's and the deeper ones only act through the kept features.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError


def check_cacheable(unet: nn.Module) -> None:
    """Refuse, before any model work, a UNet whose forward the shallow branch would not reproduce."""
    cfg = unet.config
    problem = None
    if getattr(unet, "class_embedding", None) is not None:
        problem = "it has class embeddings"
    elif cfg.get("addition_embed_type") == "image_hint":
        problem = "it takes a hint image through its addition embedding"
    elif not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks") or len(unet.down_blocks) < 2:
        problem = "it has fewer than two resolution levels"
    else:
        first = unet.down_blocks[0]
        # conv_in's output plus one per resnet of the first down block: the skip connections the last up block
        # can take from the shallow branch alone.
        shallow_skips = 1 + len(first.resnets)
        if len(unet.up_blocks[-1].resnets) > shallow_skips:
            problem = (f"its last up block takes {len(unet.up_blocks[-1].resnets)} skip connections but the shallow "
                       f"branch makes {shallow_skips}")
    if problem is not None:
        raise InputError(f"fast mode cannot run this UNet: {problem}; use speed 'quality'")


class StepCache:
    """The UNet of one batch, called like ``unet(sample, t, encoder_hidden_states=..., return_dict=False, ...)``.

    Always returns the tuple that ``return_dict=False`` gives (the only form the denoiser asks for).
    ``full_calls`` / ``cached_calls`` count what ran.
    """

    def __init__(self, unet: nn.Module, interval: int, calls: int | None = None):
        """``calls``: how many calls the sampler will make (its steps), so that the last one is full; None: not
        known, the uniform schedule alone."""
        check_cacheable(unet)
        self.unet = unet
        self.interval = int(interval)
        self.last = None if calls is None else int(calls) - 1
        self.deep: torch.Tensor | None = None
        self.calls = 0
        self.full_calls = 0
        self.cached_calls = 0

    def next_is_full(self) -> bool:
        return self.deep is None or self.calls % self.interval == 0 or self.calls == self.last

    def __call__(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = False,
                 added_cond_kwargs: dict | None = None, down_block_additional_residuals=None,
                 mid_block_additional_residual=None) -> tuple[torch.Tensor]:
        full = self.next_is_full()
        self.calls += 1
        if full:
            self.full_calls += 1
            return self._full(sample, timestep, encoder_hidden_states, added_cond_kwargs,
                              down_block_additional_residuals, mid_block_additional_residual)
        self.cached_calls += 1
        return (self._shallow(sample, timestep, encoder_hidden_states, added_cond_kwargs,
                              down_block_additional_residuals),)

    def _full(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, down_residuals, mid_residual):
        """The plain UNet call (so a full step is bit for bit the quality step), keeping the deep features."""
        kept: list[torch.Tensor] = []

        def keep(_module, args, kwargs):
            # diffusers passes hidden_states by keyword; positional kept for other callers of the block.
            kept.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        handle = self.unet.up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            kwargs = {}
            if added_cond_kwargs is not None:
                kwargs["added_cond_kwargs"] = added_cond_kwargs
            if down_residuals is not None:
                kwargs["down_block_additional_residuals"] = down_residuals
                kwargs["mid_block_additional_residual"] = mid_residual
            out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                            **kwargs)
        finally:
            handle.remove()
        self.deep = kept[-1]
        return out

    def _shallow(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, down_residuals) -> torch.Tensor:
        """conv_in + down_blocks[0] -> up_blocks[-1] on the kept deep features -> output head.

        The same lines as diffusers' forward for these parts (the arguments our sampler never passes — attention
        masks, cross-attention kwargs, adapters — left out).
        """
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)

        hidden = unet.conv_in(sample)
        skips: tuple[torch.Tensor, ...] = (hidden,)
        first = unet.down_blocks[0]
        if getattr(first, "has_cross_attention", False):
            hidden, res = first(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, res = first(hidden_states=hidden, temb=emb)
        last = unet.up_blocks[-1]
        # The last up block takes the first skip connections of the whole UNet (conv_in's, then the first down
        # block's resnets), all made by the shallow branch; the first block's downsampled output feeds the deep
        # path only, which is cached.
        skips = (skips + tuple(res))[: len(last.resnets)]
        if down_residuals is not None:
            skips = tuple(s + r for s, r in zip(skips, down_residuals))
        if getattr(last, "has_cross_attention", False):
            out = last(hidden_states=self.deep, temb=emb, res_hidden_states_tuple=skips,
                       encoder_hidden_states=encoder_hidden_states, upsample_size=None)
        else:
            out = last(hidden_states=self.deep, temb=emb, res_hidden_states_tuple=skips, upsample_size=None)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        return unet.conv_out(out)
