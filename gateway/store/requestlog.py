"""The request log: the background writer of the ``requests`` table.

The request log is written off the request path by :class:`RequestLogWriter`: the chat
service calls ``submit(record)``, which only appends to an in-memory buffer; a worker
thread inserts batches. While the database is unreachable rows stay in the (bounded)
buffer and the thread retries with exponential backoff; ``close()`` flushes everything
on graceful shutdown. Nothing is dropped silently: a row that does not fit the buffer is
counted (``uniroute_request_log_dropped_total``) and logged, and rows still unwritten when
``close()`` gives up are spilled to a JSONL file that the next start re-ingests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import sqlalchemy as sa

from gateway.serving.interfaces import RequestRecord
from gateway.store.engine import Store
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
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "prompt_text": record.prompt_text,
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


def _record_to_json(record: RequestRecord) -> str:
    d = dataclasses.asdict(record)
    for k in ("started_at", "finished_at"):
        if d[k] is not None:
            d[k] = d[k].isoformat()
    return json.dumps(d, default=str)


def _record_from_json(line: str) -> RequestRecord:
    d = json.loads(line)
    for k in ("started_at", "finished_at"):
        if d.get(k):
            d[k] = datetime.fromisoformat(d[k])
    return RequestRecord(**d)


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
        self._buf: deque[tuple[str, RequestRecord]] = deque()  # (row id, record)
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
        with self._lock:
            if len(self._buf) >= self.max_buffer:
                self.dropped += 1
                dropped = self.dropped
            else:
                self._buf.append((uuid.uuid4().hex, record))
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
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="uniroute-request-log", daemon=True)
        self._thread.start()
        return self

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every submitted row is written (or ``timeout_s`` passes). For tests and shutdown."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        with self._idle:
            while self._buf or self._in_flight:
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
            self._spill_leftovers()
            return
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        thread.join(timeout + 5.0)
        self._thread = None
        self._spill_leftovers()

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
            self._written(len(batch))

    def _written(self, n: int) -> None:
        with self._lock:
            self._in_flight = max(0, self._in_flight - n)
        self.written += n
        if self.metrics is not None:
            self.metrics.request_log_written.inc(n)
            self.metrics.request_log_buffer.dec(n)

    def _write_one_by_one(self, batch: list[tuple[str, RequestRecord]]) -> list[tuple[str, RequestRecord]]:
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
                if self.metrics is not None:
                    self.metrics.request_log_rejected.inc()
                    self.metrics.request_log_buffer.dec()
                logger.error("request log: the database refused the row of request %s (%s: %s); row dropped",
                             item[1].request_id, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
                continue
            self._written(1)
        return []

    def _write(self, batch: Sequence[tuple[str, RequestRecord]]) -> None:
        rows = [{_COLUMN_NAMES[k]: v for k, v in record_to_row(r, rid).items()} for rid, r in batch]
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

    # -- spill files (graceful shutdown with the database down) -------------------------------------
    def _spill_leftovers(self) -> None:
        with self._lock:
            left = [r for _rid, r in self._buf]
            self._buf.clear()
        if not left:
            return
        if self.spill_dir is None:
            logger.error("request log: database unreachable at shutdown and no spill_dir: %d rows LOST", len(left))
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"requests-{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.getpid()}.jsonl"
        with open(path, "a", encoding="utf-8") as fh:
            for r in left:
                fh.write(_record_to_json(r) + "\n")
        logger.error("request log: database unreachable at shutdown; %d rows spilled to %s "
                     "(written at next start)", len(left), path)

    def _load_spills(self) -> None:
        if self.spill_dir is None or not self.spill_dir.is_dir():
            return
        for path in sorted(self.spill_dir.glob("requests-*.jsonl")):
            n = 0
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        self._buf.append((uuid.uuid5(uuid.NAMESPACE_URL, f"{path.name}:{n}").hex,
                                          _record_from_json(line)))
                        n += 1
            self._loaded_spills.append(path)
            logger.info("request log: re-ingesting %d spilled rows from %s", n, path)

    def _delete_loaded_spills(self) -> None:
        for path in self._loaded_spills:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._loaded_spills.clear()
