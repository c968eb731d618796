"""The store: registry seeding and the background request-log writer (batching, shutdown, outages)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from gateway.metrics import Metrics
from gateway.serving.interfaces import RequestRecord
from gateway.spec import ModelSpec
from gateway.store.engine import Store, database_url_from_config
from gateway.store.models import seed_models, spec_from_row
from gateway.store.requestlog import RequestLogWriter
from gateway.store.tables import ModelRow, RequestRow
from tests.storeutil import fresh_pg_database, store_fixture


def _record(i: int, **kw: Any) -> RequestRecord:
    return RequestRecord(request_id=f"req-{i}", started_at=datetime.now(UTC), requested_model="auto", stream=False,
                         routed_model="m", cost_usd=0.001, latency_ms=12.5, finished_at=datetime.now(UTC),
                         candidates=[{"model": "m", "objective": 0.1}], **kw)


def _by_request_id(store: Store, request_id: str) -> RequestRow | None:
    with store.sessions() as s:
        return s.scalar(sa.select(RequestRow).where(RequestRow.request_id == request_id))


def _count(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(RequestRow)).scalar_one())


store = store_fixture()
T = TypeVar("T")


def test_batches_by_size(store: Store) -> None:
    inserts: list[int] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _count_inserts(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO REQUESTS"):
            inserts.append(len(params) if executemany else 1)

    metrics = Metrics()
    writer = RequestLogWriter(store, batch_size=10, flush_interval_s=60, metrics=metrics).start()
    for i in range(25):
        writer.submit(_record(i))
    deadline = time.monotonic() + 5
    while _count(store) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _count(store) >= 20  # full batches went without waiting for the 60 s interval
    writer.close()
    assert _count(store) == 25 and writer.written == 25 and writer.pending == 0
    assert sum(inserts) == 25 and max(inserts) <= 10
    assert metrics.request_log_written._value.get() == 25
    assert metrics.request_log_buffer._value.get() == 0


def test_flushes_by_time_and_roundtrips_fields(store: Store) -> None:
    writer = RequestLogWriter(store, batch_size=100, flush_interval_s=0.05).start()
    rec = _record(1, key_name="alice", cluster=3, lam=0.25, prompt_tokens=11, completion_tokens=7,
                  attempts=[{"model": "x", "status": 502}, {"model": "m", "status": 200}], ttft_ms=3.0,
                  upstream_latency_ms=9.0, status_code=200, prompt_text="hello")
    writer.submit(rec)
    assert writer.flush(5)
    row = _by_request_id(store, "req-1")
    assert row is not None
    assert (row.key_name, row.cluster, row.lam, row.prompt_tokens, row.completion_tokens) == ("alice", 3, 0.25, 11, 7)
    assert row.attempts == rec.attempts and row.candidates == rec.candidates and row.prompt_text == "hello"
    assert row.started_at == rec.started_at
    writer.close()


def test_client_chosen_duplicate_request_ids_are_all_logged(store: Store) -> None:
    writer = RequestLogWriter(store, batch_size=5, flush_interval_s=0.05).start()
    for _ in range(3):
        writer.submit(_record(7))  # a client may reuse x-uniroute-request-id: three requests, three rows
    writer.close()
    assert _count(store) == 3


def test_retried_batch_is_written_once(store: Store) -> None:
    writer = RequestLogWriter(store)
    writer.submit(_record(1))
    batch = list(writer._buf)
    writer._write(batch)
    writer._write(batch)  # e.g. the commit succeeded but its acknowledgement was lost
    assert _count(store) == 1


def test_a_bad_row_is_rejected_alone(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    writer = RequestLogWriter(store, batch_size=10, flush_interval_s=0.05, metrics=metrics).start()
    for i in range(10):
        writer.submit(_record(i, key_id=999 if i == 4 else None))  # no api_keys row 999: FK violation
    writer.submit(_record(10, key_name="x" * 500, error_type="E" * 300))  # too long: cut to fit
    assert writer.flush(10)
    writer.close()
    assert _count(store) == 10 and writer.rejected == 1 and writer.written == 10
    assert metrics.request_log_rejected._value.get() == 1 and metrics.request_log_buffer._value.get() == 0
    assert "refused the row of request req-4" in caplog.text
    row = _by_request_id(store, "req-10")
    assert row is not None and row.key_name == "x" * 128 and row.error_type == "E" * 64


def test_full_buffer_counts_and_logs_drops(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    writer = RequestLogWriter(store, batch_size=2, max_buffer=4, metrics=metrics)  # not started: nothing drains
    for i in range(6):
        writer.submit(_record(i))
    assert writer.dropped == 2 and metrics.request_log_dropped._value.get() == 2
    assert "request log buffer full" in caplog.text and "dropped request req-4" in caplog.text
    writer.close()  # never started: close writes synchronously
    assert _count(store) == 4


def test_submit_never_blocks_while_database_is_locked(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'u.db'}", sqlite_busy_timeout_ms=200)
    store.upgrade()
    writer = RequestLogWriter(store, batch_size=1, flush_interval_s=0.01, max_backoff_s=0.05).start()
    lock = store.engine.raw_connection()
    assert lock.driver_connection is not None
    lock.driver_connection.execute("BEGIN EXCLUSIVE")
    t0 = time.perf_counter()
    for i in range(200):
        writer.submit(_record(i))
    assert time.perf_counter() - t0 < 0.5
    time.sleep(0.5)
    assert writer.failures >= 1 and writer.pending == 200
    lock.driver_connection.execute("ROLLBACK")
    lock.close()
    assert writer.flush(10)
    writer.close()
    assert _count(store) == 200
    store.dispose()


def test_close_spills_when_database_is_down_and_next_start_ingests(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    spill = tmp_path / "spill"
    down = Store("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_timeout_s=1)
    writer = RequestLogWriter(down, flush_interval_s=0.01, max_backoff_s=0.05, spill_dir=spill).start()
    for i in range(5):
        writer.submit(_record(i, prompt_tokens=i))
    writer.close(timeout_s=0.3)
    files = list(spill.glob("requests-*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 5
    down.dispose()
    up = Store(url)
    up.upgrade()
    again = RequestLogWriter(up, flush_interval_s=0.01, spill_dir=spill).start()
    assert again.flush(5)
    again.close()
    assert _count(up) == 5 and not list(spill.glob("*.jsonl"))
    row = _by_request_id(up, "req-3")
    assert row is not None and row.prompt_tokens == 3 and row.started_at.tzinfo is not None
    up.dispose()


def test_seed_models(store: Store) -> None:
    entries = [
        {"name": "a", "litellm_params": {"model": "openai/a", "api_key": "os.environ/OPENAI_API_KEY"},
         "input_cost_per_1m": 1.0, "output_cost_per_1m": 2.0, "router_cost": 1.0, "timeout_s": 30.0},
        {"name": "b", "litellm_params": {"model": "openai/b"}, "router_cost": 3.0},
    ]
    assert seed_models(store, [ModelSpec.model_validate(e) for e in entries]) == 2
    assert seed_models(store, [ModelSpec.model_validate(e) for e in entries]) == 0
    entries[1] = {**entries[1], "router_cost": 4.0}
    assert seed_models(store, [ModelSpec.model_validate(e) for e in entries]) == 1
    with store.sessions() as s:
        rows = {m.name: m for m in s.scalars(sa.select(ModelRow))}
    assert spec_from_row(rows["a"]).litellm_params["api_key"] == "os.environ/OPENAI_API_KEY"  # never the resolved secret
    assert spec_from_row(rows["b"]).router_cost == 4.0 and rows["b"].version == 2 and rows["a"].version == 1
    assert rows["a"].source == "config" and rows["a"].enabled


def test_database_url_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNIROUTE_DATABASE_URL", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("database_url: sqlite:///data/x.db\n")
    assert database_url_from_config(cfg) == f"sqlite:///{tmp_path / 'data' / 'x.db'}"
    cfg.write_text("database_url: postgresql+psycopg://u@h/db\n")
    assert database_url_from_config(cfg) == "postgresql+psycopg://u@h/db"
    monkeypatch.setenv("UNIROUTE_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    assert database_url_from_config(cfg) == f"sqlite:///{tmp_path / 'env.db'}"


# --------------------------------------------------------------------- PostgreSQL made unreachable
class TcpProxy:
    """A loopback TCP proxy (asyncio, in its own thread) that can be stopped and restarted.

    Stopping closes the listener and aborts every open connection, so the database looks
    unreachable to clients: new connections are refused, open ones fail.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ureader, uwriter = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, uwriter}
        await asyncio.gather(self._pipe(reader, uwriter), self._pipe(ureader, writer))
        self.writers -= {writer, uwriter}

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        self._call(self._stop())

    async def _cancel_all(self) -> None:
        tasks = [t for t in asyncio.all_tasks(self.loop) if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        with contextlib.suppress(Exception):
            self._call(self._cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.mark.postgres
def test_postgres_unreachable_for_seconds_rows_written_once_back() -> None:
    with fresh_pg_database() as url:
        direct = Store(url)
        direct.upgrade()
        u = sa.make_url(url)
        proxy = TcpProxy(u.host or "127.0.0.1", u.port or 5432)
        proxy.start()
        via_proxy = Store(u.set(host="127.0.0.1", port=proxy.port), connect_timeout_s=1)
        writer = RequestLogWriter(via_proxy, batch_size=50, flush_interval_s=0.05, max_backoff_s=0.5).start()
        try:
            for i in range(30):
                writer.submit(_record(i))
            assert writer.flush(10) and _count(direct) == 30
            proxy.stop()  # the database is now unreachable
            t0 = time.perf_counter()
            for i in range(30, 130):
                writer.submit(_record(i))  # requests keep being served: submit never blocks
            assert time.perf_counter() - t0 < 0.5
            time.sleep(3.0)
            assert writer.failures >= 2 and writer.pending == 100 and _count(direct) == 30
            proxy.start()  # back
            assert writer.flush(20), f"not written after the database came back: {writer.last_error}"
            assert _count(direct) == 130
            with direct.engine.connect() as conn:
                ids = [r[0] for r in conn.execute(sa.select(RequestRow.request_id))]
            assert len(ids) == len(set(ids)) == 130
        finally:
            writer.close(timeout_s=2)
            proxy.shutdown()
            via_proxy.dispose()
            direct.dispose()
