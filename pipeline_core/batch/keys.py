"""What makes two results the same result: content hashes and one key per row.

A row's key is a hash over everything that changes its pixels: the input picture's and the mask's contents (not
their paths: a moved dataset is still done), the instruction, negative prompt, seed and guidance, the model's
files, LoRA files and strengths, and every sampler setting. The key names the output file, so a re-run finds a
row done when a picture of that key is in place, and any changed setting gives new keys for exactly the rows it
changes.

Hashing a multi-GB model on every run would cost seconds to minutes, so digests are remembered in the output
folder by (path, size, modification time), as :class:`..models.lora.LoraRef` tells a rewritten file apart.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from ..editing.settings import EditSettings
from ..models.loading import ModelSource
from ..models.lora import LoraRef

KEY_VERSION = 1  # raised when what a key covers changes, so old results are redone rather than misread
_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashMemo:
    """SHA-256 of files, remembered in a JSON file by (path, size, mtime) and saved atomically."""

    def __init__(self, path: Path):
        self.path = path
        self._known: dict[str, list] = {}
        self._changed = False
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                self._known = loaded
        except (OSError, ValueError):
            pass  # no memo yet, or a damaged one: everything is hashed again, nothing is wrong

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        known = self._known.get(str(path))
        if known is not None and known[:2] == stamp:
            return known[2]
        digest = file_digest(path)
        self._known[str(path)] = [*stamp, digest]
        self._changed = True
        return digest

    def folder_digest(self, folder: Path) -> str:
        """One digest over every file under ``folder`` (names and contents), hidden files left out."""
        h = hashlib.sha256()
        folder = Path(folder)
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder)
            if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                h.update(f"{rel.as_posix()}\0{self.digest(p)}\n".encode())
        return h.hexdigest()

    def path_digest(self, path: Path) -> str:
        return self.folder_digest(path) if Path(path).is_dir() else self.digest(path)

    def save(self) -> None:
        if not self._changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._known))
        os.replace(tmp, self.path)
        self._changed = False


def model_identity(source: ModelSource, loras: tuple[LoraRef, ...], memo: HashMemo) -> dict:
    """The model as the key and ``triplets.jsonl`` name it: its files' digest, tokenizer and LoRA stack.

    A Hub model is named by its id: its files are only known once downloaded, at load time, which a re-run
    with nothing to do must not trigger.
    """
    identity = {
        "model": source.location if source.kind == "hub" else source.name,
        "model_kind": source.kind,
        "model_hash": None if source.kind == "hub" else memo.path_digest(Path(source.location)),
    }
    if source.tokenizer_dir:
        identity["tokenizer_hash"] = memo.path_digest(Path(source.tokenizer_dir))
    if loras:
        identity["loras"] = [{"file": ref.name, "hash": memo.digest(Path(ref.path)), "strength": ref.strength}
                             for ref in loras]
    return identity


def settings_fingerprint(settings: EditSettings, negative: str, precision: str, device: str) -> dict:
    """Every job-wide setting that changes pixels. The device's kind counts (CPU and CUDA kernels round
    differently); its index does not."""
    fields = asdict(settings)
    # Guidance is per row (the row's own or the command line's, see :func:`row_key`); max_batch never changes an
    # item (each has its own generator, and a batch job edits one row per call anyway); vram only moves parts
    # between memories (the same picture within 1e-3), so stores written before it existed keep their keys.
    for name in ("text_guidance", "image_guidance", "max_batch", "vram"):
        fields.pop(name)
    if settings.speed == "quality":
        # Quality is what every store written before fast mode existed holds: its rows keep their keys.
        fields.pop("speed")
        fields.pop("fast_interval")
    return {**fields, "negative": negative, "precision": precision, "device": device.split(":")[0]}


def row_key(image_hash: str, mask_hash: str | None, instruction: str, seed: int, guidance: tuple, model: dict,
            settings: dict) -> str:
    """The row's key: SHA-256 over a canonical JSON of everything that makes its picture."""
    record = {
        "v": KEY_VERSION, "image": image_hash, "mask": mask_hash, "instruction": instruction, "seed": seed,
        "text_guidance": guidance[0], "image_guidance": guidance[1], "model": model, "settings": settings,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
