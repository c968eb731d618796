"""The budget statements on ``api_keys``: reserve, settle, and the usage read of ``GET /v1/usage``.

:func:`reserve` is one conditional UPDATE; the check and the increment are one statement, so on
PostgreSQL the row lock and on SQLite the database write lock serialise concurrent
reservations. The policy around them (estimates, period arithmetic, refusal messages) is
:mod:`gateway.access.budget`'s, which passes in the start of the current day and month.

Each reservation also has a ``reservations`` row (the ledger: who holds it, written in the same
transaction), and its settlement deletes that row in the same transaction as the charge: a
settlement applied again (a retry, the request-log writer, a replayed journal) finds no row and
does nothing (docs/security/durability.md; releases: ``gateway/store/reservations.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.serving.interfaces import Settlement
from gateway.store.engine import Store
from gateway.store.tables import ApiKey, RequestRow, ReservationRow, utcnow

#: The ledger as a Core table: its statements run on every keyed request, and Core skips the ORM's compile layers.
_LEDGER = cast(sa.Table, ReservationRow.__table__)

#: Float rounding allowance: 20 x $0.05 must fit a $1 budget although 0.05 * 20 > 1.0 in binary floating point.
BUDGET_EPSILON_USD = 1e-9


@dataclass(frozen=True)
class PeriodStarts:
    """The start (UTC) of the current day and month; a key rolls over to the one of its ``budget_period``."""

    day: datetime
    month: datetime

    def of(self, period: str) -> datetime:
        return self.day if period == "day" else self.month


@dataclass(frozen=True)
class KeyBudget:
    """A key's budget columns as a statement left (or found) them."""

    name: str
    key_prefix: str
    revoked_at: datetime | None
    budget_usd: float | None
    budget_period: str
    period_start: datetime
    spend_usd: float
    reserved_usd: float


@dataclass(frozen=True)
class Reserved:
    """What :func:`reserve` did: ``held`` tells whether the amount is now held; ``key`` is the key's budget
    after the statement (held) or as it stands (refused; None when no such key exists)."""

    held: bool
    key: KeyBudget | None


@dataclass(frozen=True)
class RequestTotals:
    """A key's logged requests since a time (from the request log)."""

    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


_BUDGET_COLUMNS = (ApiKey.name, ApiKey.key_prefix, ApiKey.revoked_at, ApiKey.budget_usd, ApiKey.budget_period,
                   ApiKey.period_start, ApiKey.spend_usd, ApiKey.reserved_usd)


def _key_budget(row: Any) -> KeyBudget:
    return KeyBudget(name=row.name, key_prefix=row.key_prefix, revoked_at=row.revoked_at, budget_usd=row.budget_usd,
                     budget_period=row.budget_period, period_start=row.period_start, spend_usd=row.spend_usd,
                     reserved_usd=row.reserved_usd)


def _current_start(starts: PeriodStarts) -> Any:
    return sa.case(
        (ApiKey.budget_period == "day", sa.literal(starts.day, ApiKey.period_start.type)),
        else_=sa.literal(starts.month, ApiKey.period_start.type),
    )


def reserve(store: Store, key_id: int, amount_usd: float, starts: PeriodStarts, *,
            reservation_id: str | None = None, holder: str | None = None) -> Reserved:
    """Hold ``amount_usd`` on the key when it is not revoked and the amount fits its budget; one atomic UPDATE.

    The statement also rolls the key over to a new period (``spend_usd`` zeroed) when its period ended.
    With ``reservation_id`` and ``holder``, the same transaction writes the reservation's ``reservations``
    row (its ledger entry: who holds it, released if that process dies; see ``gateway/store/reservations.py``).
    """
    cur = _current_start(starts)
    rolled = ApiKey.period_start < cur
    spend_now = sa.case((rolled, sa.literal(0.0)), else_=ApiKey.spend_usd)
    stmt = (
        sa.update(ApiKey)
        .where(
            ApiKey.id == key_id,
            ApiKey.revoked_at.is_(None),
            sa.or_(ApiKey.budget_usd.is_(None),
                   spend_now + ApiKey.reserved_usd + amount_usd <= ApiKey.budget_usd + BUDGET_EPSILON_USD),
        )
        .values(
            spend_usd=spend_now,
            period_start=sa.case((rolled, cur), else_=ApiKey.period_start),
            reserved_usd=ApiKey.reserved_usd + amount_usd,
        )
        .returning(*_BUDGET_COLUMNS)
        .execution_options(synchronize_session=False)
    )
    ledger = None
    if reservation_id is not None and holder is not None:
        ledger = {"id": reservation_id, "key_id": key_id, "holder": holder, "amount_usd": amount_usd,
                  "created_at": utcnow()}
    with store.engine.begin() as conn:
        got = conn.execute(stmt).first()
        if got is not None and ledger is not None:
            conn.execute(sa.insert(_LEDGER), ledger)
        if got is None:
            row = conn.execute(sa.select(*_BUDGET_COLUMNS).where(ApiKey.id == key_id)).first()
    if got is not None:
        return Reserved(held=True, key=_key_budget(got))
    return Reserved(held=False, key=_key_budget(row) if row is not None else None)


def settle(store: Store, key_id: int, reserved_usd: float, actual_usd: float, starts: PeriodStarts, *,
           reservation_id: str | None = None) -> KeyBudget | None:
    """Release ``reserved_usd`` of the key's held amount and add ``actual_usd`` to its spend (period and lifetime).

    With ``reservation_id`` the settlement happens at most once: its ``reservations`` row is deleted in the
    same transaction, and a settlement that finds no row (settled before: a retry, a replayed journal) does
    nothing and returns None. A row already released (its holder was presumed dead) is charged, not released."""
    with store.engine.begin() as conn:
        return settle_in(conn, key_id, reserved_usd, actual_usd, starts, reservation_id=reservation_id)


def settle_in(conn: Connection, key_id: int, reserved_usd: float, actual_usd: float, starts: PeriodStarts, *,
              reservation_id: str | None = None) -> KeyBudget | None:
    """:func:`settle` inside the caller's transaction."""
    release = reserved_usd
    if reservation_id is not None:
        found = conn.execute(sa.delete(_LEDGER).where(_LEDGER.c.id == reservation_id)
                             .returning(_LEDGER.c.released_at)).first()
        if found is None:
            return None
        if found.released_at is not None:
            release = 0.0
    return _charge(conn, key_id, release, actual_usd, starts)


def _charge(conn: Connection, key_id: int, release_usd: float, actual_usd: float,
            starts: PeriodStarts) -> KeyBudget | None:
    cur = _current_start(starts)
    rolled = ApiKey.period_start < cur
    left = ApiKey.reserved_usd - release_usd
    stmt = (
        sa.update(ApiKey)
        .where(ApiKey.id == key_id)
        .values(
            spend_usd=sa.case((rolled, sa.literal(0.0)), else_=ApiKey.spend_usd) + actual_usd,
            period_start=sa.case((rolled, cur), else_=ApiKey.period_start),
            reserved_usd=sa.case((left < 0, sa.literal(0.0)), else_=left),
            total_spend_usd=ApiKey.total_spend_usd + actual_usd,
        )
        .returning(*_BUDGET_COLUMNS)
        .execution_options(synchronize_session=False)
    )
    got = conn.execute(stmt).first()
    return _key_budget(got) if got is not None else None


def settle_many(conn: Connection, settlements: Sequence[Settlement], starts: PeriodStarts) -> list[KeyBudget]:
    """Apply the settlements whose ``reservations`` row is still there, inside the caller's transaction (the
    request-log writer's, with the rows): one DELETE for all, then one UPDATE per key, in key order. A
    settlement without a row was applied before (by the request path, a retry or a replay): skipped."""
    by_id = {s.reservation_id: s for s in settlements}
    if not by_id:
        return []
    found = conn.execute(sa.delete(_LEDGER).where(_LEDGER.c.id.in_(list(by_id)))
                         .returning(_LEDGER.c.id, _LEDGER.c.released_at)).all()
    per_key: dict[int, list[float]] = {}
    for row in found:
        s = by_id[row.id]
        actual = s.actual_usd if math.isfinite(s.actual_usd) and s.actual_usd > 0 else 0.0  # as the guard's settle
        acc = per_key.setdefault(s.key_id, [0.0, 0.0])
        acc[0] += 0.0 if row.released_at is not None else s.reserved_usd
        acc[1] += actual
    out = []
    for key_id in sorted(per_key):
        got = _charge(conn, key_id, per_key[key_id][0], per_key[key_id][1], starts)
        if got is not None:
            out.append(got)
    return out


def usage(store: Store, key_id: int, starts: PeriodStarts) -> tuple[ApiKey, RequestTotals] | None:
    """The key and its logged requests in its current period (None when no such key exists)."""
    with store.sessions() as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            return None
        agg = s.execute(
            sa.select(
                sa.func.count(RequestRow.id),
                sa.func.coalesce(sa.func.sum(RequestRow.prompt_tokens), 0),
                sa.func.coalesce(sa.func.sum(RequestRow.completion_tokens), 0),
                sa.func.coalesce(sa.func.sum(RequestRow.cost_usd), 0.0),
            ).where(RequestRow.key_id == key_id, RequestRow.started_at >= starts.of(row.budget_period))
        ).one()
    return row, RequestTotals(requests=int(agg[0] or 0), prompt_tokens=int(agg[1] or 0),
                              completion_tokens=int(agg[2] or 0), cost_usd=float(agg[3] or 0.0))
