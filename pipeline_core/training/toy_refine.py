"""Stage 3 of the toy recipe: sharpen the VAE's decoder, then continue the UNet on the edits it got wrong most.

Measured on the stage-2 model (100 held-out triplets, s_T 3 / s_I 1.5, 20 steps): 88% rule-checked success, with
"remove" and "morph" the weak kinds, and a VAE whose *perfect* latents already failed 3% of the rule checks (the
true edit through the VAE: morph 85%), because the decoder rounds the corners that tell a square from a circle.
Two cheap fixes, each measured before it went in (see the README's before/after table):

1. **Decoder only.** The encoder stays frozen, so every latent the UNet was trained on, and every latent the
   sampler conditions on, is unchanged; only ``post_quant_conv`` and the decoder learn to draw sharper
   outlines from them. Held-out reconstruction PSNR 30.7 -> 33.6 dB; the through-the-VAE ceiling 97% -> 100%.
2. **Continued training** of the UNet and text encoder from the stage-2 weights, on fresh triplets (indices no
   stage-2 triplet uses) with "remove" and "morph" drawn three times as often as in stage 2, a lower learning
   rate with cosine decay, and EMA: the paper's objective and :class:`.trainer.Trainer` unchanged.

:func:`refine` runs both and resumes, like every stage, from what it finds in its folder.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import synthetic
from .trainer import CHECKPOINT_NAME, LatentDataset, TrainConfig, Trainer, TripletRecord, encode_dataset

log = logging.getLogger(__name__)

# What every continued-training stage (3 to 5) shares; each sets its own steps, learning rates, schedule and seed.
CONTINUED_TRAINING = {"batch_size": 32, "ema_decay": 0.999, "snr_gamma": 5.0, "mixed_precision": "no",
                      "checkpoint_every": 250, "log_every": 50}
REFINE = {
    "decoder_steps": 1500,
    "decoder_lr": 1e-3,
    "triplets": 40_000,
    # Stage 2 drew every kind 20% of the time; its held-out failures were mostly remove and morph.
    "kind_weights": {"recolor": 0.15, "morph": 0.30, "remove": 0.30, "add": 0.125, "darker": 0.125},
    "train": {**CONTINUED_TRAINING, "steps": 5000, "learning_rate": 2e-4, "text_encoder_lr": 2e-4,
              "warmup_steps": 100, "cosine_decay": False, "seed": 7},
}
# Far above any index stage 2 (0 .. triplets) or the held-out set (another split) uses.
FIRST_INDEX = 10_000_000


def refine_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**REFINE["train"], **overrides})


# ----------------------------------------------------------------------------------------------- decoder

def train_decoder(vae, steps: int, lr: float = REFINE["decoder_lr"], batch_size: int = 32, seed: int = 0,
                  progress: bool = True) -> list[float]:
    """Fine-tune ``post_quant_conv`` + decoder on fresh pictures with the encoder frozen; returns the losses.

    The loss is :func:`.toy.train_vae`'s reconstruction (L1 + MSE) of ``decode(encode(x).mode())``. fp32: on a
    CPU without fast bf16 (this project's CI machines) autocast made each step several times slower.
    """
    from tqdm.auto import tqdm

    from .toy import images_to_tensor, optimizer_step

    trainable = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    vae.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.eval()
    vae.decoder.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="toy decoder", disable=not progress, mininterval=5)
    for step in bar:
        pics = []
        for i in range(batch_size // 2):
            t = synthetic.triplet(FIRST_INDEX + step * batch_size + i, seed=seed + 2000, split="train")
            pics += [t.input, t.edited]
        x = images_to_tensor(pics)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        optimizer_step(loss, opt, sched, trainable, losses, bar, step, steps, "toy decoder")
    vae.requires_grad_(False)
    vae.eval()
    return losses


def refine_decoder(out: Path, vae, steps: int = REFINE["decoder_steps"], seed: int = 0, progress: bool = True):
    """Stage 3a: ``out/vae-refined`` (reused if there); the scaling factor stays the stage-1 one."""
    from diffusers import AutoencoderKL

    from .toy import vae_quality

    folder = out / "vae-refined"
    if (folder / "config.json").is_file():
        log.info("toy: reusing the refined VAE in %s", folder)
        return AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    before = vae_quality(vae)
    start = time.time()
    train_decoder(vae, steps, seed=seed, progress=progress)
    after = vae_quality(vae)
    vae.save_pretrained(str(folder))
    log.info("toy decoder: %d steps in %.0f s, held-out PSNR %.1f -> %.1f dB", steps, time.time() - start,
             before["psnr"], after["psnr"])
    (out / "vae_refined_quality.json").write_text(json.dumps(
        {"before": before, "after": after, "steps": steps}, indent=2))
    return vae


# ----------------------------------------------------------------------------------------------- UNet

def refine_records(n: int, seed: int = 0, weights: dict[str, float] | None = None,
                   first_index: int = FIRST_INDEX) -> list[TripletRecord]:
    """``n`` fresh training triplets (indices from ``first_index``) whose kinds follow ``weights`` (a pure function
    of ``seed``)."""
    weights = weights or REFINE["kind_weights"]
    kinds = list(weights)
    p = np.asarray([weights[k] for k in kinds], dtype=np.float64)
    draws = np.random.default_rng([seed, 3]).choice(len(kinds), size=n, p=p / p.sum())
    records = []
    for i, k in enumerate(draws):
        t = synthetic.triplet(first_index + i, seed=seed, split="train", kind=kinds[int(k)])
        records.append(TripletRecord(t.input, t.edited, t.instruction))
    return records


def train_on_fresh_triplets(folder: Path, unet, vae, text_encoder, tokenizer, scheduler_config,
                            config: TrainConfig, n_triplets: int, weights: dict[str, float], first_index: int,
                            progress: bool = True, before_training=None, facts: dict | None = None):
    """Continue training ``unet`` and ``text_encoder`` in ``folder`` on ``n_triplets`` fresh triplets whose kinds
    follow ``weights``; returns (unet, text_encoder, vae). Resumes a cut-off run from ``folder``.

    The shared body of stages 3 to 5. ``before_training(vae, unet)`` runs after the latents are encoded (stage 3
    sharpens the decoder there, stage 4 widens the UNet) and returns the (vae, unet) to go on with. ``facts`` go
    into ``folder/recipe.json`` with the run's own.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Latents first, from the (frozen) encoder: what runs before training never changes them, and the file makes a
    # resumed run independent of which step was cut off.
    data_file = folder / f"latents-{n_triplets}.pt"
    if data_file.is_file():
        dataset = LatentDataset(**torch.load(str(data_file), weights_only=True))
    else:
        log.info("toy %s: rendering and encoding %d triplets", folder.name, n_triplets)
        records = refine_records(n_triplets, seed=config.seed, weights=weights, first_index=first_index)
        dataset = encode_dataset(vae, records, batch_size=256, progress=progress)
        torch.save(vars(dataset), str(data_file))
    if before_training is not None:
        vae, unet = before_training(vae, unet)
    trainer = Trainer(unet, text_encoder, tokenizer, scheduler_config, dataset, config)
    ckpt = folder / "checkpoints"
    if (ckpt / CHECKPOINT_NAME).is_file():
        trainer.load_checkpoint(ckpt)
    trainer.train(ckpt, progress=progress)
    unet, text_encoder = trainer.final_modules()
    (folder / "recipe.json").write_text(json.dumps({
        **(facts or {}), "triplets": n_triplets, "kind_weights": weights, "first_index": first_index,
        "train": dict(vars(config)), "steps_done": trainer.state.step,
        "final_loss": float(np.mean(trainer.state.losses[-200:])),
    }, indent=2))
    return unet, text_encoder, vae


def refine(out: Path, unet, vae, text_encoder, tokenizer, scheduler_config, config: TrainConfig | None = None,
           n_triplets: int = REFINE["triplets"], decoder_steps: int = REFINE["decoder_steps"],
           progress: bool = True):
    """Stage 3 in ``out/refine``: returns (unet, vae, text_encoder) refined. Resumes a cut-off run."""
    out = Path(out) / "refine"

    def sharpen_decoder(vae, unet):
        # The decoder's pictures are their own draw (seed 0), independent of the UNet run's seed.
        return refine_decoder(out, vae, decoder_steps, progress=progress), unet

    unet, text_encoder, vae = train_on_fresh_triplets(
        out, unet, vae, text_encoder, tokenizer, scheduler_config, config or refine_config(), n_triplets,
        REFINE["kind_weights"], FIRST_INDEX, progress, before_training=sharpen_decoder,
        facts={"decoder_steps": decoder_steps})
    return unet, vae, text_encoder
