"""Training and fine-tuning InstructPix2Pix models on (input image, instruction, edited image) triplets.

The recipe is the paper's (Brooks et al., CVPR 2023, §3.2 and §3.3; diffusers' ``train_instruct_pix2pix.py``):

- the UNet sees the noisy latent of the *edited* image concatenated on the channel axis with the latent of the
  *input* image, ``vae.encode(x).latent_dist.mode()`` unscaled, exactly what :mod:`..editing` feeds it;
- the objective is the usual epsilon MSE (optionally Min-SNR-gamma weighted, Hang et al. 2023, which speeds
  up small models from scratch without changing what is learned);
- conditioning dropout for dual classifier-free guidance: 5% of examples lose the text (it becomes the empty
  prompt, which is what the sampler encodes as "no instruction"), 5% the image (zeros), 5% both — without it
  the e_I and e_U passes of :func:`guidance.dual_guidance` would be meaningless.

Full fine-tuning or LoRA on the UNet's attention projections (peft, as diffusers' LoRA scripts do it; the LoRA
is also written in diffusers' and kohya's layouts, see :mod:`.lora`). Optional EMA. Checkpoints hold weights,
optimizer, schedule, step, RNG and EMA, so a resumed run ends with the same weights as an uninterrupted one.
Results are written as a diffusers folder and as one ``.safetensors`` that :func:`loading.load_single_file` (and
ComfyUI) reads.

CLI (:mod:`.cli`): ``python -m ip2p_nodes.pipeline_core.training train --model M --data D --out DIR``
fine-tunes; ``... training toy --out DIR`` trains the embedded toy model from nothing (see :mod:`.toy`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .lora import add_lora, merge_lora, save_lora

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None  # None: the text encoder stays frozen (the paper's choice)
    lora_rank: int = 0  # 0: full fine-tune of the UNet; >0: LoRA of this rank on its attention projections
    lora_alpha: float | None = None  # LoRA scale is alpha / rank; None means alpha = rank
    ema_decay: float | None = None  # e.g. 0.999; None: no EMA
    p_drop_text: float = 0.05
    p_drop_image: float = 0.05
    p_drop_both: float = 0.05
    snr_gamma: float | None = None  # Min-SNR-gamma loss weight (5.0 is the paper's value); None: plain MSE
    warmup_steps: int = 0
    cosine_decay: bool = False  # decay the learning rate to 10% along a cosine after warmup
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    mixed_precision: str = "bf16"  # "bf16" autocast (2-3x faster on AVX512-BF16/AMX CPUs and on GPUs) or "no"
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50

    def __post_init__(self):
        p = self.p_drop_text + self.p_drop_image + self.p_drop_both
        if min(self.p_drop_text, self.p_drop_image, self.p_drop_both) < 0 or p > 1:
            raise InputError(f"conditioning dropout probabilities must be >= 0 and sum to <= 1, got {p}")
        if self.mixed_precision not in ("bf16", "no"):
            raise InputError(f"mixed_precision must be 'bf16' or 'no', got {self.mixed_precision!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise InputError("steps and batch_size must be at least 1")


# ----------------------------------------------------------------------------------------------- data

@dataclass
class TripletRecord:
    """One training example: two pictures (paths or ``[H,W,3]`` 0..1 arrays) and the instruction between them."""

    input: Any
    edited: Any
    instruction: str


def read_manifest(path: Path) -> list[TripletRecord]:
    """A JSONL file, one ``{"input": ..., "edited": ..., "instruction": ...}`` per line; paths relative to it.

    Also accepts the key names of the paper's dataset viewer and of diffusers' example
    (``input_image`` / ``edited_image`` / ``edit_prompt``).
    """
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            src = row.get("input", row.get("input_image"))
            dst = row.get("edited", row.get("edited_image"))
            text = row.get("instruction", row.get("edit_prompt"))
            if not (isinstance(src, str) and isinstance(dst, str) and isinstance(text, str)):
                raise KeyError
        except (ValueError, KeyError, AttributeError):
            raise InputError(
                f"{path}:{n}: each line must be a JSON object with string fields \"input\", \"edited\" and "
                "\"instruction\" (image paths relative to the manifest)"
            ) from None
        records.append(TripletRecord(Path(path).parent / src, Path(path).parent / dst, text))
    if not records:
        raise InputError(f"{path}: the manifest holds no triplets")
    return records


def read_folder(folder: Path) -> list[TripletRecord]:
    """``folder/manifest.jsonl`` if present; else files ``NAME_input.png``, ``NAME_edited.png``, ``NAME.txt``."""
    folder = Path(folder)
    if (folder / "manifest.jsonl").is_file():
        return read_manifest(folder / "manifest.jsonl")
    records = []
    for src in sorted(folder.iterdir()):
        stem, suffix = src.stem, src.suffix.lower()
        if suffix not in IMAGE_SUFFIXES or not stem.endswith("_input"):
            continue
        name = stem[: -len("_input")]
        candidates = [folder / f"{name}_edited{s}" for s in IMAGE_SUFFIXES]
        dst = next((p for p in candidates if p.is_file()), None)
        txt = folder / f"{name}.txt"
        if dst is None or not txt.is_file():
            raise InputError(f"{src}: found no matching {name}_edited.<png|jpg> and {name}.txt in {folder}")
        records.append(TripletRecord(src, dst, txt.read_text().strip()))
    if not records:
        raise InputError(
            f"{folder}: no triplets found. Put a manifest.jsonl there (lines of {{\"input\", \"edited\", "
            "\"instruction\"}), or files NAME_input.png + NAME_edited.png + NAME.txt"
        )
    return records


def synthetic_records(n: int, seed: int = 0, size: int = 32) -> list[TripletRecord]:
    from . import synthetic

    return [TripletRecord(t.input, t.edited, t.instruction) for t in synthetic.triplets(n, seed=seed, size=size)]


def read_data(spec: str) -> list[TripletRecord]:
    """``synthetic:N`` (the shapes world), a ``.jsonl`` manifest, or a folder."""
    if spec.startswith("synthetic:"):
        return synthetic_records(int(spec.split(":", 1)[1]))
    path = Path(spec).expanduser()
    if path.is_dir():
        return read_folder(path)
    if path.is_file():
        return read_manifest(path)
    raise InputError(f"{spec}: no such data folder or manifest; give a folder, a .jsonl manifest or synthetic:N")


def _picture(item: Any, resolution: int | None) -> np.ndarray:
    if isinstance(item, np.ndarray):
        arr = item
    else:
        from PIL import Image

        with Image.open(item) as im:
            im = im.convert("RGB")
            if resolution:
                # Shorter side to `resolution`, centre crop: the same geometry for input and edit.
                scale = resolution / min(im.size)
                size = (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale)))
                im = im.resize(size, Image.BICUBIC)
                left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
                im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr.astype(np.float32)


@dataclass
class LatentDataset:
    """Triplets as the UNet consumes them, encoded once by the frozen VAE (the VAE is never trained here)."""

    input_latents: torch.Tensor  # unscaled, as the sampler conditions on them
    edited_latents: torch.Tensor  # scaled by the VAE's scaling_factor, as the diffusion runs on them
    instructions: list[str]

    def __len__(self) -> int:
        return len(self.instructions)


@torch.no_grad()
def encode_dataset(vae, records: Sequence[TripletRecord], resolution: int | None = None, batch_size: int = 64,
                   progress: bool = True) -> LatentDataset:
    from tqdm.auto import tqdm

    vae = vae.eval()
    dtype = next(vae.parameters()).dtype
    scaling = float(vae.config.scaling_factor)
    ins, outs = [], []
    starts = range(0, len(records), batch_size)
    for start in tqdm(starts, desc="encoding triplets", disable=not progress, mininterval=5):
        chunk = records[start : start + batch_size]
        pics = [(_picture(r.input, resolution), _picture(r.edited, resolution)) for r in chunk]
        shapes = {p.shape for pair in pics for p in pair}
        if len(shapes) != 1:
            raise InputError(
                f"training pictures differ in size ({sorted(shapes)[:3]}); pass a resolution to crop them alike"
            )
        x = torch.from_numpy(np.stack([p for pair in pics for p in pair])).permute(0, 3, 1, 2) * 2.0 - 1.0
        z = vae.encode(x.to(dtype)).latent_dist.mode().float()
        ins.append(z[0::2])
        outs.append(z[1::2] * scaling)
    return LatentDataset(torch.cat(ins), torch.cat(outs), [r.instruction for r in records])


# ----------------------------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of parameters, with the usual warm-up ``min(decay, (1+n)/(10+n))``."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter]) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in params.items():
            self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1 - d)

    @torch.no_grad()
    def copy_to(self, params: dict[str, nn.Parameter]) -> None:
        for k, p in params.items():
            p.copy_(self.shadow[k].to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


# ----------------------------------------------------------------------------------------------- trainer

@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


class Trainer:
    """Trains ``unet`` (and optionally ``text_encoder``) on a :class:`LatentDataset`; see the module docstring."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler_config: dict[str, Any], data: LatentDataset,
                 config: TrainConfig):
        from diffusers import DDPMScheduler

        if unet.config.in_channels != 8:
            raise InputError(f"the UNet has {unet.config.in_channels} input channels; IP2P training needs 8")
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        self.data, self.config = data, config
        self.scheduler_config = dict(scheduler_config)
        self.noise_scheduler = DDPMScheduler.from_config({
            k: v for k, v in scheduler_config.items() if not k.startswith("_")
        })
        alphas = self.noise_scheduler.alphas_cumprod.float()
        self.snr = alphas / (1 - alphas)
        self.state = TrainState()
        self.generator = torch.Generator().manual_seed(config.seed)

        max_tokens = int(text_encoder.config.max_position_embeddings)

        def tok(texts):
            return tokenizer(texts, padding="max_length", max_length=max_tokens, truncation=True,
                             return_tensors="pt").input_ids

        # Tokenised once: the dataset's instructions, and "" for examples whose text is dropped (the sampler
        # encodes an empty negative prompt the same way, so dropped text is what e_I and e_U see).
        self.tokens = tok(list(data.instructions))
        self.empty_tokens = tok([""])[0]

        unet.train()
        if config.lora_rank:
            add_lora(unet, config.lora_rank, config.lora_alpha, seed=config.seed)
        else:
            unet.requires_grad_(True)
        self.train_text = config.text_encoder_lr is not None
        text_encoder.requires_grad_(self.train_text).train(self.train_text)
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": config.learning_rate}]
        if self.train_text:
            groups.append({"params": list(text_encoder.parameters()), "lr": config.text_encoder_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.ema = EMA(self.trainable(), config.ema_decay) if config.ema_decay else None

    def _lr_factor(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if not c.cosine_decay:
            return 1.0
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.steps - c.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def trainable(self) -> dict[str, nn.Parameter]:
        params = {f"unet.{k}": p for k, p in self.unet.named_parameters() if p.requires_grad}
        if self.train_text:
            params.update({f"text_encoder.{k}": p for k, p in self.text_encoder.named_parameters()})
        return params

    def loss_on(self, idx: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The training loss for examples ``idx`` with the given noise, timesteps and dropout draws ``r``."""
        c = self.config
        z0 = self.data.edited_latents[idx]
        image = self.data.input_latents[idx]
        # r in [0, pt): text dropped; [pt, pt+pb): both; [pt+pb, pt+pb+pi): image dropped.
        drop_text = r < c.p_drop_text + c.p_drop_both
        drop_image = (r >= c.p_drop_text) & (r < c.p_drop_text + c.p_drop_both + c.p_drop_image)
        tokens = torch.where(drop_text[:, None], self.empty_tokens[None], self.tokens[idx])
        image = image * (~drop_image).float()[:, None, None, None]
        noisy = self.noise_scheduler.add_noise(z0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=c.mixed_precision == "bf16"):
            with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
                text = self.text_encoder(tokens)[0]
            pred = self.unet(torch.cat([noisy, image], dim=1), t, encoder_hidden_states=text).sample
        per_example = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        if c.snr_gamma:
            snr = self.snr[t]
            per_example = per_example * torch.clamp(snr, max=c.snr_gamma) / snr
        return per_example.mean()

    def draw(self, batch_size: int | None = None):
        """The random draws of one step, all from the trainer's own generator (which checkpoints save)."""
        b = batch_size or self.config.batch_size
        g = self.generator
        idx = torch.randint(0, len(self.data), (b,), generator=g)
        noise = torch.randn((b, *self.data.edited_latents.shape[1:]), generator=g)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        r = torch.rand(b, generator=g)
        return idx, noise, t, r

    def step(self) -> float:
        loss = self.loss_on(*self.draw())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(self.trainable())
        self.state.step += 1
        value = loss.item()
        self.state.losses.append(value)
        return value

    def train(self, checkpoint_dir: Path | None = None, progress: bool = True,
              should_stop: Callable[[], bool] | None = None, steps: int | None = None) -> TrainState:
        """Run up to ``config.steps`` (or ``steps`` more); checkpoints every ``checkpoint_every`` and at the end."""
        from tqdm.auto import tqdm

        end = self.config.steps if steps is None else min(self.config.steps, self.state.step + steps)
        bar = tqdm(total=self.config.steps, initial=self.state.step, desc="training", disable=not progress,
                   mininterval=5)
        started, first = time.time(), self.state.step
        try:
            while self.state.step < end:
                loss = self.step()
                bar.update(1)
                s = self.state.step
                if s % self.config.log_every == 0 or s == end:
                    recent = float(np.mean(self.state.losses[-self.config.log_every:]))
                    bar.set_postfix(loss=f"{recent:.4f}")
                    log.info("step %d/%d loss %.4f (%.2f s/step)", s, self.config.steps, recent,
                             (time.time() - started) / max(1, s - first))
                if checkpoint_dir is not None and (s % self.config.checkpoint_every == 0 or s == end):
                    self.save_checkpoint(checkpoint_dir)
                if should_stop is not None and should_stop():
                    log.info("training stopped at step %d on request", s)
                    if checkpoint_dir is not None:
                        self.save_checkpoint(checkpoint_dir)
                    break
                del loss
        finally:
            bar.close()
        return self.state

    # -------------------------------------------------------------------------------- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "config": asdict(self.config),
            "step": self.state.step,
            "losses": list(self.state.losses),
            "trainable": {k: p.detach().clone() for k, p in self.trainable().items()},
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def save_checkpoint(self, directory: Path) -> Path:
        """Atomically replace ``directory/checkpoint.pt``: a run killed mid-write still leaves the previous one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CHECKPOINT_NAME
        tmp = path.with_suffix(".tmp")
        torch.save(self.checkpoint_state(), tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / CHECKPOINT_NAME
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(
                f"{path}: cannot be read as a training checkpoint ({exc}); delete it to start over"
            ) from exc
        saved = {k: v for k, v in state["config"].items() if k not in ("steps", "checkpoint_every", "log_every")}
        now = {k: v for k, v in asdict(self.config).items() if k in saved}
        changed = {k: (saved[k], now[k]) for k in saved if saved[k] != now.get(k)}
        if changed:
            raise InputError(
                f"{path}: was written with different settings "
                f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                "resume with the same settings, or use a new output folder"
            )
        params = self.trainable()
        if set(params) != set(state["trainable"]):
            raise InputError(f"{path}: its weights do not match this model; use a new output folder")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["trainable"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.generator.set_state(state["generator"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.state = TrainState(int(state["step"]), list(state["losses"]))
        log.info("resumed from %s at step %d", path, self.state.step)

    # -------------------------------------------------------------------------------- results

    def final_modules(self, use_ema: bool = True, merge: bool = True):
        """Copies of (unet, text_encoder) as they should be saved: EMA weights if kept, LoRA merged in.

        With ``merge=False`` a LoRA stays an adapter on the UNet copy (for :func:`.lora.save_lora`), so the LoRA
        file and the merged model are made from the same (EMA) weights.
        """
        unet, text_encoder = copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder)
        if use_ema and self.ema is not None:
            params = {f"unet.{k}": p for k, p in unet.named_parameters() if f"unet.{k}" in self.ema.shadow}
            params.update({f"text_encoder.{k}": p for k, p in text_encoder.named_parameters()
                           if f"text_encoder.{k}" in self.ema.shadow})
            self.ema.copy_to(params)
        if self.config.lora_rank and merge:
            merge_lora(unet)
        return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False)


def save_model(out: Path, unet, vae, text_encoder, tokenizer, scheduler_config: dict[str, Any],
               single_file_name: str = "model.safetensors", dtype: torch.dtype | None = None) -> tuple[Path, Path]:
    """Write ``out/diffusers`` (a diffusers pipeline folder) and ``out/<single_file_name>``; returns both paths.

    ``dtype`` (e.g. fp16) shrinks the files; the loader casts to the precision the user picks anyway.
    """
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from ..models.loading import save_single_file

    out = Path(out)
    if dtype is not None:
        unet, vae, text_encoder = (copy.deepcopy(m).to(dtype) for m in (unet, vae, text_encoder))
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    folder = out / "diffusers"
    pipe.save_pretrained(str(folder))
    single = save_single_file((unet, vae, text_encoder), out / single_file_name, tokenizer_dir=folder / "tokenizer",
                              scheduler_config=scheduler_config)
    return folder, single


# ----------------------------------------------------------------------------------------------- fine-tuning entry

def fine_tune(model: str, data: str, out: Path, config: TrainConfig, resolution: int | None = None,
              restart: bool = False, progress: bool = True) -> tuple[Path, Path]:
    """Fine-tune the model at ``model`` (folder, single file or hub id) on ``data``; resumes from ``out`` if it can."""
    from ..models.loading import ModelSource, load_components
    from ..models.precision import resolve_precision

    out = Path(out)
    components = load_components(ModelSource.from_path(model), resolve_precision("fp32", "cpu"), "cpu")
    records = read_data(data)
    log.info("fine-tuning %s on %d triplets from %s", components.source.name, len(records), data)
    dataset = encode_dataset(components.vae, records, resolution, progress=progress)
    trainer = Trainer(components.unet, components.text_encoder, components.tokenizer, components.scheduler_config,
                      dataset, config)
    ckpt = out / "checkpoints"
    if (ckpt / CHECKPOINT_NAME).is_file() and not restart:
        trainer.load_checkpoint(ckpt)
    trainer.train(ckpt, progress=progress)
    unet, text_encoder = trainer.final_modules(merge=False)
    if config.lora_rank:
        if trainer.train_text:
            log.warning("the LoRA files hold the UNet's adapter only; the text encoder training is in the merged "
                        "model alone")
        for path in save_lora(out, unet):
            log.info("wrote LoRA %s", path)
        merge_lora(unet)
    return save_model(out, unet, components.vae, text_encoder, components.tokenizer, components.scheduler_config)
