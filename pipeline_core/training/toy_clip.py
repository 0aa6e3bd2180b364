"""The pack's embedded toy CLIP: a tiny image/text encoder pair for the shapes world, and the recipe that trains it.

It lets :mod:`..scoring` (CLIP image / direction / text similarity, pick-best) run offline and be tested on
pictures whose meaning is known exactly. Captions describe a scene the way the paper's captions describe a
photo: "a red circle and a yellow triangle on white" (:func:`caption`), so the paper's directional similarity
is computed with the captions before and after an edit, as it was for the paper's figures.

- the model is a transformers ``CLIPModel`` (ViT 32 px, 4 px patches; 2-layer text encoder), so scoring loads
  it exactly as it loads a user's CLIP folder;
- its tokenizer is the toy IP2P model's word-level one (:func:`.toy.word_merges`) over the caption words;
- it is trained contrastively (CLIP's symmetric InfoNCE) on rendered scenes with their captions. Every batch
  holds triplets' inputs *and* their exact edits, so the pairs that differ by one edit, the ones the direction
  metric has to tell apart, are always each other's negatives. Pictures are lightly blurred and noised so the
  edit model's soft outputs are read like clean renders.

``python -m ip2p_nodes.pipeline_core.training toy-clip --out DIR [--install]`` runs the recipe; the weights
and a checkpoint are in ``DIR``, so a cut-off run continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.assets import toy_clip_path
from . import synthetic
from .byte_tokenizer import write_byte_level_tokenizer
from .toy import images_to_tensor, word_merges
from .trainer import CHECKPOINT_NAME, EMA

log = logging.getLogger(__name__)

MAX_TOKENS = 24  # "dark a red circle and a ... and a blue star on white": at most 19 words + BOS/EOS
CAPTION_WORDS = sorted({w for phrase in (
    "a and on dark nothing", " ".join(synthetic.SHAPES), " ".join(synthetic.COLOURS), " ".join(synthetic.BACKGROUNDS),
) for w in phrase.split()})
# CLIP's own normalisation, kept for the toy so a user's preprocessing code path is the one the toy exercises.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def caption(scene: synthetic.Scene) -> str:
    """What the scene shows, shapes in reading order: "a red circle and a yellow triangle on white"."""
    shapes = " and ".join(f"a {s.colour} {s.kind}" for s in sorted(scene.shapes, key=lambda s: s.slot)) or "nothing"
    return f"{'dark ' if scene.darkness < 1 else ''}{shapes} on {scene.background}"


def captions_of(t: synthetic.Triplet) -> tuple[str, str]:
    """(caption before, caption after) of a triplet: the paper's inputs to the directional similarity."""
    return caption(t.before), caption(t.after)


# ----------------------------------------------------------------------------------------------- model files

def write_tokenizer(directory: Path):
    return write_byte_level_tokenizer(directory, max_length=MAX_TOKENS, merges=word_merges(CAPTION_WORDS))


def make_clip(tokenizer, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=MAX_TOKENS, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
        ),
        vision_config=dict(
            image_size=synthetic.BASE_SIZE, patch_size=4, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_hidden_layers=3,
        ),
        projection_dim=64,
    )
    return CLIPModel(config)


def preprocessor_config() -> dict:
    """``preprocessor_config.json`` as ``CLIPImageProcessor`` writes it: 32 px, CLIP's mean and std."""
    size = synthetic.BASE_SIZE
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }


# ----------------------------------------------------------------------------------------------- data

@dataclass
class CaptionData:
    """Rendered pictures ``[N, 3, 32, 32]`` in 0..1 and their captions, pairs (input, edit) adjacent."""

    pictures: torch.Tensor
    captions: list[str]


def render_data(n_triplets: int, seed: int = 0) -> CaptionData:
    pics, texts = [], []
    for t in synthetic.triplets(n_triplets, seed=seed + 2000, split="train"):
        pics += [t.input, t.edited]
        texts += list(captions_of(t))
    return CaptionData((images_to_tensor(pics) + 1) / 2, texts)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random mild blur and pixel noise per picture: the edit model's outputs are soft and never exact."""
    b = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    mix = torch.rand(b, 1, 1, 1, generator=g) * 0.6
    noise = torch.randn(x.shape, generator=g) * (torch.rand(b, 1, 1, 1, generator=g) * 0.04)
    return (x * (1 - mix) + blurred * mix + noise).clamp(0, 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------- training

@dataclass
class ClipTrainConfig:
    steps: int = 800
    pairs_per_batch: int = 64  # triplets per batch: 128 pictures, every input beside its edit
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    ema_decay: float = 0.995
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 50


def contrastive_loss(model, tokens: torch.Tensor, pictures: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """CLIP's symmetric cross-entropy; pictures with the same caption count as positives of each other."""
    out = model(input_ids=tokens, pixel_values=pictures)
    logits = out.logits_per_image  # already scaled by exp(logit_scale)
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    labels = torch.tensor([ids[c] for c in captions])
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean())


def train_clip(model, tokenizer, data: CaptionData, config: ClipTrainConfig, checkpoint_dir: Path | None = None,
               progress: bool = True) -> list[float]:
    """Train ``model`` in place; resumes from ``checkpoint_dir`` and ends with the EMA weights copied in."""
    from tqdm.auto import tqdm

    tokens = tokenizer(data.captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                       return_tensors="pt").input_ids
    opt = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def factor(step: int) -> float:  # linear warm-up, then a cosine to 5%
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        p = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(1.0, p)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    params = dict(model.named_parameters())
    ema = EMA(params, config.ema_decay)
    g = torch.Generator().manual_seed(config.seed)
    step, losses = 0, []
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(str(ckpt), weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        g.set_state(state["generator"])
        step, losses = int(state["step"]), list(state["losses"])
        log.info("toy CLIP: resumed at step %d", step)
    n_pairs = len(data.captions) // 2
    model.train()
    bar = tqdm(total=config.steps, initial=step, desc="toy CLIP", disable=not progress, mininterval=5)
    started = time.time()
    while step < config.steps:
        pairs = torch.randint(0, n_pairs, (config.pairs_per_batch,), generator=g)
        idx = torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()
        pictures = normalise(augment(data.pictures[idx], g))
        loss = contrastive_loss(model, tokens[idx], pictures, [data.captions[i] for i in idx.tolist()])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(params)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % config.log_every == 0:
            log.info("toy CLIP step %d/%d loss %.4f (%.2f s/step)", step, config.steps,
                     np.mean(losses[-config.log_every:]), (time.time() - started) / config.log_every)
            started = time.time()
        if ckpt is not None and (step % config.checkpoint_every == 0 or step == config.steps):
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "ema": ema.state_dict(), "generator": g.get_state(), "step": step, "losses": losses,
                        "config": asdict(config)}, tmp)
            os.replace(tmp, ckpt)
    bar.close()
    ema.copy_to(params)
    model.eval()
    return losses


@torch.no_grad()
def caption_accuracy(model, tokenizer, n_triplets: int = 200, seed: int = 0) -> float:
    """Held-out check: how often a picture's own caption scores highest among its pair's two captions and the
    other pictures' captions (the ability the direction metric relies on)."""
    data = render_data_split(n_triplets, seed)
    tokens = tokenizer(data.captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                       return_tensors="pt").input_ids
    img = F.normalize(_pooled(model.get_image_features(pixel_values=normalise(data.pictures))), dim=-1)
    txt = F.normalize(_pooled(model.get_text_features(input_ids=tokens)), dim=-1)
    sims = img @ txt.t()
    captions = np.array(data.captions)
    best = sims.argmax(1).numpy()
    return float(np.mean(captions[best] == captions))


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns the projected embeddings as ``pooler_output`` of an output object; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def render_data_split(n_triplets: int, seed: int = 0) -> CaptionData:
    """Held-out pictures and captions (the synthetic world's held-out split, never trained on)."""
    pics, texts = [], []
    for t in synthetic.triplets(n_triplets, seed=seed, split="heldout"):
        pics += [t.input, t.edited]
        texts += list(captions_of(t))
    return CaptionData((images_to_tensor(pics) + 1) / 2, texts)


def save_clip(model, tokenizer, folder: Path) -> Path:
    """A transformers CLIP folder (config, weights, tokenizer, preprocessor config), as users' CLIP folders are."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    # transformers 5 writes tokenizer.json only; 4.x's CLIPTokenizer reads vocab.json and merges.txt.
    source = Path(tokenizer.name_or_path)
    for name in ("vocab.json", "merges.txt"):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    for path in folder.iterdir():
        path.chmod(0o644)  # save_pretrained writes the weights owner-only; the pack's files are readable by all
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2))
    return folder


def build_toy_clip(out: Path, config: ClipTrainConfig | None = None, n_triplets: int = 6000, install: bool = False,
                   progress: bool = True) -> Path:
    """The whole recipe: render, train (resuming), save ``out/toy-clip``; ``install`` copies it into the assets."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = config or ClipTrainConfig()
    tokenizer = write_tokenizer(out / "tokenizer")
    model = make_clip(tokenizer, config.seed)
    data_file = out / f"pictures-{n_triplets}-{config.seed}.pt"
    if data_file.is_file():
        data = CaptionData(**torch.load(str(data_file), weights_only=True))
    else:
        log.info("toy CLIP: rendering %d training triplets", n_triplets)
        data = render_data(n_triplets, config.seed)
        torch.save(vars(data), str(data_file))
    start = time.time()
    losses = train_clip(model, tokenizer, data, config, out / "checkpoints", progress)
    accuracy = caption_accuracy(model, tokenizer)
    folder = save_clip(model, tokenizer, out / "toy-clip")
    (out / "recipe.json").write_text(json.dumps({
        "triplets": n_triplets, "train": asdict(config), "final_loss": float(np.mean(losses[-50:])),
        "heldout_caption_accuracy": accuracy, "seconds": round(time.time() - start),
    }, indent=2))
    log.info("toy CLIP: held-out caption retrieval accuracy %.3f", accuracy)
    if install:
        target = toy_clip_path()
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)
        log.info("toy CLIP: installed %s", target)
    return folder
