"""The budget pacer of keys with ``budget_policy: pace``: the controller of :mod:`gateway.pacing` on the store.

For a paced key the chat service asks :meth:`SqlPacer.paced_lambda` for the λ to route with. This replica
answers from its cache for ``interval_s``; after that it steps the controller once (one request per key at a
time; the others are served the last λ meanwhile): it reads the key's budget, spend, held estimates and the
controller's state (``key_pacing``, :mod:`gateway.store.pacing`), computes the next state and writes it back
if no other replica wrote since it read (compare and set; if one did, its fresher state is used). A state
written less than ``interval_s`` ago by any replica is used as it is, so the replicas of a deployment step a
key's controller about once per interval together, and they all serve the same λ.

A key without a budget is served its default λ (nothing to pace against). The hard cap of the budget is not
this module's: reservations (:mod:`gateway.access.budget`) refuse what does not fit, as for any key. When the
store cannot be read the last λ (or the key's default) is served: pacing never fails a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from gateway.access.budget import period_end_for, period_start_for
from gateway.pacing import CostCurve, PaceInputs, PaceParams, PaceState, pace_step
from gateway.serving.interfaces import Principal
from gateway.store import pacing as pace_sql
from gateway.store.engine import Store
from gateway.store.tables import utcnow

if TYPE_CHECKING:
    from gateway.metrics import Metrics

logger = logging.getLogger("uniroute.pacing")


def _clamp(principal: Principal, lam: float) -> float:
    return min(max(lam, principal.lambda_min), principal.lambda_max)


class SqlPacer:
    """:class:`~gateway.serving.interfaces.LambdaPacer` over ``api_keys`` and ``key_pacing``.

    ``clock`` is the time the budget periods are computed in (UTC now; the simulation passes its own).
    """

    def __init__(self, store: Store, *, metrics: Metrics | None = None, interval_s: float = 1.0,
                 params: PaceParams | None = None, clock: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.metrics = metrics
        self.interval_s = interval_s
        self.params = params or PaceParams()
        self.clock = clock
        self._cache: dict[int, tuple[float, float]] = {}  # key id -> (clock seconds when stepped, λ)
        self._locks: dict[int, asyncio.Lock] = {}

    async def paced_lambda(self, principal: Principal, curve: CostCurve | None) -> float:
        key_id = principal.key_id
        if key_id is None:
            return principal.default_lambda
        now = self.clock()
        t = now.timestamp()
        hit = self._cache.get(key_id)
        if hit is not None and 0 <= t - hit[0] < self.interval_s:
            return hit[1]
        lock = self._locks.setdefault(key_id, asyncio.Lock())
        if lock.locked() and hit is not None:
            return hit[1]  # another request of this key is stepping the controller
        async with lock:
            hit = self._cache.get(key_id)
            if hit is not None and 0 <= t - hit[0] < self.interval_s:
                return hit[1]
            try:
                lam = await asyncio.to_thread(self.step_sync, principal, curve, now)
            except Exception as exc:
                lam = hit[1] if hit is not None else principal.default_lambda
                logger.warning("pacing key %r: its state could not be read or written (%s); serving λ=%g",
                               principal.key_name, type(exc).__name__, lam)
            self._cache[key_id] = (t, lam)
        if self.metrics is not None:
            self.metrics.set_key_lambda(principal.key_name, lam)
        return lam

    def step_sync(self, principal: Principal, curve: CostCurve | None, now: datetime) -> float:
        """Step the key's controller once (or take a state another replica wrote within ``interval_s``)."""
        assert principal.key_id is not None
        t = now.timestamp()
        lam = principal.default_lambda
        for _ in range(3):  # lost a compare-and-set: read the winner's state and try again
            got = pace_sql.read(self.store, principal.key_id)
            if got is None or got[0].budget_usd is None:
                return _clamp(principal, lam)
            key, row = got
            budget = got[0].budget_usd
            start = period_start_for(key.budget_period, now)
            end = period_end_for(key.budget_period, start)
            if row is not None:
                lam = row.lam
                if row.period_start == start and 0 <= t - row.updated_at.timestamp() < self.interval_s:
                    return _clamp(principal, row.lam)
            state = None if row is None else PaceState(
                lam=row.lam, integral=row.integral, exposure=row.exposure, updated_at=row.updated_at.timestamp(),
                period_start=row.period_start.timestamp())
            spend = key.spend_usd if key.period_start.astimezone(UTC) >= start else 0.0
            new = pace_step(state, PaceInputs(
                now=t, period_start=start.timestamp(), period_end=end.timestamp(), budget_usd=budget,
                spent_usd=spend, reserved_usd=key.reserved_usd, lambda_min=principal.lambda_min,
                lambda_max=principal.lambda_max, default_lambda=principal.default_lambda), curve, self.params)
            written = pace_sql.write(self.store, principal.key_id, lam=new.lam, integral=new.integral,
                                     exposure=new.exposure, period_start=start,
                                     updated_at=datetime.fromtimestamp(new.updated_at, UTC),
                                     expected_version=None if row is None else row.version)
            if written is not None:
                return _clamp(principal, new.lam)
        return _clamp(principal, lam)
