"""The request log: the background writer of the ``requests`` table.

The request log is written off the request path by :class:`RequestLogWriter`: the chat
service calls ``submit(record)``, which only appends to an in-memory buffer; a worker
thread inserts batches. While the database is unreachable rows stay in the (bounded)
buffer and the thread retries with exponential backoff; ``close()`` flushes everything
on graceful shutdown. Nothing is dropped silently: a row that does not fit the buffer is
counted (``uniroute_request_log_dropped_total``) and logged, and rows still unwritten when
``close()`` gives up are spilled to a JSONL file that the next start re-ingests.

Two promises hold beyond a graceful shutdown:

- *kill -9*: with a ``spill_dir``, ``submit`` first appends the record to a local journal
  (:mod:`gateway.store.journal`, one ``write(2)`` per request, before the response ends); the next
  start in the same ``spill_dir`` takes a dead process's journal over and writes its rows. A row's id
  is chosen once, at ``submit``, and travels with it (journal, spill file), so a row written before
  the death is skipped (``ON CONFLICT (id) DO NOTHING``).
- *settlement survives the store*: a record's :class:`~gateway.serving.interfaces.Settlement` (the
  charge of its key) is applied in the same transaction as its row. It is a no-op when the request
  path settled it already (its ``reservations`` row is gone), so it only matters when the store failed
  or was slow after the provider answered: the charge is then written when the store is back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import sqlalchemy as sa

from gateway.serving.interfaces import RequestRecord, Settlement
from gateway.store import budget as budget_sql
from gateway.store.budget import PeriodStarts
from gateway.store.engine import Store
from gateway.store.journal import Journal, Orphan, dumps_line
from gateway.store.tables import RequestRow

if TYPE_CHECKING:
    from gateway.metrics import Metrics

logger = logging.getLogger("uniroute.store")


def record_to_row(record: RequestRecord, row_id: str) -> dict[str, Any]:
    """A :class:`RequestRecord` as a ``requests`` row (attribute keys of :class:`gateway.store.tables.RequestRow`).

    Strings longer than their column are cut to fit and NUL characters (which PostgreSQL text cannot hold)
    become U+FFFD, so one odd value cannot fail a batch.
    """
    row = {
        "id": row_id,
        "request_id": record.request_id,
        "client_request_id": record.client_request_id,
        "key_id": record.key_id,
        "key_name": record.key_name,
        "requested_model": record.requested_model,
        "routed_model": record.routed_model,
        "cluster": record.cluster,
        "lam": record.lam,
        "candidates": record.candidates or None,
        "attempts": record.attempts or None,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_usd": record.cost_usd,
        "latency_ms": record.latency_ms,
        "upstream_latency_ms": record.upstream_latency_ms,
        "ttft_ms": record.ttft_ms,
        "status_code": record.status_code,
        "error_type": record.error_type,
        "stream": record.stream,
        "endpoint": record.endpoint,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "prompt_text": record.prompt_text,
        "usage_corrected": record.usage_corrected,
    }
    for key, limit in _STRING_LIMITS.items():
        v = row.get(key)
        if isinstance(v, str) and len(v) > limit:
            row[key] = v[:limit]
    for key, v in row.items():
        if isinstance(v, str) and "\x00" in v:
            row[key] = v.replace("\x00", "\ufffd")
    return row


_STRING_LIMITS: dict[str, int] = {
    a.key: int(getattr(a.columns[0].type, "length", 0) or 0)
    for a in sa.inspect(RequestRow).column_attrs
    if isinstance(a.columns[0].type, sa.String) and getattr(a.columns[0].type, "length", None)
}
_COLUMN_NAMES: dict[str, str] = {a.key: a.columns[0].name for a in sa.inspect(RequestRow).column_attrs}


def _is_permanent(exc: BaseException) -> bool:
    """True when retrying cannot help: the rows themselves are bad (not the connection)."""
    if isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError):
        return True
    if isinstance(exc, sa.exc.DBAPIError):
        return False  # operational: connection refused, server gone, database locked, ...
    return isinstance(exc, sa.exc.StatementError | TypeError | ValueError)


class _Item(NamedTuple):
    """A buffered row: its id (chosen once, at submit), the record, and its journal segment (None: not journaled)."""

    rid: str
    record: RequestRecord
    seq: int | None = None


def _record_to_line(rid: str, record: RequestRecord) -> bytes:
    """A journal or spill-file line: ``{"row_id", "record"}`` as JSON, newline-terminated."""
    return dumps_line({"row_id": rid, "record": record})


def _record_from_dict(d: dict[str, Any]) -> RequestRecord:
    for k in ("started_at", "finished_at"):
        if d.get(k):
            d[k] = datetime.fromisoformat(d[k])
    if d.get("settlement") is not None:
        d["settlement"] = Settlement(**d["settlement"])
    return RequestRecord(**d)


def _record_from_line(line: str | bytes, fallback_id: str) -> tuple[str, RequestRecord]:
    """(row id, record) of a line; a spill file of an older version has the record alone (``fallback_id``)."""
    d = json.loads(line)
    if isinstance(d, dict) and "record" in d and "row_id" in d:
        return str(d["row_id"]), _record_from_dict(d["record"])
    return fallback_id, _record_from_dict(d)


class RequestLogWriter:
    """Batched, non-blocking :class:`~gateway.serving.interfaces.RequestSink` backed by the store.

    ``submit`` appends to a bounded in-memory buffer and returns at once. A daemon thread
    inserts batches of up to ``batch_size`` rows every ``flush_interval_s`` (sooner when a
    full batch is waiting). Inserts are idempotent (``ON CONFLICT (id) DO NOTHING``), so a
    batch retried after an ambiguous failure is written once.

    A row the database refuses as bad data (not a connection problem) is isolated by
    retrying the batch row by row, then dropped with an error log and counted in
    ``uniroute_request_log_rejected_total``, so one bad row cannot block the log.

    Back-pressure policy: the buffer holds ``max_buffer`` rows (100k ≈ a few hundred MB at
    worst); when full, the NEW row is dropped, counted in ``dropped`` and the metric
    ``uniroute_request_log_dropped_total``, and logged (at most once per 10 s). Requests are
    never slowed or failed because the log is behind.

    With ``spill_dir`` and ``journal`` (the default), :meth:`start` opens this process's journal
    (named by ``holder``) and takes over the journals of dead processes found there; their holder ids
    are then in ``adopted_holders`` (the caller releases their budget reservations). ``period_starts``
    gives the period starts the settlements roll keys over to (``gateway.access.budget.period_starts``).
    """

    def __init__(
        self,
        store: Store,
        *,
        batch_size: int = 500,
        flush_interval_s: float = 0.5,
        max_buffer: int = 100_000,
        max_backoff_s: float = 10.0,
        close_timeout_s: float = 15.0,
        spill_dir: str | os.PathLike[str] | None = None,
        metrics: Metrics | None = None,
        journal: bool = True,
        journal_fsync: bool = False,
        holder: str | None = None,
        period_starts: Callable[[], PeriodStarts] | None = None,
    ) -> None:
        if batch_size < 1 or max_buffer < batch_size:
            raise ValueError(f"need 1 <= batch_size <= max_buffer, got batch_size={batch_size}, max_buffer={max_buffer}")
        self.store = store
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self.max_backoff_s = max_backoff_s
        self.close_timeout_s = close_timeout_s
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.metrics = metrics
        self.period_starts = period_starts
        self.holder = holder or f"writer-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.journal: Journal | None = None
        if journal and self.spill_dir is not None:
            self.journal = Journal(self.spill_dir, self.holder, fsync=journal_fsync, on_error=self._journal_error)
        self.adopted_holders: list[str] = []
        self._orphans: list[Orphan] = []
        self._buf: deque[_Item] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0  # rows taken from the buffer and not yet written
        self._thread: threading.Thread | None = None
        self._loaded_spills: list[Path] = []
        self._last_drop_log = 0.0
        self._deadline = float("inf")
        self.written = 0
        self.dropped = 0
        self.failures = 0
        self.rejected = 0
        self._last_exc: Exception | None = None
        self.last_error: str | None = None

    # -- RequestSink ---------------------------------------------------------------------------
    def submit(self, record: RequestRecord) -> None:
        """Journal the record (when journaling), then queue it. Never blocks on the database, never raises.

        A record's settlement is usually applied by the request path right after this (the writer then finds
        nothing to do); when that fails, the writer applies it with the row."""
        rid = uuid.uuid4().hex
        with self._lock:
            if len(self._buf) >= self.max_buffer:
                self.dropped += 1
                dropped = self.dropped
            else:
                seq = None
                if self.journal is not None:
                    try:
                        seq = self.journal.append(_record_to_line(rid, record))
                    except Exception:  # an unserialisable value: the row still goes to the database
                        logger.exception("request journal: could not write request %s", record.request_id)
                self._buf.append(_Item(rid, record, seq))
                dropped = 0
                if len(self._buf) >= self.batch_size:
                    self._wake.set()
        if dropped:
            if self.metrics is not None:
                self.metrics.request_log_dropped.inc()
            now = time.monotonic()
            if now - self._last_drop_log > 10.0:
                self._last_drop_log = now
                logger.error("request log buffer full (%d rows; database unreachable?): dropped request %s "
                             "(%d dropped so far)", self.max_buffer, record.request_id, dropped)
        elif self.metrics is not None:
            self.metrics.request_log_buffer.inc()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._buf) + self._in_flight

    def start(self) -> RequestLogWriter:
        if self._thread is not None:
            return self
        self._load_spills()
        if self.journal is not None and not self.journal.is_open:
            try:
                self.journal.open()
            except OSError as exc:
                logger.error("request journal: cannot open it in %s (%s); serving without it: rows finished "
                             "shortly before a crash may be lost", self.spill_dir, exc)
                self.journal = None
            else:
                self._adopt_journals()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="uniroute-request-log", daemon=True)
        self._thread.start()
        return self

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every submitted row is written, and the journals taken over are deleted (or ``timeout_s``
        passes). For tests and shutdown."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        with self._idle:
            while self._buf or self._in_flight or self._orphans:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.1))
                self._wake.set()
        return True

    def close(self, timeout_s: float | None = None) -> None:
        """Stop after writing everything; rows still unwritten after ``timeout_s`` are spilled to disk."""
        timeout = self.close_timeout_s if timeout_s is None else timeout_s
        thread = self._thread
        if thread is None:
            if self._buf:  # never started: write synchronously
                self._drain()
            self._finish_files(self._spill_leftovers())
            return
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        thread.join(timeout + 5.0)
        self._thread = None
        self._finish_files(self._spill_leftovers())

    def _finish_files(self, safe: bool) -> None:
        """After the last write: delete the journals (ours, adopted ones) when every row is in the database or
        in a spill file (``safe``); else leave them for the next start."""
        for orphan in self._orphans:
            orphan.release(delete=safe)
        self._orphans.clear()
        if self.journal is not None:
            self.journal.close(delete=safe)

    # -- worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.0
        while True:
            if backoff:
                if self._stop.is_set():
                    time.sleep(min(backoff, max(0.0, self._deadline - time.monotonic())))
                else:
                    self._stop.wait(backoff)
            else:
                self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            ok = self._drain()
            backoff = 0.0 if ok else min(max(backoff * 2, 0.25), self.max_backoff_s)
            if self._stop.is_set():
                with self._lock:
                    empty = not self._buf
                if empty or time.monotonic() >= self._deadline:
                    return

    def _drain(self) -> bool:
        """Write the whole buffer in batches; False (rows kept) on a database error."""
        while True:
            with self._lock:
                n = min(self.batch_size, len(self._buf))
                batch = [self._buf.popleft() for _ in range(n)]
                self._in_flight = n
            if not batch:
                with self._idle:
                    self._idle.notify_all()
                if self._loaded_spills:
                    self._delete_loaded_spills()
                if self._orphans:
                    self._release_orphans()
                    with self._idle:
                        self._idle.notify_all()
                return True
            try:
                self._write(batch)
            except Exception as exc:
                if _is_permanent(exc):
                    batch = self._write_one_by_one(batch)
                    if not batch:
                        continue
                    exc = self._last_exc or exc
                with self._lock:
                    self._buf.extendleft(reversed(batch))
                    self._in_flight = 0
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                if self.metrics is not None:
                    self.metrics.request_log_errors.inc()
                logger.warning("request log: writing %d rows failed (%s); keeping %d rows and retrying",
                               len(batch), type(exc).__name__, len(self._buf))
                return False
            self._written(batch)

    def _written(self, items: Sequence[_Item]) -> None:
        n = len(items)
        with self._lock:
            self._in_flight = max(0, self._in_flight - n)
        self._committed(items)
        self.written += n
        if self.metrics is not None:
            self.metrics.request_log_written.inc(n)
            self.metrics.request_log_buffer.dec(n)

    def _committed(self, items: Sequence[_Item]) -> None:
        if self.journal is None:
            return
        for seq, n in Counter(item.seq for item in items if item.seq is not None).items():
            self.journal.committed(seq, n)

    def _write_one_by_one(self, batch: list[_Item]) -> list[_Item]:
        """Isolate rows the database refuses (bad data): reject those, write the rest.

        Returns the rows still to retry (from the first transient failure on), or [] when done.
        """
        self._last_exc = None
        for i, item in enumerate(batch):
            try:
                self._write([item])
            except Exception as exc:
                if not _is_permanent(exc):
                    self._last_exc = exc
                    return batch[i:]
                self.rejected += 1
                with self._lock:
                    self._in_flight = max(0, self._in_flight - 1)
                self._committed([item])  # a row the database refuses is not kept for a replay either
                if self.metrics is not None:
                    self.metrics.request_log_rejected.inc()
                    self.metrics.request_log_buffer.dec()
                logger.error("request log: the database refused the row of request %s (%s: %s); row dropped",
                             item[1].request_id, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                continue
            self._written([item])
        return []

    def _write(self, batch: Sequence[_Item]) -> None:
        """Insert the rows (a row already there is skipped by id) and apply their settlements, in one transaction."""
        rows = [{_COLUMN_NAMES[k]: v for k, v in record_to_row(item[1], item[0]).items()} for item in batch]
        settlements = [item[1].settlement for item in batch if item[1].settlement is not None]
        table = cast(sa.Table, RequestRow.__table__)
        if self.store.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt: Any = pg_insert(table).on_conflict_do_nothing(index_elements=["id"])
        elif self.store.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(table).on_conflict_do_nothing(index_elements=["id"])
        else:  # pragma: no cover - only SQLite and PostgreSQL are supported
            stmt = sa.insert(table)
        with self.store.engine.begin() as conn:
            conn.execute(stmt, rows)
            budgets = self._settle(conn, settlements) if settlements else []
        if self.metrics is not None:
            for b in budgets:
                if b.budget_usd is not None:
                    self.metrics.set_key_budget(b.name, b.budget_usd, b.budget_usd - b.spend_usd)

    def _settle(self, conn: sa.Connection, settlements: list[Settlement]) -> list[budget_sql.KeyBudget]:
        if self.period_starts is None:
            logger.error("request log: %d settlements skipped (the writer has no period_starts)", len(settlements))
            return []
        budgets = budget_sql.settle_many(conn, settlements, self.period_starts())
        if budgets:
            logger.warning("request log: %d budget settlements the request path could not write are written now",
                           len(budgets))
        return budgets

    # -- spill files (graceful shutdown with the database down) -------------------------------------
    def _spill_leftovers(self) -> bool:
        """Write the rows still unwritten to a spill file; True when nothing is left only in memory or journals."""
        with self._lock:
            left = list(self._buf)
            self._buf.clear()
        if not left:
            return True
        if self.spill_dir is None:
            logger.error("request log: database unreachable at shutdown and no spill_dir: %d rows LOST", len(left))
            return True
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"requests-{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.getpid()}.jsonl"
            with open(path, "ab") as fh:
                for item in left:
                    fh.write(_record_to_line(item.rid, item.record))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            logger.error("request log: database unreachable at shutdown and the spill file failed (%s); %d rows "
                         "stay in the journal for the next start", exc, len(left))
            return False
        logger.error("request log: database unreachable at shutdown; %d rows spilled to %s "
                     "(written at next start)", len(left), path)
        return True

    def _load_spills(self) -> None:
        if self.spill_dir is None or not self.spill_dir.is_dir():
            return
        for path in sorted(self.spill_dir.glob("requests-*.jsonl")):
            n = 0
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        self._buf.append(_Item(*_record_from_line(
                            line, uuid.uuid5(uuid.NAMESPACE_URL, f"{path.name}:{n}").hex)))
                        n += 1
            self._loaded_spills.append(path)
            logger.info("request log: re-ingesting %d spilled rows from %s", n, path)

    def _delete_loaded_spills(self) -> None:
        for path in self._loaded_spills:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._loaded_spills.clear()

    # -- journals of dead processes (kill -9) ----------------------------------------------------------
    def _adopt_journals(self) -> None:
        assert self.journal is not None
        for orphan in self.journal.adopt_orphans():
            n = bad = 0
            for i, line in enumerate(orphan.lines):
                try:
                    rid, record = _record_from_line(line, uuid.uuid5(uuid.NAMESPACE_URL,
                                                                      f"{orphan.holder}:{i}").hex)
                except Exception:  # a line torn by the crash
                    bad += 1
                    continue
                self._buf.append(_Item(rid, record))
                n += 1
            self._orphans.append(orphan)
            self.adopted_holders.append(orphan.holder)
            if self.metrics is not None:
                self.metrics.request_journal_replayed.inc(n)
                self.metrics.request_log_buffer.inc(n)
            logger.warning("request log: process %s ended without closing its journal; replaying its %d rows "
                           "(rows already written are skipped)%s", orphan.holder, n,
                           f", {bad} unreadable lines skipped" if bad else "")

    def _release_orphans(self) -> None:
        for orphan in self._orphans:
            orphan.release(delete=True)
        self._orphans.clear()

    def leave_holder_marker(self) -> None:
        """After :meth:`close`: leave this process's (unlocked, empty) journal lock file behind, so the next
        start in ``spill_dir`` takes this holder for dead and releases its budget reservations."""
        if self.journal is not None:
            with contextlib.suppress(OSError):
                self.journal.lock_path.touch()

    def _journal_error(self) -> None:
        if self.metrics is not None:
            self.metrics.request_journal_errors.inc()
