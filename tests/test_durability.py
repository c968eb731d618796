"""Budget settlement and the request log survive the store and the process (issue #10, row 6), at the store level.

On SQLite and PostgreSQL: a settlement is applied once whoever applies it (the request path, a retry, the
request-log writer, a replayed journal); the reservations of a dead process are released (at the next start
on its host, or by any replica after ``reservation_ttl_s``) and a late settlement still charges, once; a
request that goes away while its reservation is written leaves nothing held; and a writer killed with
``kill -9`` before it wrote anything loses no row and no charge. The end-to-end versions (a real
``uniroute serve``, a database cut right after the upstream answered, ``kill -9`` under traffic, 503s) are
tests/test_store_outage_e2e.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.access.auth import create_key, principal_from_row
from gateway.access.budget import SqlBudgetGuard, period_starts
from gateway.access.reservations import ReservationKeeper
from gateway.metrics import Metrics
from gateway.serving.interfaces import Principal, RequestRecord, Settlement
from gateway.store import reservations as reservations_sql
from gateway.store.budget import settle_many
from gateway.store.engine import Store
from gateway.store.requestlog import RequestLogWriter
from gateway.store.tables import ApiKey, RequestRow, ReservationHolder, ReservationRow, utcnow
from tests.storeutil import REPO_ROOT, store_fixture

store = store_fixture(pool_size=10, max_overflow=20)


def _key(store: Store, budget: float | None = 100.0, name: str = "k") -> Principal:
    _raw, row = create_key(store, name, default_lambda=0.1, budget_usd=budget)
    return principal_from_row(row)


def _budget(store: Store, key_id: int | None) -> tuple[float, float, float]:
    """(spend, reserved, lifetime spend) of a key."""
    with store.sessions() as s:
        row = s.get(ApiKey, key_id)
    assert row is not None
    return row.spend_usd, row.reserved_usd, row.total_spend_usd


def _settle_as_writer(store: Store, *settlements: Settlement) -> None:
    with store.engine.begin() as conn:
        settle_many(conn, list(settlements), period_starts(utcnow()))


def _row_count(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(RequestRow)).scalar_one())


async def test_a_settlement_is_applied_once_whoever_applies_it(store: Store) -> None:
    guard = SqlBudgetGuard(store, holder="h-1")
    p = _key(store)
    r = await guard.reserve(p, 1.0)
    assert r.id is not None and [h.id for h in reservations_sql.held(store)] == [r.id]
    assert p.key_id is not None
    owed = Settlement(key_id=p.key_id, reservation_id=r.id, reserved_usd=1.0, actual_usd=0.4)
    await guard.settle(r, 0.4)  # the request path
    await guard.settle(r, 0.4)  # a retry after an answer lost at COMMIT
    _settle_as_writer(store, owed)  # the request-log writer, with the row
    _settle_as_writer(store, owed, owed)  # a journal replayed after kill -9
    assert _budget(store, p.key_id) == pytest.approx((0.4, 0.0, 0.4))
    assert reservations_sql.held(store) == []


async def test_a_dead_holders_reservations_are_released_and_a_late_settlement_charges_once(store: Store) -> None:
    dead, alive = SqlBudgetGuard(store, holder="dead-1"), SqlBudgetGuard(store, holder="alive-1")
    p = _key(store, budget=10.0)
    assert p.key_id is not None
    r1, r2 = await dead.reserve(p, 1.0), await dead.reserve(p, 2.0)
    live = await alive.reserve(p, 0.5)
    assert _budget(store, p.key_id)[1] == pytest.approx(3.5)
    assert reservations_sql.release_holders(store, ["dead-1"]) == 2
    assert reservations_sql.release_holders(store, ["dead-1"]) == 0  # idempotent
    assert _budget(store, p.key_id)[1] == pytest.approx(0.5)  # only the live one is held
    # the dead process had answered r1 and journaled its record: the replay charges it, releasing nothing twice
    assert r1.id is not None
    _settle_as_writer(store, Settlement(key_id=p.key_id, reservation_id=r1.id, reserved_usd=1.0, actual_usd=0.3))
    _settle_as_writer(store, Settlement(key_id=p.key_id, reservation_id=r1.id, reserved_usd=1.0, actual_usd=0.3))
    assert _budget(store, p.key_id) == pytest.approx((0.3, 0.5, 0.3))
    await alive.settle(live, 0.2)
    assert _budget(store, p.key_id) == pytest.approx((0.5, 0.0, 0.5))
    assert reservations_sql.held(store) == [] and r2.id is not None


async def test_holders_silent_for_the_ttl_lose_their_reservations(store: Store) -> None:
    p = _key(store, budget=10.0)
    now = utcnow()
    reservations_sql.heartbeat(store, "stale-1", now - timedelta(seconds=200))
    reservations_sql.heartbeat(store, "fresh-1", now)
    guards = {h: SqlBudgetGuard(store, holder=h) for h in ("stale-1", "fresh-1", "unknown-old", "unknown-new", "me")}
    held = {h: await g.reserve(p, 1.0) for h, g in guards.items()}
    with store.session() as s:  # a reservation of a holder that never wrote a heartbeat counts from its own age
        s.execute(sa.update(ReservationRow).where(ReservationRow.holder.in_(["unknown-old", "me"]))
                  .values(created_at=now - timedelta(seconds=200)))
    assert reservations_sql.release_expired(store, 60.0, me="me", now=now) == 2
    left = {r.holder for r in reservations_sql.held(store)}
    assert left == {"fresh-1", "unknown-new", "me"} and _budget(store, p.key_id)[1] == pytest.approx(3.0)
    with store.sessions() as s:
        assert set(s.scalars(sa.select(ReservationHolder.holder))) == {"fresh-1"}
    assert len(held) == 5


def test_replicas_releasing_at_once_release_each_reservation_once(store: Store) -> None:
    p = _key(store, budget=1000.0)
    alive = SqlBudgetGuard(store, holder="alive-1")
    alive.reserve_sync(p, 5.0)  # a double release would eat into this one
    for i in range(20):
        SqlBudgetGuard(store, holder=f"dead-{i}").reserve_sync(p, 1.0)
    long_ago = utcnow() - timedelta(hours=1)
    with store.session() as s:
        s.execute(sa.update(ReservationRow).where(ReservationRow.holder != "alive-1").values(created_at=long_ago))
    reservations_sql.heartbeat(store, "alive-1")
    barrier = threading.Barrier(4)
    counts: list[int] = []

    def replica() -> None:
        barrier.wait()
        counts.append(reservations_sql.release_expired(store, 60.0))

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counts) == 20
    assert _budget(store, p.key_id)[1] == pytest.approx(5.0)


async def test_a_request_that_goes_away_while_reserving_leaves_nothing_held(store: Store) -> None:
    metrics = Metrics()
    guard = SqlBudgetGuard(store, holder="h-1", metrics=metrics)
    p = _key(store)
    rng = random.Random(3)
    cancelled = 0
    for _ in range(20):
        task = asyncio.create_task(guard.reserve(p, 0.5))
        await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.002, 0.01]))
        task.cancel()  # the client disconnected
        try:
            made = await task
        except asyncio.CancelledError:
            cancelled += 1
        else:  # it was done before the disconnect: the service settles it as usual
            await guard.settle(made, 0.0)
    assert cancelled >= 5
    deadline = time.monotonic() + 10
    while (reservations_sql.held(store) or guard._background) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert reservations_sql.held(store) == [] and _budget(store, p.key_id) == pytest.approx((0.0, 0.0, 0.0))


async def test_a_reservation_whose_commit_went_unseen_is_dropped_by_the_keeper(store: Store) -> None:
    guard = SqlBudgetGuard(store, holder="h-1")
    p = _key(store)
    made = guard.reserve_sync(p, 0.7, "a" * 32)  # committed, but say the caller saw the connection break
    guard.unsure.add("a" * 32)
    guard.unsure.add("b" * 32)  # never committed: nothing to drop
    keeper = ReservationKeeper(store, "h-1", ttl_s=3600, guard=guard)
    await keeper.tick()
    assert made.id == "a" * 32 and reservations_sql.held(store) == [] and not guard.unsure
    assert _budget(store, p.key_id)[1] == pytest.approx(0.0)


# ------------------------------------------------------------------------------ kill -9 of the log writer
_CHILD = r"""
import os, signal, sys
from datetime import UTC, datetime
from gateway.access.budget import SqlBudgetGuard, period_starts
from gateway.access.auth import principal_from_row
from gateway.serving.interfaces import RequestRecord, Settlement
from gateway.store.engine import Store
from gateway.store.keys import get_key
from gateway.store.requestlog import RequestLogWriter
from gateway.store.tables import utcnow

url, spill, holder = sys.argv[1:4]
store = Store(url)
p = principal_from_row(get_key(store, "k"))
guard = SqlBudgetGuard(store, holder=holder)
writer = RequestLogWriter(store, batch_size=10_000, flush_interval_s=3600, spill_dir=spill, holder=holder,
                          period_starts=lambda: period_starts(utcnow())).start()
for i in range(40):
    r = guard.reserve_sync(p, 0.01)
    rec = RequestRecord(request_id=f"answered-{i}", started_at=datetime.now(UTC), requested_model="m", stream=i % 2 == 0,
                        key_id=p.key_id, key_name="k", routed_model="m", cost_usd=0.004,
                        finished_at=datetime.now(UTC))
    rec.settlement = Settlement(key_id=p.key_id, reservation_id=r.id, reserved_usd=r.amount_usd, actual_usd=0.004)
    writer.submit(rec)  # journaled: from here the answer may be sent
    if i % 2:
        guard.settle_sync(r, 0.004)  # the request path settled half of them; the other half died before
for i in range(5):
    guard.reserve_sync(p, 0.01)  # in flight at the kill: never answered
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _kill_child(store: Store, spill: Path, holder: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", _CHILD, store.url.render_as_string(hide_password=False), str(spill),
                          holder], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL and "ready" in out.stdout, out.stderr[-3000:]


def test_kill_9_loses_no_answered_row_and_no_charge(store: Store, tmp_path: Path) -> None:
    p = _key(store, budget=100.0)
    spill = tmp_path / "spill"
    _kill_child(store, spill, "child-1")
    assert _row_count(store) == 0  # the dead writer wrote nothing
    spend, reserved, _ = _budget(store, p.key_id)
    assert spend == pytest.approx(20 * 0.004) and reserved == pytest.approx(25 * 0.01)
    kept = tmp_path / "kept"
    shutil.copytree(spill, kept)

    metrics = Metrics()
    writer = RequestLogWriter(store, flush_interval_s=0.05, spill_dir=spill, holder="next-1", metrics=metrics,
                              period_starts=lambda: period_starts(utcnow())).start()
    assert writer.adopted_holders == ["child-1"]
    assert reservations_sql.release_holders(store, writer.adopted_holders) > 0  # what the keeper does at start
    assert writer.flush(20)
    with store.sessions() as s:
        ids = sorted(s.scalars(sa.select(RequestRow.request_id)))
    assert ids == sorted(f"answered-{i}" for i in range(40))
    assert _budget(store, p.key_id) == pytest.approx((40 * 0.004, 0.0, 40 * 0.004))
    assert reservations_sql.held(store) == []
    assert metrics.request_journal_replayed._value.get() == 40
    assert not list(spill.glob("journal-child-1*"))  # taken over and done with
    writer.close()
    assert not list(spill.glob("journal-*"))

    # the same journal replayed again (say the next process died before deleting it): nothing changes
    for path in kept.glob("journal-child-1*"):
        shutil.copy(path, spill / path.name)
    again = RequestLogWriter(store, flush_interval_s=0.05, spill_dir=spill, holder="next-2",
                             period_starts=lambda: period_starts(utcnow())).start()
    assert again.adopted_holders == ["child-1"] and again.flush(20)
    again.close()
    assert _row_count(store) == 40 and _budget(store, p.key_id) == pytest.approx((0.16, 0.0, 0.16))


def test_a_live_processs_journal_is_not_taken_over(store: Store, tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    first = RequestLogWriter(store, flush_interval_s=3600, batch_size=1000, spill_dir=spill, holder="first-1").start()
    first.submit(_record(1))
    second = RequestLogWriter(store, flush_interval_s=0.05, spill_dir=spill, holder="second-1").start()
    assert second.adopted_holders == [] and second.flush(5)
    assert _row_count(store) == 0  # first's row is first's to write
    first.close()
    second.close()
    assert _row_count(store) == 1 and not list(spill.glob("journal-*"))


def _record(i: int, **kw: Any) -> RequestRecord:
    return RequestRecord(request_id=f"req-{i}", started_at=datetime.now(UTC), requested_model="auto", stream=False,
                         routed_model="m", cost_usd=0.001, latency_ms=12.5, finished_at=datetime.now(UTC),
                         candidates=[{"model": "m", "objective": 0.1}], **kw)


def test_the_journal_keeps_only_rows_not_yet_committed(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'u.db'}")
    store.upgrade()
    spill = tmp_path / "spill"
    writer = RequestLogWriter(store, batch_size=100, flush_interval_s=0.02, spill_dir=spill, holder="w-1")
    assert writer.journal is not None
    writer.journal.segment_bytes, writer.journal.truncate_bytes = 8 << 10, 0
    writer.start()
    for i in range(600):
        writer.submit(_record(i))
    assert writer.flush(20) and writer.journal.appended == 600
    segments = sorted(spill.glob("journal-w-1.*.jsonl"))
    assert len(segments) == 1 and segments[0].stat().st_size == 0  # rotated ones deleted, the active one truncated
    writer.close()
    assert _row_count(store) == 600 and not list(spill.iterdir())
    store.dispose()


def test_a_journal_append_costs_little(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One buffered append per request: measured against the same writer without a journal."""
    store = Store(f"sqlite:///{tmp_path / 'u.db'}")
    store.upgrade()
    costs = {}
    for journal in (False, True):
        writer = RequestLogWriter(store, batch_size=100_000, max_buffer=100_000, flush_interval_s=3600,
                                  spill_dir=tmp_path / f"spill-{journal}", journal=journal, holder=f"w-{int(journal)}")
        writer.start()
        records = [_record(i, key_name="k", prompt_tokens=20, completion_tokens=5, lam=0.1,
                           attempts=[{"model": "m", "status": 200, "latency_ms": 3.0}]) for i in range(3000)]
        t0 = time.perf_counter()
        for r in records:
            writer.submit(r)
        costs[journal] = (time.perf_counter() - t0) / len(records) * 1e6
        writer.close()
    extra = costs[True] - costs[False]
    with capsys.disabled():
        print(f"\nrequest log submit: {costs[False]:.1f} µs without the journal, {costs[True]:.1f} µs with it "
              f"(+{extra:.1f} µs per request)")
    assert extra < 1000  # generous under a loaded machine; measured ~10-30 µs
    store.dispose()


async def test_a_shutdown_with_the_store_down_leaves_its_reservations_to_the_next_start(store: Store,
                                                                                       tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    p = _key(store)
    guard = SqlBudgetGuard(store, holder="h-1")
    writer = RequestLogWriter(store, spill_dir=spill, holder="h-1").start()
    await guard.reserve(p, 0.25)  # settled later by nobody: the process stops with the store unreachable
    down = Store("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_timeout_s=1)
    assert await ReservationKeeper(down, "h-1", ttl_s=3600).aclose() is False
    down.dispose()
    writer.close()
    writer.leave_holder_marker()
    assert _budget(store, p.key_id)[1] == pytest.approx(0.25)

    nxt = RequestLogWriter(store, spill_dir=spill, holder="h-2", flush_interval_s=0.05).start()
    assert nxt.adopted_holders == ["h-1"]
    keeper = ReservationKeeper(store, "h-2", ttl_s=3600)
    await keeper.start(nxt.adopted_holders)
    assert _budget(store, p.key_id)[1] == 0.0 and reservations_sql.held(store) == []
    await keeper.aclose()
    assert nxt.flush(5)
    nxt.close()
    assert not list(spill.glob("journal-*"))
