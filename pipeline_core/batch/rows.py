"""What a batch job edits: rows of (picture, instruction, optional mask, seed and guidance).

Two ways to say it, as the issue asks:

- a folder of pictures crossed with one instruction (``--instruction``) or with every line of a text file
  (``--instructions FILE``), picture-major: row 1 is the first picture with the first instruction;
- a JSONL manifest, one object a line: ``{"image", "instruction", ["mask"], ["seed"], ["text_guidance"],
  ["image_guidance"], ["caption_before"], ["caption_after"]}``, paths relative to the manifest (as the trainer's
  manifests are). Row numbers are line numbers, so a report names the line to fix.

A row that cannot be right (no image path, an empty instruction, a seed out of range) becomes a :class:`BadRow`
with the reason; the job reports it and edits the others. Only a problem with the whole input (no such folder,
no pictures at all) raises.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .. import limits
from ..editing.checks import check_float
from ..editing.seeds import check_seed
from ..errors import InputError

log = logging.getLogger(__name__)

# The picture formats a folder input takes (those load_image reads and people keep datasets in).
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# The captions change no pixel: only ``--filter-clip`` reads them (both given: the paper's CLIP direction).
MANIFEST_KEYS = ("image", "instruction", "mask", "seed", "text_guidance", "image_guidance", "caption_before",
                 "caption_after")


@dataclass(frozen=True)
class Row:
    """One edit to make. ``None`` fields take the command line's value (seed, guidance) or mean "no mask"."""

    number: int  # 1-based: the manifest line, or the position in the folder x instructions order
    image: Path
    instruction: str
    mask: Path | None = None
    seed: int | None = None
    text_guidance: float | None = None
    image_guidance: float | None = None
    caption_before: str | None = None
    caption_after: str | None = None

    @property
    def where(self) -> str:
        return f"row {self.number} ({self.image.name})"


@dataclass(frozen=True)
class BadRow:
    """A row that is not edited, and why; the summary lists these."""

    number: int
    what: str  # the picture's name or the manifest line, whatever identifies the row best
    reason: str

    def describe(self) -> str:
        return f"row {self.number} ({self.what}): {self.reason}"


def read_instructions(path: str | Path) -> list[str]:
    """One instruction a line; blank lines and lines starting with ``#`` are left out."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--instructions {path}: no such file; give a text file with one instruction a line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--instructions {path}: cannot be read as UTF-8 text ({exc})") from None
    lines = [line.strip() for line in text.splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    if not instructions:
        raise InputError(f"--instructions {path}: holds no instruction; write one a line, e.g. make it winter")
    return instructions


def folder_rows(folder: Path, instructions: list[str]) -> list[Row | BadRow]:
    """Every picture file of ``folder`` (not its subfolders), sorted by name, with every instruction."""
    pictures = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICTURE_SUFFIXES and not p.is_dir())
    if not pictures:
        raise InputError(f"{folder}: holds no pictures ({', '.join(PICTURE_SUFFIXES)}); give a folder of pictures "
                         "or a .jsonl manifest")
    rows: list[Row | BadRow] = []
    for picture in pictures:
        for instruction in instructions:
            rows.append(Row(len(rows) + 1, picture, instruction))
    return rows


def _field(obj: dict, name: str, check):
    value = obj.get(name)
    return None if value is None else check(value)


def manifest_row(number: int, line: str, base: Path) -> Row | BadRow:
    """Line ``number`` of a manifest as a row, or a bad row saying what to fix on that line."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return BadRow(number, "manifest line", f"not JSON ({exc}); write one JSON object a line")
    if not isinstance(obj, dict):
        return BadRow(number, "manifest line", "not a JSON object; write {\"image\": ..., \"instruction\": ...}")
    image = obj.get("image")
    if not isinstance(image, str) or not image.strip():
        return BadRow(number, "manifest line", "no \"image\" path; each row needs the picture to edit")
    what = Path(image).name
    instruction = obj.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        return BadRow(number, what, "the instruction is empty; write the edit you want, e.g. \"make it winter\"")
    mask = obj.get("mask")
    if mask is not None and (not isinstance(mask, str) or not mask.strip()):
        return BadRow(number, what, "\"mask\" must be a picture's path (or left out for no mask)")
    try:
        seed = _field(obj, "seed", check_seed)
        text_guidance = _field(obj, "text_guidance", lambda v: check_float(v, "text_guidance", limits.TEXT_GUIDANCE))
        image_guidance = _field(obj, "image_guidance",
                                lambda v: check_float(v, "image_guidance", limits.IMAGE_GUIDANCE))
    except InputError as exc:
        return BadRow(number, what, str(exc))
    captions = [obj.get(name) for name in ("caption_before", "caption_after")]
    if any(c is not None and not isinstance(c, str) for c in captions):
        return BadRow(number, what, "\"caption_before\" and \"caption_after\" must be texts (or left out)")
    return Row(number, base / image, instruction.strip(), None if mask is None else base / mask, seed,
               text_guidance, image_guidance, *captions)


def manifest_rows(path: Path) -> list[Row | BadRow]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read as a UTF-8 JSONL manifest ({exc})") from None
    rows: list[Row | BadRow] = []
    unknown: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        row = manifest_row(number, line, path.parent)
        rows.append(row)
        if isinstance(row, Row):
            unknown |= set(json.loads(line)) - set(MANIFEST_KEYS)
    if not rows:
        raise InputError(f"{path}: the manifest holds no rows; write one JSON object a line, e.g. "
                         '{"image": "cat.png", "instruction": "make it winter"}')
    if unknown:
        # Extra keys are allowed (datasets carry ids and captions); a typo like "seeed" would silently use the
        # default seed, so the names are said once.
        log.warning("batch: %s: keys %s are not used (a row reads %s)", path.name, ", ".join(sorted(unknown)),
                    ", ".join(MANIFEST_KEYS))
    return rows


def read_rows(source: str, instruction: str | None = None, instructions: str | None = None) -> list[Row | BadRow]:
    """The rows of a batch job, in row order; raises :class:`InputError` only when the whole input is wrong."""
    path = Path(source).expanduser()
    if path.is_dir():
        if instruction is None and instructions is None:
            raise InputError(f"{path} is a folder of pictures: say what to do with --instruction \"make it winter\" "
                             "or --instructions FILE (one instruction a line)")
        if instruction is not None:
            if not instruction.strip():
                raise InputError("the instruction is empty; write the edit you want, e.g. \"make it winter\"")
            texts = [instruction.strip()]
        else:
            texts = read_instructions(instructions)
        return folder_rows(path, texts)
    if path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise InputError(f"{path}: give a folder of pictures or a .jsonl manifest (one JSON object a line), "
                             "not a single file; to edit one picture use `ip2p-edit edit`")
        if instruction is not None or instructions is not None:
            raise InputError(f"{path.name} is a manifest, which gives each row its instruction; leave out "
                             "--instruction/--instructions")
        return manifest_rows(path)
    raise InputError(f"{path}: no such folder or manifest; give a folder of pictures or a .jsonl manifest")
