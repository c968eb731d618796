"""Per-key budgets: a hard USD cap per day or month, enforced by one atomic UPDATE per request.

Before forwarding, the chat service reserves an estimate of the request's cost
(:func:`gateway.store.budget.reserve`, which holds every statement of this module)::

    UPDATE api_keys
       SET spend_usd    = CASE WHEN period_start < :current_start THEN 0 ELSE spend_usd END,
           period_start = CASE WHEN period_start < :current_start THEN :current_start ELSE period_start END,
           reserved_usd = reserved_usd + :estimate
     WHERE id = :key_id AND revoked_at IS NULL
       AND (budget_usd IS NULL
            OR (CASE WHEN period_start < :current_start THEN 0 ELSE spend_usd END) + reserved_usd + :estimate
               <= budget_usd + 1e-9)
    RETURNING name, key_prefix, revoked_at, budget_usd, budget_period, period_start, spend_usd, reserved_usd

(``:current_start`` is the start of the key's current day or month, picked by a CASE on
``budget_period``.) The check and the increment are one statement, so on PostgreSQL the
row lock and on SQLite the database write lock serialise concurrent reservations: the
sum of settled spend and held estimates never exceeds the budget. A request can only
overspend by the difference between its actual cost and its estimate.

After the response, :meth:`SqlBudgetGuard.settle` moves the estimate out of
``reserved_usd`` and adds the actual cost to ``spend_usd`` (and ``total_spend_usd``).
Period roll-over happens inside the same statements: the first reservation or settlement
after the period ends zeroes ``spend_usd``. Held estimates carry over, so a request
straddling midnight is charged to the period in which it settles.

The reservation also checks ``revoked_at IS NULL``: this is what makes a revocation
effective on every replica for the very next request.

This module is the policy around those statements: what is reserved (a finite estimate > 0),
the period arithmetic (the current day's and month's starts are computed here and passed in),
and the refusal messages.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from gateway.errors import AuthenticationError, BudgetExceededError
from gateway.serving.interfaces import Principal, Reservation
from gateway.store import budget as budget_sql
from gateway.store.budget import KeyBudget, PeriodStarts
from gateway.store.engine import Store
from gateway.store.tables import utcnow

if TYPE_CHECKING:
    from gateway.metrics import Metrics


def period_start_for(period: str, now: datetime) -> datetime:
    """Start (UTC) of the day or month containing ``now``."""
    now = now.astimezone(UTC)
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"unknown budget period {period!r}; valid: day, month")


def period_end_for(period: str, start: datetime) -> datetime:
    """Start of the next period after the one beginning at ``start``."""
    if period == "day":
        return start + timedelta(days=1)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def period_starts(now: datetime) -> PeriodStarts:
    """The current day's and month's starts: what the budget statements roll a key over to."""
    return PeriodStarts(day=period_start_for("day", now), month=period_start_for("month", now))


def _usd(x: float) -> str:
    return f"${x:.4f}" if abs(x) < 100 else f"${x:,.2f}"


def _amount(x: float) -> float:
    """A cost as the statements take it: finite and > 0, else 0."""
    return float(x) if math.isfinite(x) and x > 0 else 0.0


class SqlBudgetGuard:
    """:class:`~gateway.serving.interfaces.BudgetGuard` on the ``api_keys`` table (SQLite or PostgreSQL)."""

    def __init__(self, store: Store, *, metrics: Metrics | None = None) -> None:
        self.store = store
        self.metrics = metrics

    # -- BudgetGuard -------------------------------------------------------------------------------
    async def reserve(self, principal: Principal, estimate_usd: float) -> Reservation:
        if principal.key_id is None:
            return Reservation(key_id=None, amount_usd=0.0)
        return await asyncio.to_thread(self.reserve_sync, principal, estimate_usd)

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        if reservation.key_id is None:
            return
        await asyncio.to_thread(self.settle_sync, reservation, actual_usd)

    # -- the statements (gateway.store.budget) -------------------------------------------------------
    def reserve_sync(self, principal: Principal, estimate_usd: float) -> Reservation:
        assert principal.key_id is not None
        est = _amount(estimate_usd)
        now = utcnow()
        got = budget_sql.reserve(self.store, principal.key_id, est, period_starts(now))
        if got.held:
            assert got.key is not None
            self._observe(principal.key_name, got.key.budget_usd, got.key.spend_usd)
            return Reservation(key_id=principal.key_id, amount_usd=est, period_start=got.key.period_start, token=now)
        raise self._refusal(principal, got.key, est, now)

    def settle_sync(self, reservation: Reservation, actual_usd: float) -> None:
        assert reservation.key_id is not None
        got = budget_sql.settle(self.store, reservation.key_id, reservation.amount_usd, _amount(actual_usd),
                                period_starts(utcnow()))
        if got is not None:
            self._observe(got.name, got.budget_usd, got.spend_usd)

    def _observe(self, key_name: str, budget: float | None, spend: float) -> None:
        if self.metrics is not None and budget is not None:
            self.metrics.set_key_budget(key_name, budget, budget - spend)

    @staticmethod
    def _refusal(principal: Principal, row: KeyBudget | None, est: float, now: datetime) -> Exception:
        if row is None:
            return AuthenticationError(f"API key {principal.key_name!r} no longer exists", code="invalid_api_key")
        if row.revoked_at is not None:
            return AuthenticationError(f"API key {row.name!r} ({row.key_prefix}...) was revoked",
                                       code="revoked_api_key")
        assert row.budget_usd is not None
        start = period_start_for(row.budget_period, now)
        spend = row.spend_usd if row.period_start.replace(tzinfo=UTC) >= start else 0.0
        resets = period_end_for(row.budget_period, start)
        return BudgetExceededError(
            f"budget exceeded for key {row.name!r}: {_usd(spend)} spent and {_usd(row.reserved_usd)} held by "
            f"in-flight requests of the {'daily' if row.budget_period == 'day' else 'monthly'} budget of {_usd(row.budget_usd)} "
            f"(period {start:%Y-%m-%d} to {resets:%Y-%m-%d} UTC); this request needs an estimated {_usd(est)}. "
            f"The budget resets at {resets:%Y-%m-%dT%H:%M:%SZ}.",
            param="budget",
        )

    # -- usage ---------------------------------------------------------------------------------------
    def usage_sync(self, key_id: int) -> dict[str, Any]:
        """The key's budget state and its logged requests this period (what ``GET /v1/usage`` returns).

        Request counts come from the request log, which the background writer fills within
        about a second; spend comes from the budget columns and is exact.
        """
        starts = period_starts(utcnow())
        got = budget_sql.usage(self.store, key_id, starts)
        if got is None:
            raise AuthenticationError("API key no longer exists", code="invalid_api_key")
        row, totals = got
        start = starts.of(row.budget_period)
        spend = row.spend_usd if row.period_start >= start else 0.0
        remaining = None if row.budget_usd is None else max(0.0, row.budget_usd - spend - row.reserved_usd)
        return {
            "object": "usage",
            "key": {"name": row.name, "prefix": row.key_prefix},
            "lambda": {"default": row.default_lambda, "min": row.lambda_min, "max": row.lambda_max},
            "rpm_limit": row.rpm_limit,
            "models": row.allowed_models,
            "budget": {
                "period": row.budget_period,
                "period_start": start.isoformat().replace("+00:00", "Z"),
                "resets_at": period_end_for(row.budget_period, start).isoformat().replace("+00:00", "Z"),
                "limit_usd": row.budget_usd,
                "spent_usd": spend,
                "reserved_usd": row.reserved_usd,
                "remaining_usd": remaining,
            },
            "period_requests": {
                "requests": totals.requests, "prompt_tokens": totals.prompt_tokens,
                "completion_tokens": totals.completion_tokens, "cost_usd": totals.cost_usd,
            },
            "total_spend_usd": row.total_spend_usd,
        }

    async def usage(self, principal: Principal) -> dict[str, Any]:
        if principal.key_id is None:
            return {"object": "usage", "key": None, "budget": None,
                    "note": "open gateway: no API key, so no budget or usage is tracked per caller"}
        return await asyncio.to_thread(self.usage_sync, principal.key_id)
