"""The pack's embedded toy InstructPix2Pix model: its architecture, its tokenizer, and the recipe that trains it.

The model edits the 32 x 32 pictures of :mod:`.synthetic` ("make the circle red", "remove the star", ...). It
has the same parts as SD1.5-IP2P, only tiny, so it runs through exactly the same loader, conditioner and
sampler as a real checkpoint:

- a VAE with scale factor 4 (32 x 32 x 3 -> 8 x 8 x 4), trained first on synthetic pictures;
- a 2-layer CLIP text encoder over a word-level vocabulary: the 256 byte symbols (so any text tokenizes) plus
  BPE merges that make every word of the synthetic world one token;
- a UNet with 8 input channels and cross-attention, trained with :mod:`.trainer` like the paper's: ~1 M
  parameters (32 and 64 channels) through stage 3, then widened to ~4.2 M (64 and 128) by :mod:`.toy_widen`.

``build_toy`` is the whole recipe; ``python -m ip2p_nodes.pipeline_core.training toy --out DIR`` runs it.
Every stage is saved in ``DIR``, so a cut-off run continues where it stopped when started again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..models.assets import (  # noqa: F401  (re-exported: the recipe's names for the shipped files)
    SAMPLE_IMAGE_NAME,
    SAMPLE_INSTRUCTION,
    TOY_MODEL_CHOICE,
    TOY_MODEL_NAME,
    sample_image_path,
    toy_model_path,
)
from ..models.families.base import CONFIG_DIR
from . import synthetic
from .byte_tokenizer import write_byte_level_tokenizer
from .trainer import (
    CHECKPOINT_NAME,
    LatentDataset,
    TrainConfig,
    Trainer,
    encode_dataset,
    save_model,
    synthetic_records,
)

log = logging.getLogger(__name__)

MAX_TOKENS = 16
WORDS = sorted({w for phrase in (
    "make the circle square triangle star turn into a remove add it darker", " ".join(synthetic.COLOURS),
) for w in phrase.split()})


# ----------------------------------------------------------------------------------------------- tokenizer

def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none applies."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that turn each of ``words`` into a single token.

    Merges are added left to right for every word still split; a later merge can only apply where an earlier
    one did not, so repeating until nothing is split reaches a fixed point (in two rounds for our words).
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(20):
        split = 0
        for w in words:
            parts = _bpe(w, ranks)
            if len(parts) == 1:
                continue
            split += 1
            current = parts[0]
            for nxt in parts[1:]:
                if (current, nxt) not in ranks:
                    ranks[(current, nxt)] = len(merges)
                    merges.append((current, nxt))
                current += nxt
        if not split:
            return merges
    raise RuntimeError("BPE merges for the toy vocabulary did not converge")


def write_tokenizer(directory: Path, words: list[str] = WORDS):
    """CLIP tokenizer files: 256 byte symbols (+ ``</w>`` forms), the word merges, and the special tokens."""
    return write_byte_level_tokenizer(directory, max_length=MAX_TOKENS, merges=word_merges(words))


# ----------------------------------------------------------------------------------------------- modules

def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=32,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    ))


def make_unet():
    from diffusers import UNet2DConditionModel

    # Two levels (8x8 and 4x4 latents), cross-attention in both: the smallest UNet that measured fast
    # enough to train on a shared 2-core CPU (0.2 s per batch of 64 in bf16) and still reads the instruction.
    # Stages 1-3 train it at this width; stage 4 (toy_widen) doubles it once it has learnt the edits.
    return UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=16, norm_num_groups=16,
    )


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """``[H,W,3]`` 0..1 arrays -> ``[B,3,H,W]`` in -1..1 (the VAE's range)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


# ----------------------------------------------------------------------------------------------- VAE stage

def train_vae(vae, steps: int, batch_size: int = 32, seed: int = 0, lr: float = 2e-3, var_weight: float = 1e-2,
              progress: bool = True) -> list[float]:
    """Fit the autoencoder to synthetic pictures (inputs and edits alike); returns the loss per step.

    Trained as a deterministic autoencoder on ``latent_dist.mode()``, because that is all IP2P ever uses (the
    image condition and, here, the training targets): decoding posterior samples, as SD's VAE training does,
    made the first version blur every shape into a blob within our step budget. A small penalty drives the
    posterior variance to zero so ``latent_dist.sample()`` equals the mode too. Reconstruction is L1 + MSE (L1
    keeps flat colour regions exact, MSE the edges). Each step draws fresh scenes: nothing to overfit.
    """
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    losses = []
    bar = tqdm(range(steps), desc="toy VAE", disable=not progress, mininterval=5)
    for step in bar:
        pics = []
        for i in range(batch_size // 2):
            t = synthetic.triplet(step * batch_size + i, seed=seed + 1000, split="train")
            pics += [t.input, t.edited]
        x = images_to_tensor(pics)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dist = vae.encode(x).latent_dist
            rec = vae.decode(dist.mode()).sample.float()
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + var_weight * dist.var.float().mean()
        optimizer_step(loss, opt, sched, list(vae.parameters()), losses, bar, step, steps, "toy VAE")
    vae.eval()
    return losses


def optimizer_step(loss, opt, sched, params, losses: list[float], bar, step: int, steps: int, what: str) -> None:
    """One clipped AdamW + schedule step of a VAE stage, with its loss logged every 50 steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    losses.append(loss.item())
    if step % 50 == 0:
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        log.info("%s step %d/%d loss %.4f", what, step, steps, np.mean(losses[-50:]))


@torch.no_grad()
def vae_quality(vae, n: int = 64, seed: int = 0) -> dict[str, float]:
    """PSNR of reconstructing held-out pictures, and the latent std that sets ``scaling_factor``."""
    pics = []
    for t in synthetic.triplets(n // 2, seed=seed, split="heldout"):
        pics += [t.input, t.edited]
    x = images_to_tensor(pics)
    z = vae.encode(x).latent_dist.mode()
    rec = vae.decode(z).sample.clamp(-1, 1)
    mse = (((rec - x) / 2) ** 2).mean(dim=(1, 2, 3))
    return {"psnr": float((10 * torch.log10(1 / mse)).mean()), "latent_std": float(z.std())}


def build_vae(out: Path, steps: int, seed: int = 0):
    """Stage 1: train (or reuse, if ``out/vae`` exists) the toy VAE; sets ``scaling_factor`` to 1/latent std."""
    from diffusers import AutoencoderKL

    folder = out / "vae"
    if (folder / "config.json").is_file():
        log.info("toy: reusing the VAE in %s", folder)
        return AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    torch.manual_seed(seed)
    vae = make_vae()
    start = time.time()
    train_vae(vae, steps, seed=seed)
    quality = vae_quality(vae)
    # SD scales latents to unit variance before diffusion (0.18215 for SD1.5); ours are measured the same way.
    vae.register_to_config(scaling_factor=round(1.0 / quality["latent_std"], 5))
    vae.save_pretrained(str(folder))
    log.info("toy VAE: %d steps in %.0f s, held-out reconstruction PSNR %.1f dB, scaling factor %.5f",
             steps, time.time() - start, quality["psnr"], vae.config.scaling_factor)
    (out / "vae_quality.json").write_text(json.dumps({**quality, "steps": steps}, indent=2))
    return vae


# ----------------------------------------------------------------------------------------------- whole recipe

# The shipped model's recipe, sized for a shared 2-core CPU: run it with 1 torch thread (with 2 threads next to
# another busy process, the spinning OpenMP workers made every step 5-10x slower). fp32, because at this size
# bf16 autocast measured no faster (casting dominates) and fp32 keeps the run bit-reproducible.
RECIPE = {
    "vae_steps": 2000,
    "triplets": 20_000,
    "refine_steps": 5000,  # stage 3, see toy_refine.REFINE
    "widen_steps": 8000,  # stage 4, see toy_widen.WIDEN
    "focus_steps": 3000,  # stage 5, see toy_widen.FOCUS
    "train": {
        "steps": 15000, "batch_size": 32, "learning_rate": 5e-4, "text_encoder_lr": 5e-4, "ema_decay": 0.999,
        "snr_gamma": 5.0, "warmup_steps": 200, "cosine_decay": False, "mixed_precision": "no",
        "checkpoint_every": 250, "log_every": 50, "seed": 0,
    },
}


def recipe_config(**overrides):
    return TrainConfig(**{**RECIPE["train"], **overrides})


STAGE2_NAME = "toy-ip2p-stage2.safetensors"
STAGE3_NAME = "toy-ip2p-stage3.safetensors"
STAGE4_NAME = "toy-ip2p-stage4.safetensors"


def train_stages_1_and_2(out: Path, config, vae_steps: int, n_triplets: int, progress: bool = True):
    """The VAE, then the UNet and text encoder on ``n_triplets``; returns (unet, vae, text_encoder, facts)."""
    seed = config.seed
    vae = build_vae(out, vae_steps, seed=seed)
    tokenizer = write_tokenizer(out / "tokenizer")
    torch.manual_seed(seed)
    text_encoder = make_text_encoder(tokenizer)
    unet = make_unet()
    data_file = out / f"latents-{n_triplets}.pt"
    if data_file.is_file():
        dataset = LatentDataset(**torch.load(str(data_file), weights_only=True))
    else:
        log.info("toy: rendering and encoding %d training triplets", n_triplets)
        dataset = encode_dataset(vae, synthetic_records(n_triplets, seed=seed), batch_size=256, progress=progress)
        torch.save(vars(dataset), str(data_file))
    trainer = Trainer(unet, text_encoder, tokenizer, scheduler_config(), dataset, config)
    ckpt = out / "checkpoints"
    if (ckpt / CHECKPOINT_NAME).is_file():
        trainer.load_checkpoint(ckpt)
    trainer.train(ckpt, progress=progress)
    unet, text_encoder = trainer.final_modules()
    facts = {"vae_steps": vae_steps, "triplets": n_triplets, "train": dict(vars(config)),
             "steps_done": trainer.state.step, "final_loss": float(np.mean(trainer.state.losses[-200:]))}
    return unet, vae, text_encoder, facts


def scheduler_config() -> dict:
    return json.loads((CONFIG_DIR / "sd15" / "scheduler.json").read_text())


def build_toy(out: Path, config=None, vae_steps: int = RECIPE["vae_steps"], n_triplets: int = RECIPE["triplets"],
              install: bool = False, progress: bool = True, refine_steps: int = RECIPE["refine_steps"],
              stage2: Path | None = None, widen_steps: int = RECIPE["widen_steps"], stage3: Path | None = None,
              focus_steps: int = RECIPE["focus_steps"]):
    """Train the toy model from nothing into ``out``; continues a cut-off run. Returns (diffusers folder, file).

    Stage 1 the VAE, stage 2 the UNet and text encoder on ``n_triplets`` (written as ``out/stage2/``), stage 3
    (:mod:`.toy_refine`, ``refine_steps`` UNet steps; 0 skips it) a sharper decoder and continued training on
    the weak edit kinds (written as ``out/stage3/``), stage 4 (:mod:`.toy_widen`, ``widen_steps``; 0 skips it)
    the UNet at twice the width, trained on (``out/stage4/``), stage 5 (``focus_steps``; 0 skips it) a short run
    with removal drawn most. ``stage2`` / ``stage3``: a model file of that stage to start the next one from
    instead of training the stages before it.
    """
    import shutil

    from ..models.loading import ModelSource, load_components
    from ..models.precision import resolve_precision

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or recipe_config()
    tokenizer = write_tokenizer(out / "tokenizer")

    def load(file: Path):
        # Each stage starts from the previous one's model as written (fp16, like the shipped file), so the same
        # command gives the same result whether that stage ran just now or earlier: the shipped model was made
        # that way.
        parts = load_components(ModelSource.from_path(str(file)), resolve_precision("fp32", "cpu"), "cpu")
        return parts.unet, parts.vae, parts.text_encoder

    if stage3 is not None:
        facts = {"stage3": str(stage3)}
    elif stage2 is None:
        unet, vae, text_encoder, facts = train_stages_1_and_2(out, config, vae_steps, n_triplets, progress)
        _, stage2 = save_model(out / "stage2", unet, vae, text_encoder, tokenizer, scheduler_config(),
                               single_file_name=STAGE2_NAME, dtype=torch.float16)
    else:
        facts = {"stage2": str(stage2)}
    if stage3 is None:
        unet, vae, text_encoder = load(stage2)
        if refine_steps:
            from .toy_refine import refine, refine_config

            unet, vae, text_encoder = refine(out, unet, vae, text_encoder, tokenizer, scheduler_config(),
                                             refine_config(steps=refine_steps), progress=progress)
            facts["refine"] = json.loads((out / "refine" / "recipe.json").read_text())
        if widen_steps:
            _, stage3 = save_model(out / "stage3", unet, vae, text_encoder, tokenizer, scheduler_config(),
                                   single_file_name=STAGE3_NAME, dtype=torch.float16)
    if widen_steps:
        from .toy_widen import focus, focus_config, widen_and_train, widen_config

        unet, vae, text_encoder = load(stage3)
        unet, text_encoder = widen_and_train(out, unet, vae, text_encoder, tokenizer, scheduler_config(),
                                             widen_config(steps=widen_steps), progress=progress)
        facts["widen"] = json.loads((out / "widen" / "recipe.json").read_text())
        if focus_steps:
            _, stage4 = save_model(out / "stage4", unet, vae, text_encoder, tokenizer, scheduler_config(),
                                   single_file_name=STAGE4_NAME, dtype=torch.float16)
            unet, vae, text_encoder = load(stage4)
            unet, text_encoder = focus(out, unet, vae, text_encoder, tokenizer, scheduler_config(),
                                       focus_config(steps=focus_steps), progress=progress)
            facts["focus"] = json.loads((out / "focus" / "recipe.json").read_text())
    # Stored in fp16 to halve what the repository carries (~10 MB); the loader casts to the chosen precision.
    folder, single = save_model(out, unet, vae, text_encoder, tokenizer, scheduler_config(),
                                single_file_name=TOY_MODEL_NAME, dtype=torch.float16)
    (out / "recipe.json").write_text(json.dumps(facts, indent=2))
    if install:
        toy_model_path().parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(single, toy_model_path())
        log.info("toy: installed %s", toy_model_path())
    return folder, single


def sample_scene() -> synthetic.Scene:
    """The demo's picture: a blue circle and a yellow triangle on white (so "make the circle red" shows)."""
    from .synthetic import Scene, Shape, slot_centre

    return Scene("white", (
        Shape("circle", "blue", 0, *slot_centre(0), 5.0),
        Shape("triangle", "yellow", 3, *slot_centre(3), 5.0),
    ))


def sample_triplet() -> synthetic.Triplet:
    """The sample scene, :data:`SAMPLE_INSTRUCTION` and its exactly correct edit (the circle turned red).

    For :func:`evaluation.rule_check` of what the demo and the "Toy demo, no download" workflow make of the sample.
    """
    from dataclasses import replace

    before = sample_scene()
    after = replace(before, shapes=(replace(before.shapes[0], colour="red"),) + before.shapes[1:])
    return synthetic.Triplet(synthetic.render(before), SAMPLE_INSTRUCTION, synthetic.render(after), "recolor",
                             before, after, after.shapes[0])


def write_sample_image(path: Path | None = None) -> Path:
    """Render :func:`sample_scene` to ``path`` (default: the shipped sample)."""
    from PIL import Image

    path = Path(path) if path else sample_image_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((synthetic.render(sample_scene()) * 255).round().astype(np.uint8)).save(path)
    return path
