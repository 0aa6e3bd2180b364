"""The output folder of a batch job: edited pictures, ``triplets.jsonl``, and the job's own state.

Exactly-once under crashes rests on three rules:

1. a picture is written to a temporary file in the same folder, flushed to disk, then renamed into place
   (``os.replace`` is atomic), so a picture under its final name is always whole;
2. a ``triplets.jsonl`` line is appended (and fsync'd) only after its picture is in place, so the manifest never
   names a missing picture; a line cut short by a crash is dropped when the job starts again;
3. only one job writes to a folder at a time (an OS lock, released by the kernel even after ``kill -9``), and
   only the driver process writes: workers hand back bytes.

On start the manifest is rewritten atomically with only the lines of this job whose picture exists (duplicates,
cut-off lines and rows of other settings dropped); on finish it is rewritten in row order.

With ``--filter-clip`` a done row's line goes to one of two files: ``triplets.jsonl`` (kept: the trainer's rows)
or ``filtered.jsonl`` (edited and scored, but below a CLIP threshold). Both are read as one record set, so a
filtered row is done like any other. Moving rows between them (new thresholds) takes three atomic replaces,
ordered so that a crash at any point leaves every row in at least one file (see :meth:`OutputStore.rewrite`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from ..errors import InputError

log = logging.getLogger(__name__)

MANIFEST_NAME = "triplets.jsonl"
FILTERED_NAME = "filtered.jsonl"  # rows done but filtered out by CLIP: not training rows, still never redone
STATE_DIR = ".ip2p-batch"  # lock, hash memo and temporary files; hidden so pictures and the manifest stand out


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); Windows cannot open folders and needs no such step."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _lock(handle) -> bool:
    """An exclusive lock on an open file without waiting; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


class OutputStore:
    """The output folder, held for one job (use as a context manager)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        self.state = self.folder / STATE_DIR
        self.manifest = self.folder / MANIFEST_NAME
        self.filtered = self.folder / FILTERED_NAME
        self._tmp = self.state / "tmp"
        self._lock_file = None
        self._out: dict[Path, object] = {}  # append handles, by file

    @staticmethod
    def check(folder: str | Path) -> Path:
        """``folder`` if a job can write there (it may not exist yet); checked before any model loads."""
        folder = Path(folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise InputError(f"--out {folder}: is a file; give a folder for the edited pictures and triplets.jsonl")
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"--out {folder}: cannot be written ({existing} is not a writable folder); "
                             "choose another folder")
        return folder

    def __enter__(self) -> "OutputStore":
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.state / "lock", "a+")
        if not _lock(self._lock_file):
            self._lock_file.close()
            raise InputError(f"--out {self.folder}: another batch job is writing there; wait for it to finish or "
                             "choose another folder")
        # Left by a crash: never results (rule 1), so they go.
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()
        return self

    def __exit__(self, *exc) -> None:
        self._close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    # ------------------------------------------------------------------------------------------------ reading

    def read(self) -> dict[str, dict]:
        """The records of both manifests by key, those whose picture is in place; the first of duplicates wins
        (a crash while rows moved between the files can leave a row in both, with the same record)."""
        records: dict[str, dict] = {}
        for record in _read_lines(self.manifest) + _read_lines(self.filtered):
            key, edited = record.get("key"), record.get("edited")
            if isinstance(key, str) and isinstance(edited, str) and key not in records and (
                (self.folder / edited).is_file()
            ):
                records[key] = record
        return records

    # ------------------------------------------------------------------------------------------------ writing

    def _close(self) -> None:
        for handle in self._out.values():
            handle.close()
        self._out.clear()

    def _replace(self, path: Path, records: list[dict]) -> None:
        tmp = self._tmp / path.name
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.folder)

    def rewrite(self, records: list[dict], filtered: list[dict] | None = None) -> None:
        """Replace ``triplets.jsonl`` by ``records`` and ``filtered.jsonl`` by ``filtered``, each atomically.

        Rows may move either way between the files. First ``filtered.jsonl`` gets the old filtered rows *and* the
        new ones, then ``triplets.jsonl`` is replaced, then ``filtered.jsonl``: after a crash at any point every
        row is in at least one file (a row in both is read once), so no done row is ever edited again.
        ``filtered.jsonl`` is only written when there are (or were) filtered rows, and removed when none are left.
        """
        self._close()
        filtered = filtered or []
        had_filtered = self.filtered.exists()
        if filtered or had_filtered:
            old = _read_lines(self.filtered)
            new_keys = {r["key"] for r in filtered}
            self._replace(self.filtered, filtered + [r for r in old if r.get("key") not in new_keys])
        self._replace(self.manifest, records)
        if filtered:
            self._replace(self.filtered, filtered)
        elif had_filtered:
            os.remove(self.filtered)
            _fsync_dir(self.folder)

    def put_picture(self, name: str, picture: bytes) -> Path:
        """Write a result's picture under its final ``name`` atomically (rule 1); no manifest line yet."""
        final = self.folder / name
        tmp = self._tmp / f"{final.name}.part"
        with open(tmp, "wb") as f:
            f.write(picture)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        return final

    def append(self, record: dict, filtered: bool = False) -> None:
        """Add the line of a result whose picture is in place (rule 2): to ``triplets.jsonl``, or to
        ``filtered.jsonl`` for a row below the CLIP thresholds."""
        path = self.filtered if filtered else self.manifest
        if path not in self._out:
            self._out[path] = open(path, "a", encoding="utf-8")
        out = self._out[path]
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())

    def commit(self, record: dict, picture: bytes) -> None:
        """Put one kept result in place: the picture, then its ``triplets.jsonl`` line (rules 1 and 2)."""
        self.put_picture(record["edited"], picture)
        self.append(record)


def _read_lines(path: Path) -> list[dict]:
    """The whole JSON object lines of ``path`` (none if it does not exist)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash (rule 2)
        if isinstance(record, dict):
            records.append(record)
    return records
