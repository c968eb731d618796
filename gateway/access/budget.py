"""Per-key budgets: a hard USD cap per day or month, enforced by one atomic UPDATE per request.

Before forwarding, the chat service reserves an estimate of the request's cost::

    UPDATE api_keys
       SET spend_usd    = CASE WHEN period_start < :current_start THEN 0 ELSE spend_usd END,
           period_start = CASE WHEN period_start < :current_start THEN :current_start ELSE period_start END,
           reserved_usd = reserved_usd + :estimate
     WHERE id = :key_id AND revoked_at IS NULL
       AND (budget_usd IS NULL
            OR (CASE WHEN period_start < :current_start THEN 0 ELSE spend_usd END) + reserved_usd + :estimate
               <= budget_usd + 1e-9)
    RETURNING spend_usd, reserved_usd, budget_usd, period_start

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
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from gateway.errors import AuthenticationError, BudgetExceededError
from gateway.serving.interfaces import Principal, Reservation
from gateway.store.engine import Store
from gateway.store.tables import ApiKey, RequestRow, utcnow

if TYPE_CHECKING:
    from gateway.metrics import Metrics


#: Float rounding allowance: 20 x $0.05 must fit a $1 budget although 0.05 * 20 > 1.0 in binary floating point.
BUDGET_EPSILON_USD = 1e-9


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
        from datetime import timedelta

        return start + timedelta(days=1)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def _usd(x: float) -> str:
    return f"${x:.4f}" if abs(x) < 100 else f"${x:,.2f}"


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

    # -- the statements ------------------------------------------------------------------------------
    @staticmethod
    def _current_start(now: datetime) -> Any:
        return sa.case(
            (ApiKey.budget_period == "day", sa.literal(period_start_for("day", now), ApiKey.period_start.type)),
            else_=sa.literal(period_start_for("month", now), ApiKey.period_start.type),
        )

    def reserve_sync(self, principal: Principal, estimate_usd: float) -> Reservation:
        assert principal.key_id is not None
        est = float(estimate_usd) if math.isfinite(estimate_usd) and estimate_usd > 0 else 0.0
        now = utcnow()
        cur = self._current_start(now)
        rolled = ApiKey.period_start < cur
        spend_now = sa.case((rolled, sa.literal(0.0)), else_=ApiKey.spend_usd)
        stmt = (
            sa.update(ApiKey)
            .where(
                ApiKey.id == principal.key_id,
                ApiKey.revoked_at.is_(None),
                sa.or_(ApiKey.budget_usd.is_(None),
                       spend_now + ApiKey.reserved_usd + est <= ApiKey.budget_usd + BUDGET_EPSILON_USD),
            )
            .values(
                spend_usd=spend_now,
                period_start=sa.case((rolled, cur), else_=ApiKey.period_start),
                reserved_usd=ApiKey.reserved_usd + est,
            )
            .returning(ApiKey.period_start, ApiKey.spend_usd, ApiKey.budget_usd)
            .execution_options(synchronize_session=False)
        )
        with self.store.engine.begin() as conn:
            got = conn.execute(stmt).first()
            if got is None:
                row = conn.execute(sa.select(ApiKey.__table__).where(ApiKey.id == principal.key_id)).first()
        if got is not None:
            self._observe(principal.key_name, got.budget_usd, got.spend_usd)
            return Reservation(key_id=principal.key_id, amount_usd=est, period_start=got.period_start, token=now)
        raise self._refusal(principal, row, est, now)

    def settle_sync(self, reservation: Reservation, actual_usd: float) -> None:
        actual = float(actual_usd) if math.isfinite(actual_usd) and actual_usd > 0 else 0.0
        now = utcnow()
        cur = self._current_start(now)
        rolled = ApiKey.period_start < cur
        left = ApiKey.reserved_usd - reservation.amount_usd
        stmt = (
            sa.update(ApiKey)
            .where(ApiKey.id == reservation.key_id)
            .values(
                spend_usd=sa.case((rolled, sa.literal(0.0)), else_=ApiKey.spend_usd) + actual,
                period_start=sa.case((rolled, cur), else_=ApiKey.period_start),
                reserved_usd=sa.case((left < 0, sa.literal(0.0)), else_=left),
                total_spend_usd=ApiKey.total_spend_usd + actual,
            )
            .returning(ApiKey.name, ApiKey.spend_usd, ApiKey.budget_usd)
            .execution_options(synchronize_session=False)
        )
        with self.store.engine.begin() as conn:
            got = conn.execute(stmt).first()
        if got is not None:
            self._observe(got.name, got.budget_usd, got.spend_usd)

    def _observe(self, key_name: str, budget: float | None, spend: float) -> None:
        if self.metrics is not None and budget is not None:
            self.metrics.set_key_budget(key_name, budget, budget - spend)

    @staticmethod
    def _refusal(principal: Principal, row: Any, est: float, now: datetime) -> Exception:
        if row is None:
            return AuthenticationError(f"API key {principal.key_name!r} no longer exists", code="invalid_api_key")
        if row.revoked_at is not None:
            return AuthenticationError(f"API key {row.name!r} ({row.key_prefix}...) was revoked",
                                       code="revoked_api_key")
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
        now = utcnow()
        with self.store.sessions() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise AuthenticationError("API key no longer exists", code="invalid_api_key")
            start = period_start_for(row.budget_period, now)
            spend = row.spend_usd if row.period_start >= start else 0.0
            agg = s.execute(
                sa.select(
                    sa.func.count(RequestRow.id),
                    sa.func.coalesce(sa.func.sum(RequestRow.prompt_tokens), 0),
                    sa.func.coalesce(sa.func.sum(RequestRow.completion_tokens), 0),
                    sa.func.coalesce(sa.func.sum(RequestRow.cost_usd), 0.0),
                ).where(RequestRow.key_id == key_id, RequestRow.started_at >= start)
            ).one()
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
                "requests": int(agg[0] or 0), "prompt_tokens": int(agg[1] or 0),
                "completion_tokens": int(agg[2] or 0), "cost_usd": float(agg[3] or 0.0),
            },
            "total_spend_usd": row.total_spend_usd,
        }

    async def usage(self, principal: Principal) -> dict[str, Any]:
        if principal.key_id is None:
            return {"object": "usage", "key": None, "budget": None,
                    "note": "open gateway: no API key, so no budget or usage is tracked per caller"}
        return await asyncio.to_thread(self.usage_sync, principal.key_id)
