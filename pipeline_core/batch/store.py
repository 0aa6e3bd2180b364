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
        self._tmp = self.state / "tmp"
        self._lock_file = None
        self._out = None

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
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None

    # ------------------------------------------------------------------------------------------------ reading

    def read(self) -> dict[str, dict]:
        """The manifest's records by key, those whose picture is in place; the first of duplicates wins."""
        records: dict[str, dict] = {}
        try:
            lines = self.manifest.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return records
        for line in lines:
            try:
                record = json.loads(line)
                key, edited = record["key"], record["edited"]
            except (ValueError, TypeError, KeyError):
                continue  # a line cut short by a crash (rule 2), or not ours
            if isinstance(key, str) and isinstance(edited, str) and key not in records and (
                (self.folder / edited).is_file()
            ):
                records[key] = record
        return records

    # ------------------------------------------------------------------------------------------------ writing

    def rewrite(self, records: list[dict]) -> None:
        """Replace the manifest by ``records`` in one atomic step."""
        if self._out is not None:
            self._out.close()
            self._out = None
        tmp = self._tmp / MANIFEST_NAME
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest)
        _fsync_dir(self.folder)

    def commit(self, record: dict, picture: bytes) -> None:
        """Put one result in place: the picture (atomically), then its manifest line (rules 1 and 2)."""
        final = self.folder / record["edited"]
        tmp = self._tmp / f"{final.name}.part"
        with open(tmp, "wb") as f:
            f.write(picture)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.folder)
        if self._out is None:
            self._out = open(self.manifest, "a", encoding="utf-8")
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()
        os.fsync(self._out.fileno())
