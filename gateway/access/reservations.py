"""Keeping budget reservations tied to live processes: heartbeats and releases (docs/security/durability.md).

Every reservation names the process that holds it (``gateway/store/reservations.py``). A process that
dies (``kill -9``, OOM, a crash) never settles its in-flight reservations, which would hold the keys'
budgets forever. :class:`ReservationKeeper` runs in every gateway process and

- at start, releases the reservations of the processes whose request journal this one took over
  (they died on this host: their journal lock was free), and
- every ``ttl_s / 4`` seconds: refreshes this process's heartbeat, releases the reservations of every
  holder whose heartbeat is older than ``ttl_s`` (any replica does this, so a dead host's reservations
  are released too), drops reservations whose commit went unseen (``SqlBudgetGuard.unsure``) and
  forgets week-old tombstones.

A store outage only delays this: every step is retried at the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from gateway.store import reservations as reservations_sql
from gateway.store.engine import Store
from gateway.tasks import cancel_and_wait

if TYPE_CHECKING:
    from gateway.access.budget import SqlBudgetGuard
    from gateway.metrics import Metrics

logger = logging.getLogger("uniroute.budget")


class ReservationKeeper:
    def __init__(self, store: Store, holder: str, *, ttl_s: float, guard: SqlBudgetGuard | None = None,
                 metrics: Metrics | None = None) -> None:
        self.store = store
        self.holder = holder
        self.ttl_s = ttl_s
        self.guard = guard
        self.metrics = metrics
        self.dead: set[str] = set()  # holders known dead whose release is still to do
        self._task: asyncio.Task[None] | None = None

    @property
    def interval_s(self) -> float:
        return max(0.05, self.ttl_s / 4)

    async def start(self, dead_holders: Iterable[str] = ()) -> None:
        """Register this process and release the reservations of ``dead_holders``; then tick in the background."""
        self.dead.update(dead_holders)
        await self.tick()
        self._task = asyncio.create_task(self._run(), name="uniroute-reservation-keeper")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.tick()

    async def tick(self) -> None:
        """One round (each step on its own: one failing does not stop the others)."""
        steps = [("heartbeat", self._heartbeat), ("release of dead holders", self._release_dead),
                 ("release of silent holders", self._release_expired), ("unseen reservations", self._drop_unsure)]
        for what, step in steps:
            try:
                await asyncio.to_thread(step)
            except Exception as exc:
                logger.warning("reservations: %s failed (%s); retried in %.3g s", what, type(exc).__name__,
                               self.interval_s)

    def _heartbeat(self) -> None:
        reservations_sql.heartbeat(self.store, self.holder)

    def _release_dead(self) -> None:
        if not self.dead:
            return
        holders = sorted(self.dead)
        n = reservations_sql.release_holders(self.store, holders)
        self.dead.difference_update(holders)
        self._count("holder_restarted", n)
        if n:
            logger.warning("reservations: released %d held by %d process(es) that died on this host (%s)", n,
                           len(holders), ", ".join(holders))

    def _release_expired(self) -> None:
        n = reservations_sql.release_expired(self.store, self.ttl_s, me=self.holder)
        self._count("holder_expired", n)
        if n:
            logger.warning("reservations: released %d held by processes silent for more than %g s "
                           "(database.reservation_ttl_s)", n, self.ttl_s)

    def _drop_unsure(self) -> None:
        if self.guard is None or not self.guard.unsure:
            return
        ids = sorted(self.guard.unsure)
        n = reservations_sql.drop_reservations(self.store, ids)
        self.guard.unsure.difference_update(ids)
        self._count("abandoned", n)

    def _count(self, reason: str, n: int) -> None:
        if n and self.metrics is not None:
            self.metrics.reservations_released.labels(reason=reason).inc(n)

    async def aclose(self) -> bool:
        """Stop ticking, then release what this process still holds (nothing, after a clean drain) and
        unregister it. False when the store could not be reached (the next start on this host does it, if
        the caller leaves a marker: ``RequestLogWriter.leave_holder_marker``; else the TTL)."""
        with contextlib.suppress(Exception):
            await cancel_and_wait(self._task)
        self._task = None
        try:
            n = await asyncio.to_thread(reservations_sql.release_holders, self.store, [self.holder])
        except Exception as exc:
            logger.warning("reservations: could not unregister this process (%s); its reservations are released "
                           "at the next start on this host, or after database.reservation_ttl_s",
                           type(exc).__name__)
            return False
        if n:
            logger.warning("reservations: released %d still held at shutdown", n)
        return True
