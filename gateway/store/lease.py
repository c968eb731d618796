"""Database leases: at most one holder of a named lease at a time, across replicas.

:func:`acquire` is one atomic conditional ``UPDATE`` (take the row when it is free, expired or
already ours) and, when no row exists yet, an ``INSERT`` whose primary key makes the second
of two racing inserts fail. Both databases serialise the competing writes: on PostgreSQL the
losing ``UPDATE`` re-checks its ``WHERE`` after the winner commits and matches nothing.
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from gateway.store.engine import Store
from gateway.store.tables import Lease, utcnow


def acquire(store: Store, name: str, holder: str, ttl_s: float) -> bool:
    """Take or renew ``name`` for ``ttl_s`` seconds; False when another holder's lease is still valid."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    with store.session() as s:
        res = s.execute(sa.update(Lease)
                        .where(Lease.name == name, sa.or_(Lease.holder == holder, Lease.expires_at < now))
                        .values(holder=holder, expires_at=expires, acquired_at=now))
        if getattr(res, "rowcount", 0) == 1:
            return True
    try:
        with store.session() as s:
            s.add(Lease(name=name, holder=holder, expires_at=expires, acquired_at=now))
        return True
    except sa.exc.IntegrityError:
        return False


def release(store: Store, name: str, holder: str) -> bool:
    """Give the lease up (only its holder can)."""
    with store.session() as s:
        res = s.execute(sa.update(Lease).where(Lease.name == name, Lease.holder == holder)
                        .values(expires_at=utcnow() - timedelta(seconds=1)))
        return getattr(res, "rowcount", 0) == 1


def holder_of(store: Store, name: str) -> str | None:
    with store.session() as s:
        row = s.get(Lease, name)
        return row.holder if row is not None and row.expires_at > utcnow() else None
