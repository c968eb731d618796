"""Budgets: atomic reservation, settlement, period roll-over, and no overspend under concurrency."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from gateway.access.auth import create_key, principal_from_row
from gateway.access.budget import SqlBudgetGuard, period_end_for, period_start_for
from gateway.errors import AuthenticationError, BudgetExceededError, error_body
from gateway.metrics import Metrics
from gateway.serving.interfaces import ANONYMOUS, Principal
from gateway.store.engine import Store
from gateway.store.keys import revoke_key
from gateway.store.tables import ApiKey
from tests.storeutil import store_fixture

store = store_fixture(pool_size=20, max_overflow=40)


def _key(store: Store, budget: float | None, period: str = "month", name: str = "k") -> Principal:
    _raw, row = create_key(store, name, default_lambda=0.1, budget_usd=budget, period=period)
    return principal_from_row(row)


def _row(store: Store, key_id: int | None) -> ApiKey:
    with store.sessions() as s:
        row = s.get(ApiKey, key_id)
    assert row is not None
    return row


def test_periods() -> None:
    t = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert period_start_for("day", t) == datetime(2026, 12, 31, tzinfo=UTC)
    assert period_start_for("month", t) == datetime(2026, 12, 1, tzinfo=UTC)
    assert period_end_for("month", datetime(2026, 12, 1, tzinfo=UTC)) == datetime(2027, 1, 1, tzinfo=UTC)
    assert period_end_for("day", datetime(2026, 12, 31, tzinfo=UTC)) == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="valid: day, month"):
        period_start_for("week", t)


async def test_reserve_settle_and_refusal(store: Store) -> None:
    metrics = Metrics()
    guard = SqlBudgetGuard(store, metrics=metrics)
    p = _key(store, budget=1.0)
    r1 = await guard.reserve(p, 0.6)
    assert _row(store, p.key_id).reserved_usd == pytest.approx(0.6)
    with pytest.raises(BudgetExceededError) as exc:
        await guard.reserve(p, 0.5)  # 0.6 held + 0.5 > 1.0
    status, body, _ = error_body(exc.value)
    assert status == 429 and body["error"]["type"] == "budget_exceeded" and body["error"]["code"] == "budget_exceeded"
    msg = body["error"]["message"]
    assert "'k'" in msg and "$1.0000" in msg and "monthly" in msg and "$0.6000 held" in msg and "resets at" in msg
    await guard.settle(r1, 0.25)
    row = _row(store, p.key_id)
    assert row.reserved_usd == pytest.approx(0.0) and row.spend_usd == pytest.approx(0.25)
    assert row.total_spend_usd == pytest.approx(0.25)
    r2 = await guard.reserve(p, 0.75)  # exactly fits: 0.25 + 0.75 <= 1.0
    await guard.settle(r2, 0.75)
    with pytest.raises(BudgetExceededError):
        await guard.reserve(p, 0.01)
    assert metrics.remaining_budget.labels(api_key_alias="k")._value.get() == pytest.approx(0.0)
    assert metrics.max_budget.labels(api_key_alias="k")._value.get() == pytest.approx(1.0)


async def test_unlimited_and_anonymous(store: Store) -> None:
    guard = SqlBudgetGuard(store)
    p = _key(store, budget=None)
    r = await guard.reserve(p, 123.0)
    await guard.settle(r, 100.0)
    assert _row(store, p.key_id).spend_usd == pytest.approx(100.0)
    anon = await guard.reserve(ANONYMOUS, 5.0)
    assert anon.key_id is None and anon.amount_usd == 0.0
    await guard.settle(anon, 5.0)


async def test_revoked_key_refused_by_reservation(store: Store) -> None:
    guard = SqlBudgetGuard(store)
    p = _key(store, budget=10.0)
    await guard.reserve(p, 0.1)
    revoke_key(store, "k")
    with pytest.raises(AuthenticationError, match="was revoked"):
        await guard.reserve(p, 0.1)  # the principal is stale (cached); the UPDATE still refuses


async def test_period_rollover(store: Store) -> None:
    guard = SqlBudgetGuard(store)
    p = _key(store, budget=1.0, period="day")
    r = await guard.reserve(p, 0.9)
    await guard.settle(r, 0.9)
    held = await guard.reserve(p, 0.1)  # in flight across midnight
    with pytest.raises(BudgetExceededError, match="daily budget"):
        await guard.reserve(p, 0.5)
    yesterday = period_start_for("day", datetime.now(UTC)) - timedelta(days=1)
    with store.session() as s:
        s.execute(sa.update(ApiKey).where(ApiKey.id == p.key_id).values(period_start=yesterday))
    r = await guard.reserve(p, 0.5)  # new day: spend resets, the held 0.1 carries over
    row = _row(store, p.key_id)
    assert row.spend_usd == 0.0 and row.reserved_usd == pytest.approx(0.6)
    assert row.period_start == period_start_for("day", datetime.now(UTC))
    await guard.settle(held, 0.1)
    await guard.settle(r, 0.4)
    row = _row(store, p.key_id)
    assert row.spend_usd == pytest.approx(0.5) and row.reserved_usd == pytest.approx(0.0)
    assert row.total_spend_usd == pytest.approx(1.4)


async def test_usage(store: Store) -> None:
    guard = SqlBudgetGuard(store)
    p = _key(store, budget=2.0)
    r = await guard.reserve(p, 0.5)
    await guard.settle(r, 0.3)
    held = await guard.reserve(p, 0.2)
    u = await guard.usage(p)
    assert u["key"] == {"name": "k", "prefix": p.key_prefix}
    b = u["budget"]
    assert b["limit_usd"] == 2.0 and b["spent_usd"] == pytest.approx(0.3) and b["reserved_usd"] == pytest.approx(0.2)
    assert b["remaining_usd"] == pytest.approx(1.5) and b["period"] == "month"
    await guard.settle(held, 0.0)
    assert (await guard.usage(ANONYMOUS))["key"] is None


def test_50_concurrent_reservations_never_overspend(store: Store) -> None:
    """50 threads reserve at the same instant: exactly budget/estimate of them get through."""
    guard = SqlBudgetGuard(store)
    p = _key(store, budget=1.0)
    barrier = threading.Barrier(50)

    def one(_: int) -> bool:
        barrier.wait()
        try:
            guard.reserve_sync(p, 0.05)
            return True
        except BudgetExceededError:
            return False

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    assert sum(results) == 20
    row = _row(store, p.key_id)
    assert row.reserved_usd == pytest.approx(1.0) and row.reserved_usd <= 1.0 + 1e-9


async def test_50_concurrent_requests_spend_bounded_by_inflight_estimates(store: Store) -> None:
    """Full request cycles (reserve, work, settle) with actual costs above and below estimates."""
    guard = SqlBudgetGuard(store)
    p = _key(store, budget=1.0)
    rng = random.Random(7)
    est = 0.08
    actuals = [est * rng.uniform(0.3, 1.3) for _ in range(50)]
    accepted: list[float] = []
    peak = 0.0
    lock = asyncio.Lock()

    async def request(i: int) -> None:
        nonlocal peak
        try:
            res = await guard.reserve(p, est)
        except BudgetExceededError:
            return
        await asyncio.sleep(rng.uniform(0, 0.05))
        await guard.settle(res, actuals[i])
        async with lock:
            accepted.append(actuals[i])
            row = await asyncio.to_thread(_row, store, p.key_id)
            peak = max(peak, row.spend_usd)

    await asyncio.gather(*(request(i) for i in range(50)))
    row = _row(store, p.key_id)
    overshoot = sum(max(0.0, a - est) for a in accepted)
    assert row.reserved_usd == pytest.approx(0.0, abs=1e-9)
    assert row.spend_usd == pytest.approx(sum(accepted))
    # every reservation fit under the cap, so spend exceeds it by at most what actual costs overran estimates
    assert row.spend_usd <= 1.0 + overshoot + 1e-9
    assert len(accepted) < 50  # the cap did refuse requests
