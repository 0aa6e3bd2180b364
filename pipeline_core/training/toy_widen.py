"""Stage 4 of the toy recipe: double the UNet's width without changing what it computes, then train on.

Stage 3 left the toy model at 93% on 300 held-out triplets (89% over four draws), and what fails is binding the
instruction to a shape: recolouring or removing the wrong one. More training of the ~1 M-parameter UNet did not
move it (every stage-3 checkpoint from 2,000 to 6,000 steps measured 87-93%), and a wider UNet trained from
nothing costs hours on a 2-core CPU. So the trained UNet is *widened* (Net2Net, Chen et al. 2016): every channel
is duplicated, each weight reading a duplicated channel is halved, and the wider network computes exactly the
same function (:func:`widen_unet`; a test checks it to float precision). Training then continues from 93%
instead of from noise, with four times the parameters.

Why duplication is exact in every part of a diffusers UNet, with new channel ``k`` a copy of old ``k // 2``:

- convolutions and linears: outputs are repeated, inputs repeated and halved, so each sum is unchanged;
- GroupNorm keeps its number of groups, so new group ``g`` holds copies of exactly old group ``g``'s channels
  (mean and variance unchanged); LayerNorm over copied channels likewise;
- the skip concatenations and GEGLU's ``[hidden, gate]`` split are blocks of the channel axis, and
  ``repeat_interleave`` keeps blocks in place;
- attention keeps its number of heads, so each head's dimension doubles: the dot product of copied vectors
  doubles while the 1/sqrt(d) scale shrinks by sqrt(2), hence queries are scaled by 1/sqrt(2);
- the timestep embedding of 2C channels contains the C-channel one (frequency ``j`` of C is frequency ``2j`` of
  2C), so the first time linear reads the old features from their new places and ignores the rest.

Exact copies receive exact copy gradients and would stay copies forever; a little noise (``noise`` x each
tensor's std) breaks the symmetry, as Net2Net does.

Stage 5 (:func:`focus`) trains the wide model a little longer with removal drawn most (see :data:`FOCUS`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .toy_refine import CONTINUED_TRAINING, train_on_fresh_triplets
from .trainer import TrainConfig

WIDEN = {
    "factor": 2,
    "noise": 0.01,
    "triplets": 40_000,
    # Stage 3's held-out failures after its own re-weighting: recolour and remove ~79%, morph ~88% (four draws).
    "kind_weights": {"recolor": 0.28, "morph": 0.22, "remove": 0.28, "add": 0.12, "darker": 0.10},
    "train": {**CONTINUED_TRAINING, "steps": 8000, "learning_rate": 2e-4, "text_encoder_lr": 1e-4,
              "warmup_steps": 200, "cosine_decay": True, "seed": 11},
}
# Above stage 3's indices (10,000,000 + its 40,000), so stage 4 sees pictures no earlier stage trained on.
FIRST_INDEX = 20_000_000

# Stage 5: the wide model at the end of stage 4 still removed the wrong shape in 13% of held-out removals (300
# triplets) while every other kind passed 90%: a short run at a low learning rate with removal drawn most.
FOCUS = {
    "triplets": 20_000,
    "kind_weights": {"recolor": 0.2, "morph": 0.2, "remove": 0.4, "add": 0.1, "darker": 0.1},
    "train": {**CONTINUED_TRAINING, "steps": 3000, "learning_rate": 1e-4, "text_encoder_lr": 5e-5,
              "warmup_steps": 100, "cosine_decay": True, "seed": 13},
}
FOCUS_FIRST_INDEX = 30_000_000


def widen_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**WIDEN["train"], **overrides})


def _time_features(old: int, new: int) -> torch.Tensor:
    """For each of the ``old`` sinusoid features (cos block, then sin block), its index among ``new``'s."""
    half_old, half_new = old // 2, new // 2
    step = half_new // half_old
    j = torch.arange(half_old)
    return torch.cat([j * step, half_new + j * step])


@torch.no_grad()
def widen_unet(unet, factor: int = 2, noise: float = 0.0, seed: int = 0):
    """A UNet ``factor`` times as wide as ``unet`` that computes the same (``noise=0``); see the module docstring.

    Needs diffusers' time embedding without a frequency shift (``freq_shift=0``, SD's and the toy's), so that the
    narrow sinusoid is a subset of the wide one.
    """
    from diffusers import UNet2DConditionModel

    cfg = dict(unet.config)
    if cfg.get("freq_shift", 0) != 0 or factor < 1 or int(factor) != factor:
        raise ValueError("widen_unet needs freq_shift=0 and a whole factor")
    wide_cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    wide_cfg["block_out_channels"] = tuple(c * factor for c in cfg["block_out_channels"])
    wide = UNet2DConditionModel(**wide_cfg)
    old_state = unet.state_dict()
    generator = torch.Generator().manual_seed(seed)
    time_cols = _time_features(cfg["block_out_channels"][0], wide_cfg["block_out_channels"][0])
    new_state = {}
    for name, w_new in wide.state_dict().items():
        w = old_state[name].float()
        if name == "time_embedding.linear_1.weight":
            out = torch.zeros(w_new.shape)
            out[:, time_cols] = w.repeat_interleave(factor, dim=0)
            new_state[name] = out
            continue
        for dim, (a, b) in enumerate(zip(w.shape, w_new.shape)):
            if b == a:
                continue
            if b != a * factor:
                raise ValueError(f"{name}: cannot widen {tuple(w.shape)} to {tuple(w_new.shape)}")
            w = w.repeat_interleave(factor, dim=dim)
            # Dimension 1 of a conv / linear weight reads channels: copies split what one channel carried.
            if dim == 1:
                w = w / factor
        if name.endswith("to_q.weight") or name.endswith("to_q.bias"):
            # Each head's dimension grew by ``factor``: keep q.k / sqrt(d) as it was.
            w = w / math.sqrt(factor)
        if noise and w.dim() > 1:
            w = w + noise * w.std() * torch.randn(w.shape, generator=generator)
        new_state[name] = w
    wide.load_state_dict(new_state)
    dtype = next(unet.parameters()).dtype
    return wide if dtype == torch.float32 else wide.to(dtype)


def widen_and_train(out: Path, unet, vae, text_encoder, tokenizer, scheduler_config, config: TrainConfig | None = None,
                    n_triplets: int = WIDEN["triplets"], progress: bool = True):
    """Stage 4 in ``out/widen``: returns (unet, text_encoder) widened and trained on. Resumes a cut-off run."""
    config = config or widen_config()

    def widen(vae, unet):
        return vae, widen_unet(unet.float(), WIDEN["factor"], WIDEN["noise"], seed=config.seed)

    unet, text_encoder, _ = train_on_fresh_triplets(
        Path(out) / "widen", unet, vae, text_encoder, tokenizer, scheduler_config, config, n_triplets,
        WIDEN["kind_weights"], FIRST_INDEX, progress, before_training=widen,
        facts={"factor": WIDEN["factor"], "noise": WIDEN["noise"]})
    return unet, text_encoder


def focus_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**FOCUS["train"], **overrides})


def focus(out: Path, unet, vae, text_encoder, tokenizer, scheduler_config, config: TrainConfig | None = None,
          n_triplets: int = FOCUS["triplets"], progress: bool = True):
    """Stage 5 in ``out/focus``: the wide model trained on, removal drawn most; returns (unet, text_encoder)."""
    unet, text_encoder, _ = train_on_fresh_triplets(
        Path(out) / "focus", unet, vae, text_encoder, tokenizer, scheduler_config, config or focus_config(),
        n_triplets, FOCUS["kind_weights"], FOCUS_FIRST_INDEX, progress)
    return unet, text_encoder
