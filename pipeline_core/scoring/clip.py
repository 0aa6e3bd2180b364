"""A user's CLIP for scoring: where it comes from, how it is loaded, and how pictures and texts are embedded.

Weights are always the user's: a transformers ``CLIPModel`` folder (``config.json`` + weights, with its tokenizer
and ``preprocessor_config.json``), a Hugging Face id the user typed (the only download), or ``toy``, the pack's
shipped toy CLIP for the shapes world. Nothing else is ever fetched.

Pictures are prepared as ``CLIPImageProcessor`` prepares them (shortest side to ``size``, bicubic with
antialiasing as its torchvision path does, centre crop to ``crop_size``, normalise with the folder's mean and
std), here in torch, because the processor needs torchvision, which the pack does not depend on. The paper's own
metric code squashes the whole picture to 224 x 224 instead of cropping; for square pictures the two agree.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError, ModelLoadError
from ..models.assets import TOY_CLIP_ALIAS, toy_clip_path
from ..models.loading import _why_local_path

log = logging.getLogger(__name__)

# CLIP's own normalisation: used when a folder has no preprocessor_config.json (as some CLIP exports do).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors"]
_FORMS = ("give a transformers CLIP folder (config.json with model_type 'clip' + model.safetensors + tokenizer), "
          f"'{TOY_CLIP_ALIAS}' for the shipped toy CLIP (shapes pictures only), or a Hugging Face id such as "
          "openai/clip-vit-large-patch14")


@dataclass(frozen=True)
class ClipSource:
    """Where a CLIP comes from: a local ``folder`` or a ``hub`` id."""

    kind: str
    location: str

    @property
    def name(self) -> str:
        return self.location if self.kind == "hub" else Path(self.location).name

    @classmethod
    def from_text(cls, text: str) -> "ClipSource":
        """What a user typed: ``toy``, an existing folder, or an owner/name Hub id (never a mistyped path)."""
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"no CLIP given; {_FORMS}")
        text = text.strip()
        if text == TOY_CLIP_ALIAS:
            return cls("folder", str(toy_clip_path()))
        path = Path(text).expanduser()
        if path.is_dir():
            return cls("folder", str(path.resolve()))
        if path.is_file():
            raise ModelLoadError(f"{text}: is a file; a CLIP for scoring is a folder (config.json + weights + "
                                 f"tokenizer files) — {_FORMS}")
        why = _why_local_path(text)
        if why is None:
            return cls("hub", text)
        raise ModelLoadError(f"{text}: no such folder ({path.resolve()} does not exist; {why}, so it was not looked "
                             f"up on the Hugging Face Hub); {_FORMS}")


@dataclass(frozen=True)
class Preprocess:
    """``CLIPImageProcessor``'s settings, read from ``preprocessor_config.json``."""

    size: int  # shortest side after resizing
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: bool = True
    center_crop: bool = True

    @classmethod
    def from_config(cls, config: dict, image_size: int) -> "Preprocess":
        size = config.get("size", image_size)
        size = size.get("shortest_edge", size.get("height", image_size)) if isinstance(size, dict) else size
        crop = config.get("crop_size", size)
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(int(size), (int(crop[0]), int(crop[1])), tuple(config.get("image_mean", OPENAI_MEAN)),
                   tuple(config.get("image_std", OPENAI_STD)), bool(config.get("do_resize", True)),
                   bool(config.get("do_center_crop", True)))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """ComfyUI IMAGE ``[B, H, W, C]`` floats 0..1 -> normalised ``[B, 3, crop_h, crop_w]`` pixel values."""
        x = images[..., :3].permute(0, 3, 1, 2).float()
        if self.resize:
            h, w = x.shape[-2:]
            short, long = min(h, w), max(h, w)
            # transformers' get_resize_output_image_size: the long side is truncated, not rounded.
            new_long = int(self.size * long / short)
            new_h, new_w = (self.size, new_long) if h <= w else (new_long, self.size)
            if (new_h, new_w) != (h, w):
                x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
                x = x.clamp(0, 1)  # bicubic overshoots; the processor's 8-bit pictures cannot
        if self.center_crop:
            x = _center_crop(x, self.crop)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def _center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """The processor's ``center_crop``: pads with zeros when the picture is smaller; offsets truncated, as there."""
    ch, cw = crop
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        pad_h, pad_w = max(0, ch - h), max(0, cw - w)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = x.shape[-2:]
    top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
    return x[..., top : top + ch, left : left + cw]


def _pooled(out) -> torch.Tensor:
    """transformers 5 returns projected embeddings as an output object's ``pooler_output``; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """A loaded CLIP: unit-length image and text embeddings in its joint space."""

    def __init__(self, model, tokenizer, preprocess: Preprocess, name: str, device: torch.device | str = "cpu"):
        self.model = model.eval().requires_grad_(False).to(device)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name = name
        self.device = torch.device(device)
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """IMAGE ``[B, H, W, C]`` 0..1 -> ``[B, D]`` unit vectors (float32, CPU)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] < 3:
            raise InputError(f"expected pictures [B, H, W, 3], got {getattr(images, 'shape', type(images).__name__)}")
        dtype = next(self.model.parameters()).dtype
        out = []
        for start in range(0, images.shape[0], batch_size):
            pixels = self.preprocess(images[start : start + batch_size].cpu())
            feats = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, dtype)))
            out.append(F.normalize(feats.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> ``[N, D]`` unit vectors; longer texts are cut at the model's token limit, as CLIP's are."""
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=self.max_tokens, truncation=True,
                                return_tensors="pt")
        feats = _pooled(self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                                     attention_mask=tokens.attention_mask.to(self.device)))
        return F.normalize(feats.float(), dim=-1).cpu()


def download_clip(repo_id: str) -> Path:
    """The one network access of scoring, only for an id the user typed."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        log.info("ip2p: CLIP %s is not in the local Hugging Face cache; downloading it (only because it was typed)",
                 repo_id)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise ModelLoadError(
            f"{repo_id}: could not be downloaded ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}). "
            "Offline? Copy a transformers CLIP folder into ComfyUI/models/clip/ and pick it instead"
        ) from exc


def load_clip(source: ClipSource, device: torch.device | str = "cpu") -> ClipScorer:
    """Load the CLIP ``source`` names; raises :class:`ModelLoadError` saying what is missing and what to do."""
    from transformers import CLIPModel, CLIPTokenizer

    folder = download_clip(source.location) if source.kind == "hub" else Path(source.location)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no config.json; {_FORMS}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{config_file}: not valid JSON ({exc})") from None
    if config.get("model_type") != "clip":
        raise ModelLoadError(
            f"{folder}: is a '{config.get('model_type', 'unknown')}' model, not a CLIP with both image and text "
            "towers (model_type 'clip'); a text encoder alone (e.g. clip_l.safetensors) cannot score pictures — "
            f"{_FORMS}"
        )
    try:
        # fp32: the toy and any CLIP are cheap next to an edit, and scores should not move with the precision.
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: cannot be loaded as a CLIP ({' '.join(str(exc).split())[:300]})") from exc
    pre_file = folder / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    preprocess = Preprocess.from_config(pre, int(model.config.vision_config.image_size))
    log.info("ip2p: loaded CLIP %s for scoring (%d px)", source.name, preprocess.crop[0])
    return ClipScorer(model, tokenizer, preprocess, source.name, device)


class ClipCache:
    """Loaded CLIPs by (source, device), so several scoring nodes and a sweep load one once. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[tuple[ClipSource, str], ClipScorer] = {}

    def get(self, source: ClipSource, device: torch.device | str = "cpu") -> ClipScorer:
        key = (source, str(torch.device(device)))
        with self._lock:
            if key not in self._entries:
                self._entries[key] = load_clip(source, device)
            return self._entries[key]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


CLIP_CACHE = ClipCache()
