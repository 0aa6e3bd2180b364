"""A batch job from rows to summary: check rows, skip what is done, hand the rest to an engine, write results.

The driver (this module, in the process the user started) is the only writer of the output folder: engines hand
each outcome back to :func:`run_job`'s callback, which commits it through :class:`.store.OutputStore`. So the
exactly-once rules live in one place whichever engine edits.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..errors import InputError
from .filtering import ClipFilter
from .keys import HashMemo, model_identity, row_key, settings_fingerprint
from .rows import BadRow, Row
from .store import FILTERED_NAME, OutputStore
from .work import JobSpec, Outcome, Task

log = logging.getLogger(__name__)

Engine = Callable[[JobSpec, Iterable[Task], Callable[[Outcome], None]], None]


@dataclass
class Summary:
    """What a job did; :meth:`report` logs it. Row numbers are the input's (manifest lines or folder order)."""

    rows: int
    edited: list[int] = field(default_factory=list)
    done_before: list[int] = field(default_factory=list)  # found done with the same settings: not edited again
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (row, the earlier row it repeats)
    failed: list[BadRow] = field(default_factory=list)
    left_out: int = 0  # manifest lines of other settings or rows, dropped from triplets.jsonl
    filtered: list[dict] = field(default_factory=list)  # records of rows done but below the CLIP filter
    clip: ClipFilter | None = None
    rescored: int = 0  # pictures done before, scored in this job (first filter, or another CLIP or captions)
    seconds: float = 0.0

    @property
    def skipped(self) -> int:
        return len(self.done_before) + len(self.duplicates)

    def report(self, folder: Path) -> None:
        rate = f", {len(self.edited) / self.seconds:.2f} pictures/s" if self.edited and self.seconds > 0 else ""
        log.info("batch: %d rows: %d edited, %d skipped (%d already done, %d duplicates), %d failed (%.1f s%s)",
                 self.rows, len(self.edited), self.skipped, len(self.done_before), len(self.duplicates),
                 len(self.failed), self.seconds, rate)
        if self.clip is not None:
            log.info("batch: %d filtered out (kept: %s; listed in %s with their scores)%s", len(self.filtered),
                     self.clip.describe(), FILTERED_NAME,
                     f"; {self.rescored} pictures done before scored now" if self.rescored else "")
            for r in self.filtered:
                log.info("batch: row %d filtered: clip_direction %.4f, clip_image %.4f", r["row"],
                         r["clip_direction"], r["clip_image"])
        for row, first in self.duplicates:
            log.info("batch: row %d skipped: same picture, mask, instruction, seed and settings as row %d", row, first)
        for bad in sorted(self.failed, key=lambda b: b.number):
            log.warning("batch: failed: %s", bad.describe())
        if self.left_out:
            log.info("batch: %d results of other settings or rows no longer in the input were left out of %s "
                     "(their pictures stay in %s)", self.left_out, "triplets.jsonl", folder)


@dataclass(frozen=True)
class Planned:
    """A checked row: its task for a worker and the manifest fields that do not depend on the outcome."""

    row: Row
    task: Task
    record: dict
    score_key: str | None = None  # with --filter-clip: what the row's scores must have been made from


def picture_size(path: Path) -> tuple[int, int]:
    """(width, height) as :func:`..editing.images.load_image` will see it, from the header only (no decode)."""
    from PIL import Image, UnidentifiedImageError

    from ..editing.resolution import check_input_size

    if not path.exists():
        raise InputError(f"{path}: no such picture; check the path")
    if not path.is_file():
        raise InputError(f"{path}: is not a file")
    try:
        with Image.open(path) as im:
            width, height = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the sides
                width, height = height, width
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path.name}: cannot be read as a picture ({exc}); give a PNG, JPEG or WebP") from None
    check_input_size(height, width)
    return width, height


def _relative(path: Path, folder: Path) -> str:
    """``path`` as the manifest writes it: relative to the output folder (the trainer reads it so), else absolute."""
    try:
        return Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def output_name(image: Path, key: str) -> str:
    """The edited picture's file name: the input's name (readable) and the key's start (unique per result)."""
    stem = re.sub(r"[^\w.-]+", "_", image.stem)[:60] or "picture"
    return f"{stem}-{key[:16]}.png"


def plan_rows(rows: list[Row | BadRow], spec: JobSpec, seed: int, folder: Path, memo: HashMemo,
              clip: ClipFilter | None = None) -> tuple[list[Planned], list[BadRow]]:
    """Every row checked (files exist, decode as pictures, mask of the picture's size; with ``clip``, something
    to measure the edit against) and keyed."""
    model = model_identity(spec.source, spec.loras, memo)
    settings = settings_fingerprint(spec.settings, spec.negative, spec.precision, spec.device)
    planned, bad = [], []
    for row in rows:
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        try:
            size = picture_size(row.image)
            image_hash = memo.digest(row.image)
            mask_hash = None
            if row.mask is not None:
                mask_size = picture_size(row.mask)
                if mask_size != size:
                    raise InputError(f"the mask {row.mask.name} is {mask_size[0]}x{mask_size[1]} but the picture is "
                                     f"{size[0]}x{size[1]}; give the mask made for this picture")
                mask_hash = memo.digest(row.mask)
            score_key = None if clip is None else clip.score_key(row.instruction, row.caption_before,
                                                                 row.caption_after)
        except (InputError, OSError) as exc:
            bad.append(BadRow(row.number, row.image.name, str(exc)))
            continue
        row_seed = seed if row.seed is None else row.seed
        guidance = (spec.guidance[0] if row.text_guidance is None else row.text_guidance,
                    spec.guidance[1] if row.image_guidance is None else row.image_guidance)
        key = row_key(image_hash, mask_hash, row.instruction, row_seed, guidance, model, settings)
        task = Task(row.number, key, str(row.image), row.instruction, row_seed,
                    None if row.mask is None else str(row.mask), *guidance)
        record = {
            "input": _relative(row.image, folder), "edited": output_name(row.image, key),
            "instruction": row.instruction, "mask": None if row.mask is None else _relative(row.mask, folder),
            "seed": row_seed, **model, "settings": settings, "key": key,
        }
        for name in ("caption_before", "caption_after"):
            if getattr(row, name) is not None:
                record[name] = getattr(row, name)
        planned.append(Planned(row, task, record, score_key))
    return planned, bad


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="batch", unit="picture", disable=not enabled or total == 0)


def run_job(rows: list[Row | BadRow], spec: JobSpec, out: str | Path, engine: Engine, seed: int = 0,
            progress: bool = True, clip: ClipFilter | None = None) -> Summary:
    """Edit every good row not already done in ``out``; returns the summary (also logged).

    ``seed`` is the seed of rows that name none. ``engine(spec, tasks, on_outcome)`` runs the edits; it is not
    called at all when nothing is left to do, so a re-run of a finished job does not even load the model.
    With ``clip`` every result is scored and those below its thresholds go to ``filtered.jsonl`` instead of
    ``triplets.jsonl``; rows done before are re-filtered from their stored scores (scored only if they have
    none of this CLIP and texts), never edited again.
    """
    start = time.monotonic()
    summary = Summary(rows=len(rows), clip=clip)
    with OutputStore(out) as store:
        memo = HashMemo(store.state / "hashes.json")
        if clip is not None:
            clip.identify(memo)
        planned, bad = plan_rows(rows, spec, seed, store.folder, memo, clip)
        memo.save()
        summary.failed.extend(bad)
        previous = store.read()
        results: dict[str, dict] = {}  # key -> manifest record, of this job
        first_row: dict[str, int] = {}
        todo: list[Planned] = []
        unscored: list[Planned] = []
        for p in planned:
            key = p.task.key
            if key in first_row:
                summary.duplicates.append((p.row.number, first_row[key]))
                continue
            first_row[key] = p.row.number
            if key in previous:
                # Done before: keep its picture, resolved guidance and scores; paths and row number are this run's.
                results[key] = {**previous[key], **p.record, "edited": previous[key]["edited"], "row": p.row.number}
                summary.done_before.append(p.row.number)
                if clip is not None and results[key].get("clip_key") != p.score_key:
                    unscored.append(p)
            else:
                todo.append(p)
        summary.left_out = len(set(previous) - set(results))
        by_key = {p.task.key: p for p in todo}
        order = {key: n for n, key in enumerate(first_row)}

        def score(p: Planned, record: dict) -> None:
            record.update(clip.score(p.row.image, store.folder / record["edited"], p.row.instruction,
                                     p.row.caption_before, p.row.caption_after, p.score_key))

        def rewrite() -> None:
            ordered = sorted(results.values(), key=lambda r: order[r["key"]])
            kept = [r for r in ordered if clip is None or clip.passes(r)]
            summary.filtered = [r for r in ordered if clip is not None and not clip.passes(r)]
            store.rewrite(kept, summary.filtered)

        if unscored:
            # Done before without this CLIP's scores (no filter then, or another CLIP or captions): the pictures
            # are scored as they are, not edited again.
            log.info("batch: scoring %d pictures done before with CLIP %s", len(unscored), clip.source.name)
            for p in unscored:
                score(p, results[p.task.key])
            summary.rescored = len(unscored)
        rewrite()  # drops cut-off lines, duplicates and other settings' rows before appending; re-filters
        bar = _progress(len(todo), progress)

        def on_outcome(outcome: Outcome) -> None:
            p = by_key.get(outcome.key)
            if p is None or outcome.key in results:
                return  # an engine retried a task whose result is already in: exactly once
            if outcome.error is not None:
                summary.failed.append(BadRow(p.row.number, p.row.image.name, outcome.error))
            else:
                record = {**p.record, "text_guidance": outcome.text_guidance,
                          "image_guidance": outcome.image_guidance, "row": p.row.number}
                store.put_picture(record["edited"], outcome.png)
                if clip is not None:
                    score(p, record)
                store.append(record, filtered=clip is not None and not clip.passes(record))
                results[outcome.key] = record
                summary.edited.append(p.row.number)
            bar.update(1)

        try:
            if todo:
                if clip is not None:
                    clip.load()  # a CLIP that cannot be loaded stops the job before the edit model loads
                engine(spec, [p.task for p in todo], on_outcome)
        except KeyboardInterrupt:
            # Everything committed so far stays done (see .store); the same command carries on from there.
            log.warning("batch: stopped with %d of %d rows edited; run the same command again to go on",
                        len(summary.edited), len(todo))
            raise
        finally:
            bar.close()
            summary.seconds = time.monotonic() - start
        failed = {b.number for b in summary.failed}
        for p in todo:
            if p.task.key not in results and p.row.number not in failed:
                summary.failed.append(BadRow(p.row.number, p.row.image.name, "the engine returned no result"))
        rewrite()
    summary.report(Path(out))
    return summary
