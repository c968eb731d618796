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

Durability (docs/security/durability.md): each reservation also writes a ``reservations`` row
naming this process (its *holder* id), in the same transaction, and its settlement deletes that
row in the same transaction as the charge, so a settlement is applied at most once. The chat
service journals the request's record with its :class:`~gateway.serving.interfaces.Settlement`
before it settles, so when the store fails (or takes longer than ``settle_timeout_s``) after the
provider answered, the client still gets its answer and the request-log writer applies the charge
with the row once the store is back. A store outage on ``reserve`` or ``usage`` is a
:class:`~gateway.errors.StoreUnavailableError` (503 with ``Retry-After``). Reservations of dead
processes are released by :mod:`gateway.access.reservations`.

This module is the policy around those statements: what is reserved (a finite estimate > 0),
the period arithmetic (the current day's and month's starts are computed here and passed in),
and the refusal messages.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.errors import AuthenticationError, BudgetExceededError, StoreUnavailableError
from gateway.serving.interfaces import Principal, Reservation
from gateway.store import budget as budget_sql
from gateway.store.budget import KeyBudget, PeriodStarts
from gateway.store.engine import Store, is_unavailable, unavailable_error
from gateway.store.reservations import new_holder_id
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


logger = logging.getLogger("uniroute.budget")
T = TypeVar("T")


async def store_call(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a thread; a store outage becomes :class:`~gateway.errors.StoreUnavailableError` (503)."""
    try:
        return await asyncio.to_thread(fn, *args)
    except Exception as exc:
        err = unavailable_error(exc)
        if err is None:
            raise
        raise err from exc


def _usd(x: float) -> str:
    return f"${x:.4f}" if abs(x) < 100 else f"${x:,.2f}"


def _amount(x: float) -> float:
    """A cost as the statements take it: finite and > 0, else 0."""
    return float(x) if math.isfinite(x) and x > 0 else 0.0


class SqlBudgetGuard:
    """:class:`~gateway.serving.interfaces.BudgetGuard` on the ``api_keys`` table (SQLite or PostgreSQL).

    ``holder`` names this process in the ``reservations`` rows (``gateway.store.reservations``).
    ``settle_timeout_s`` bounds how long a settlement may keep a response waiting: past it (or when the
    store fails) :meth:`settle` raises :class:`~gateway.errors.StoreUnavailableError` while the statement
    goes on in the background; the request's journaled record carries the charge either way.
    """

    def __init__(self, store: Store, *, metrics: Metrics | None = None, holder: str | None = None,
                 settle_timeout_s: float = 2.0, clock: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.clock = clock  # the time periods roll over by (UTC now; the simulation passes its own)
        self.metrics = metrics
        self.holder = holder or new_holder_id()  # a guard built without one (tests, tools) is its own holder
        self.settle_timeout_s = settle_timeout_s
        self.unsure: set[str] = set()  # reservations whose commit may have happened unseen: dropped when the store is back
        self._background: set[asyncio.Future[Any]] = set()

    # -- BudgetGuard -------------------------------------------------------------------------------
    async def reserve(self, principal: Principal, estimate_usd: float) -> Reservation:
        if principal.key_id is None:
            return Reservation(key_id=None, amount_usd=0.0)
        rid = uuid.uuid4().hex
        work = self._keep(asyncio.ensure_future(asyncio.to_thread(self.reserve_sync, principal, estimate_usd, rid)))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            # the request went away while the statement ran: release what it holds once it is done
            work.add_done_callback(self._abandoned)
            raise
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self.unsure.add(rid)  # e.g. the connection broke at COMMIT: it may hold, with nobody to settle it
            raise StoreUnavailableError(cause=exc) from exc

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        if reservation.key_id is None:
            return
        work = self._keep(asyncio.ensure_future(asyncio.to_thread(self.settle_sync, reservation, actual_usd)))
        try:
            await asyncio.wait_for(asyncio.shield(work), self.settle_timeout_s)
        except TimeoutError:
            self._deferred()
            raise StoreUnavailableError(f"settling the budget took longer than {self.settle_timeout_s:g} s "
                                        "(database.settle_timeout_s)") from None
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self._deferred()
            raise StoreUnavailableError(cause=exc) from exc

    def _keep(self, fut: asyncio.Future[T]) -> asyncio.Future[T]:
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)
        return fut

    def _abandoned(self, work: asyncio.Future[Reservation]) -> None:
        if work.cancelled() or work.exception() is not None:
            return
        held = work.result()
        if self.metrics is not None:
            self.metrics.reservations_released.labels(reason="abandoned").inc()
        self._keep(asyncio.ensure_future(self._release_quietly(self.settle(held, 0.0), held.id)))

    async def _release_quietly(self, aw: Awaitable[None], reservation_id: str | None) -> None:
        try:
            await aw
        except Exception as exc:
            if reservation_id is not None:  # the keeper drops it once the store answers
                self.unsure.add(reservation_id)
            logger.warning("releasing an abandoned reservation failed (%s); retried later", type(exc).__name__)

    def _deferred(self) -> None:
        if self.metrics is not None:
            self.metrics.settlements_deferred.inc()

    # -- the statements (gateway.store.budget) -------------------------------------------------------
    def reserve_sync(self, principal: Principal, estimate_usd: float, reservation_id: str | None = None) -> Reservation:
        assert principal.key_id is not None
        est = _amount(estimate_usd)
        now = self.clock()
        rid = reservation_id or uuid.uuid4().hex
        got = budget_sql.reserve(self.store, principal.key_id, est, period_starts(now), reservation_id=rid,
                                 holder=self.holder)
        if got.held:
            assert got.key is not None
            self._observe(principal.key_name, got.key.budget_usd, got.key.spend_usd)
            return Reservation(key_id=principal.key_id, amount_usd=est, period_start=got.key.period_start, token=now,
                               id=rid)
        raise self._refusal(principal, got.key, est, now)

    def settle_sync(self, reservation: Reservation, actual_usd: float) -> None:
        assert reservation.key_id is not None
        got = budget_sql.settle(self.store, reservation.key_id, reservation.amount_usd, _amount(actual_usd),
                                period_starts(self.clock()), reservation_id=reservation.id)
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
        remains = max(0.0, row.budget_usd - spend - row.reserved_usd)
        refusal = BudgetExceededError(
            f"budget exceeded for key {row.name!r}: {_usd(spend)} spent and {_usd(row.reserved_usd)} held by "
            f"in-flight requests of the {'daily' if row.budget_period == 'day' else 'monthly'} budget of {_usd(row.budget_usd)} "
            f"(period {start:%Y-%m-%d} to {resets:%Y-%m-%d} UTC), so {_usd(remains)} remains; this request may cost "
            f"up to {_usd(est)}. "
            f"The budget resets at {resets:%Y-%m-%dT%H:%M:%SZ}.",
            param="budget",
        )
        refusal.remaining_usd = remains  # a paced key's request degrades to the models that fit it (ChatService)
        return refusal

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
        return await store_call(self.usage_sync, principal.key_id)
