"""Budget reservations tied to the process that holds them: holder ids, heartbeats and releases.

Every gateway process is a *holder* with an id new at each start (``<host>-<pid>-<random>``).
A reservation (:func:`gateway.store.budget.reserve`) writes a ``reservations`` row naming its holder
in the same transaction as it adds its amount to ``api_keys.reserved_usd``; its settlement deletes
the row in the same transaction as the charge. A reservation whose holder died is never settled, so
it is *released*: its amount leaves ``reserved_usd`` and the row keeps ``released_at`` (a tombstone,
so a settlement replayed later still charges the cost, once, without releasing it twice).

Releases happen

- at the next start on the dead process's host (:func:`release_holders` with the holders whose
  request-log journal the new process took over: ``gateway/store/journal.py``), and
- on any replica, once a holder's heartbeat (``reservation_holders.heartbeat_at``) is older than
  ``database.reservation_ttl_s`` (:func:`release_expired`); a reservation whose holder never wrote a
  heartbeat counts from its own ``created_at``.

Every statement that releases updates the reservation rows first (``released_at IS NULL`` in the
WHERE clause, so two replicas never release the same row twice) and then the keys in id order.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from gateway.store.engine import Store
from gateway.store.tables import ApiKey, ReservationHolder, ReservationRow, utcnow

#: How long a released reservation's row is kept for a settlement that may still come (a journal replayed late).
TOMBSTONE_RETENTION = timedelta(days=7)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def new_holder_id(hostname: str | None = None, pid: int | None = None) -> str:
    """A fresh holder id: ``<host>-<pid>-<12 hex>``, letters, digits, ``_`` and ``-`` only (a file-name part)."""
    host = _UNSAFE.sub("_", hostname if hostname is not None else socket.gethostname())[:64] or "host"
    return f"{host}-{pid if pid is not None else os.getpid()}-{uuid.uuid4().hex[:12]}"


def _upsert(store: Store, table: Any) -> Any:
    if store.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def heartbeat(store: Store, holder: str, now: datetime | None = None) -> None:
    """Register ``holder`` or refresh its heartbeat (an upsert: a holder released while partitioned comes back)."""
    now = now or utcnow()
    stmt = _upsert(store, ReservationHolder.__table__).values(
        holder=holder, hostname=socket.gethostname()[:255], pid=os.getpid(), started_at=now, heartbeat_at=now)
    stmt = stmt.on_conflict_do_update(index_elements=["holder"], set_={"heartbeat_at": now})
    with store.engine.begin() as conn:
        conn.execute(stmt)


def release_keys(conn: Connection, released: Iterable[tuple[int, float]]) -> int:
    """Take each ``(key_id, amount)`` out of ``api_keys.reserved_usd`` (never below 0), keys in id order."""
    per_key: dict[int, float] = defaultdict(float)
    n = 0
    for key_id, amount in released:
        per_key[key_id] += amount
        n += 1
    for key_id in sorted(per_key):
        left = ApiKey.reserved_usd - per_key[key_id]
        conn.execute(sa.update(ApiKey).where(ApiKey.id == key_id)
                     .values(reserved_usd=sa.case((left < 0, sa.literal(0.0)), else_=left))
                     .execution_options(synchronize_session=False))
    return n


def _release_where(store: Store, where: Any, now: datetime) -> int:
    stmt = (sa.update(ReservationRow).where(ReservationRow.released_at.is_(None), where)
            .values(released_at=now).returning(ReservationRow.key_id, ReservationRow.amount_usd)
            .execution_options(synchronize_session=False))
    with store.engine.begin() as conn:
        rows = conn.execute(stmt).all()
        return release_keys(conn, ((r.key_id, r.amount_usd) for r in rows))


def release_holders(store: Store, holders: Sequence[str], now: datetime | None = None) -> int:
    """Release every held reservation of ``holders`` (processes known dead) and forget them; the count released."""
    if not holders:
        return 0
    now = now or utcnow()
    n = _release_where(store, ReservationRow.holder.in_(list(holders)), now)
    with store.engine.begin() as conn:
        conn.execute(sa.delete(ReservationHolder).where(ReservationHolder.holder.in_(list(holders))))
    return n


def release_expired(store: Store, ttl_s: float, *, me: str | None = None, now: datetime | None = None) -> int:
    """Release the reservations of every holder (but ``me``) silent for more than ``ttl_s``; the count released.

    A holder is silent when its heartbeat is older than ``ttl_s``, or, with no ``reservation_holders``
    row at all, when the reservation itself is older than that. Silent holders' rows are then deleted
    (a holder that was only partitioned away registers again with its next heartbeat)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=ttl_s)
    stale = sa.select(ReservationHolder.holder).where(ReservationHolder.heartbeat_at < cutoff)
    known = sa.select(ReservationHolder.holder)
    where = sa.or_(ReservationRow.holder.in_(stale),
                   sa.and_(ReservationRow.holder.not_in(known), ReservationRow.created_at < cutoff))
    if me is not None:
        where = sa.and_(where, ReservationRow.holder != me)
    n = _release_where(store, where, now)
    gone = ReservationHolder.heartbeat_at < cutoff
    if me is not None:
        gone = sa.and_(gone, ReservationHolder.holder != me)
    with store.engine.begin() as conn:
        conn.execute(sa.delete(ReservationHolder).where(gone))
        conn.execute(sa.delete(ReservationRow).where(ReservationRow.released_at < now - TOMBSTONE_RETENTION))
    return n


def drop_reservations(store: Store, ids: Sequence[str]) -> int:
    """Delete the reservations ``ids`` that no settlement will ever come for (a reservation whose caller never
    learnt it was made: a commit whose answer was lost); the amounts of those still held are released."""
    if not ids:
        return 0
    stmt = (sa.delete(ReservationRow).where(ReservationRow.id.in_(list(ids)))
            .returning(ReservationRow.key_id, ReservationRow.amount_usd, ReservationRow.released_at))
    with store.engine.begin() as conn:
        rows = conn.execute(stmt).all()
        return release_keys(conn, ((r.key_id, r.amount_usd) for r in rows if r.released_at is None))


def held(store: Store, key_id: int | None = None) -> list[ReservationRow]:
    """The reservations held now (not released), oldest first; for ``key_id`` only when given."""
    q = sa.select(ReservationRow).where(ReservationRow.released_at.is_(None))
    if key_id is not None:
        q = q.where(ReservationRow.key_id == key_id)
    with store.sessions() as s:
        return list(s.scalars(q.order_by(ReservationRow.created_at)))
