"""The request log's local write-ahead journal: nothing answered is lost to ``kill -9``.

Every finished request is appended to the journal (one ``os.write`` of one JSON line, so it is in
the operating system's page cache) before its response ends, and only then queued for the
database. A process killed with ``kill -9`` leaves its journal behind; the next gateway process
started with the same ``database.spill_dir`` takes it over (:meth:`Journal.adopt_orphans`) and
writes its rows (idempotent inserts: a row already written is skipped by its id) and their budget
settlements (at most once: ``gateway/store/budget.py``).

Files, in ``database.spill_dir``, per process (its *holder* id, ``gateway/store/reservations.py``):

- ``journal-<holder>.lock``: held with ``flock`` for the life of the process. The kernel drops the
  lock when the process dies (however it dies), so a lock that can be taken is a dead process's.
  The file is created locked (under a temporary name, then renamed), so it is never seen unlocked.
- ``journal-<holder>.<seq>.jsonl``: segments. The active one grows by one line per request; past
  ``segment_bytes`` a new one starts. A segment whose every row is committed is deleted (the active
  one is truncated instead, once it is larger than ``truncate_bytes``), so the journal holds about
  the rows not yet in the database.

Durability: a line is written with one ``write(2)`` on an ``O_APPEND`` descriptor, which survives
the death of the process. With ``fsync=True`` every append is also ``fsync``-ed (it then survives
a crash of the machine too, at the cost of one disk flush per request on the event loop).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("uniroute.store")

LOCK_SUFFIX = ".lock"
PREFIX = "journal-"


@dataclass
class Orphan:
    """A dead process's journal, taken over (its lock is held until :meth:`release`)."""

    holder: str
    lines: list[bytes]
    files: list[Path]
    lock_path: Path
    _fd: int = field(repr=False, default=-1)

    def release(self, *, delete: bool) -> None:
        """Delete its files (when every row was committed) and drop the lock; else keep them for the next start."""
        if delete:
            for path in self.files:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _segments(directory: Path, holder: str) -> list[Path]:
    def seq(p: Path) -> int:
        try:
            return int(p.name[len(PREFIX) + len(holder) + 1:-len(".jsonl")])
        except ValueError:
            return -1

    return sorted((p for p in directory.glob(f"{PREFIX}{holder}.*.jsonl") if seq(p) >= 0), key=seq)


class Journal:
    """Append-only journal of one process (see the module docstring). Thread-safe."""

    def __init__(self, directory: str | os.PathLike[str], holder: str, *, fsync: bool = False,
                 segment_bytes: int = 4 << 20, truncate_bytes: int = 256 << 10,
                 on_error: Callable[[], None] | None = None) -> None:
        if not holder or any(c in holder for c in "./\\*?[]"):
            raise ValueError(f"journal holder id {holder!r}: letters, digits, '_' and '-' only")
        self.directory = Path(directory)
        self.holder = holder
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.truncate_bytes = truncate_bytes
        self.on_error = on_error
        self._lock = threading.Lock()
        self._lock_fd = -1
        self._fd = -1
        self._seq = 0
        self._size = 0
        self._open: dict[int, int] = {}  # segment -> rows appended and not yet committed
        self._last_error_log = 0.0
        self.appended = 0
        self.errors = 0

    @property
    def is_open(self) -> bool:
        return self._lock_fd >= 0

    @property
    def lock_path(self) -> Path:
        return self.directory / f"{PREFIX}{self.holder}{LOCK_SUFFIX}"

    def _segment_path(self, seq: int) -> Path:
        return self.directory / f"{PREFIX}{self.holder}.{seq:06d}.jsonl"

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> Journal:
        """Create the folder and this process's lock (held until :meth:`close` or death) and first segment."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{PREFIX}{self.holder}{LOCK_SUFFIX}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(tmp, self.lock_path)  # appears already locked
        self._lock_fd = fd
        self._start_segment(1)
        return self

    def _start_segment(self, seq: int) -> None:
        self._seq = seq
        self._fd = os.open(self._segment_path(seq), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._open.setdefault(seq, 0)

    def close(self, *, delete: bool) -> None:
        """Close the journal; delete its files when every row is in the database (``delete``), else leave
        them for the next start to take over."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if delete:
                for path in _segments(self.directory, self.holder):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                with contextlib.suppress(FileNotFoundError):
                    self.lock_path.unlink()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    # -- the request path ----------------------------------------------------------------------
    def append(self, line: bytes) -> int | None:
        """Append one line (``line`` ends with a newline); the segment it went to, or None when it could not
        be written (logged and counted; the row still goes to the database from memory)."""
        with self._lock:
            if self._fd < 0:
                return None
            try:
                written = os.write(self._fd, line)
                if written != len(line):  # a short write (disk full): finish the line or fail loudly
                    rest = memoryview(line)[written:]
                    while rest:
                        n = os.write(self._fd, rest)
                        rest = rest[n:]
                if self.fsync:
                    os.fsync(self._fd)
            except OSError as exc:
                self._error(exc)
                return None
            seq = self._seq
            self._open[seq] = self._open.get(seq, 0) + 1
            self._size += len(line)
            self.appended += 1
            if self._size >= self.segment_bytes:
                os.close(self._fd)
                self._fd = -1
                try:
                    self._start_segment(seq + 1)
                except OSError as exc:  # the journal stops; rows still go to the database from memory
                    self._error(exc)
            return seq

    def committed(self, seq: int | None, n: int = 1) -> None:
        """``n`` rows appended to segment ``seq`` are in the database: drop segments with nothing left."""
        if seq is None:
            return
        with self._lock:
            left = self._open.get(seq, 0) - n
            if left > 0:
                self._open[seq] = left
                return
            self._open[seq] = 0
            try:
                if seq != self._seq:
                    del self._open[seq]
                    with contextlib.suppress(FileNotFoundError):
                        self._segment_path(seq).unlink()
                elif self._size >= self.truncate_bytes and self._fd >= 0:
                    os.ftruncate(self._fd, 0)
                    self._size = 0
            except OSError as exc:
                self._error(exc)

    def _error(self, exc: OSError) -> None:
        self.errors += 1
        if self.on_error is not None:
            with contextlib.suppress(Exception):
                self.on_error()
        now = time.monotonic()
        if now - self._last_error_log > 10.0:
            self._last_error_log = now
            logger.error("request journal %s: %s (%d errors so far); rows are kept in memory only",
                         self._segment_path(self._seq), exc, self.errors)

    # -- taking over dead processes' journals ----------------------------------------------------
    def adopt_orphans(self) -> Iterator[Orphan]:
        """The journals in the folder whose process is dead (their lock could be taken), oldest segment first.

        Each is yielded with its lock held; call :meth:`Orphan.release` once its rows are written."""
        if not self.directory.is_dir():
            return
        for lock_path in sorted(self.directory.glob(f"{PREFIX}*{LOCK_SUFFIX}")):
            holder = lock_path.name[len(PREFIX):-len(LOCK_SUFFIX)]
            if holder == self.holder:
                continue
            try:
                fd = os.open(lock_path, os.O_RDWR)
            except FileNotFoundError:
                continue  # another process took it over and finished meanwhile
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # alive (or being taken over by another process)
            if not lock_path.exists():  # taken over and deleted between our glob and our lock
                os.close(fd)
                continue
            files = _segments(self.directory, holder)
            lines: list[bytes] = []
            for path in files:
                with open(path, "rb") as fh:
                    lines.extend(line for line in fh.read().split(b"\n") if line.strip())
            yield Orphan(holder=holder, lines=lines, files=files, lock_path=lock_path, _fd=fd)


def dumps_line(obj: Any) -> bytes:
    """One journal line: ``obj`` as JSON (dataclasses and datetimes included) and a newline."""
    import orjson

    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
