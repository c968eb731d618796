"""Tenant-private profiles: a key's own labels shrink the global Ψ toward what they say, for that key only.

A key (through the admin API or ``uniroute profiles upload``) gives prompts with per-model scores. The gateway
maps each prompt to its cluster membership z(x) with the router (:func:`memberships`) and keeps, per model,
the sums ``counts_k = Σ z_k`` and ``errors_k = Σ z_k·(1 − score)`` (:func:`aggregate`; the ``tenant_profiles``
table). When it routes for that key, each profiled model's Ψ is replaced by the overlay (:func:`overlay`)

    Ψ'_k = (errors_k + m·Ψ_k) / (counts_k + m)  =  w_k·ê_k + (1 − w_k)·Ψ_k,   w_k = n_k / (n_k + m)

— the key's error rate ê_k on cluster k, shrunk toward the global Ψ_k by its label count n_k (``m`` =
``profiling.tenant_prior_weight``). A model without a global profile stays out of ``auto`` (its labels alone
do not make it routable); a cluster without labels keeps the global Ψ_k. No other key's routing changes:
:class:`TenantOverlays` hands the overlaid pool only to the key that owns the labels.

The overlays of every key are reloaded from the store by a poller (app.py), like the registry; the overlaid
pool is cached per key and registry snapshot, so an ``auto`` request pays a dict lookup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from gateway.serving.interfaces import LabelStats
from gateway.serving.router import EmbedFn
from gateway.tasks import cancel_and_wait
from routing.policy import GatewayPolicy, PoolModel

logger = logging.getLogger("uniroute.tenants")


def overlay(psi: np.ndarray, stats: LabelStats, prior_weight: float) -> np.ndarray:
    """Ψ' = (errors + m·Ψ) / (counts + m), cluster by cluster."""
    p = np.asarray(psi, dtype=np.float64)
    errors = np.asarray(stats.errors, dtype=np.float64)
    counts = np.asarray(stats.counts, dtype=np.float64)
    return np.clip((errors + prior_weight * p) / (counts + prior_weight), 0.0, 1.0)


def aggregate(z: np.ndarray, scores: Sequence[Mapping[str, float]]) -> dict[str, LabelStats]:
    """Per-model sufficient statistics of labelled prompts: ``z`` (n, K) memberships, ``scores[i]`` model → [0, 1]."""
    z = np.asarray(z, dtype=np.float64)
    k = z.shape[1]
    sums: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    for i, row in enumerate(scores):
        for model, score in row.items():
            errors, counts, n = sums.get(model, (np.zeros(k), np.zeros(k), 0))
            sums[model] = (errors + z[i] * (1.0 - float(score)), counts + z[i], n + 1)
    return {m: LabelStats(tuple(e.tolist()), tuple(c.tolist()), n) for m, (e, c, n) in sorted(sums.items())}


async def memberships(embed: EmbedFn | None, policy: GatewayPolicy, texts: Sequence[str]) -> np.ndarray:
    """z(x) of each text under the serving router, shape (n, K); ValueError when the policy has no clusters."""
    fn = getattr(policy, "membership", None)
    if embed is None or fn is None:
        raise ValueError(f"the routing policy {policy.name!r} has no prompt clusters: tenant profiles need "
                         "router.policy: uniroute")
    vectors = await asyncio.gather(*(embed(t) for t in texts))
    return np.stack([np.asarray(fn(v), dtype=np.float64).reshape(-1) for v in vectors])


class TenantOverlays:
    """Every key's label statistics (replaced as a whole by the poller) and the overlaid pools built from them."""

    def __init__(self, prior_weight: float) -> None:
        if not prior_weight > 0:
            raise ValueError(f"the tenant prior weight must be > 0, got {prior_weight}")
        self.prior_weight = prior_weight
        self._stats: dict[int, dict[str, LabelStats]] = {}
        self._pools: dict[int, tuple[tuple[PoolModel, ...], tuple[PoolModel, ...]]] = {}  # key -> (global, overlaid)

    def replace(self, stats: dict[int, dict[str, LabelStats]]) -> None:
        """The store's current label sets (a no-op when unchanged: the cached pools stay)."""
        if stats != self._stats:
            self._stats = stats
            self._pools = {}

    def has(self, key_id: int | None) -> bool:
        return key_id is not None and key_id in self._stats

    def pool(self, key_id: int | None, pool: tuple[PoolModel, ...]) -> tuple[PoolModel, ...] | None:
        """``pool`` with the key's overlay on every profiled model it labelled; None when the key has no labels."""
        mine = self._stats.get(key_id) if key_id is not None else None
        if not mine:
            return None
        assert key_id is not None
        cached = self._pools.get(key_id)
        if cached is not None and cached[0] is pool:
            return cached[1]
        out = []
        for m in pool:
            st = mine.get(m.name)
            if m.psi is not None and st is not None and len(st.counts) == len(m.psi):
                m = dataclasses.replace(m, psi=overlay(m.psi, st, self.prior_weight))
            out.append(m)
        overlaid = tuple(out)
        self._pools[key_id] = (pool, overlaid)
        return overlaid


class TenantPoller:
    """Reloads every key's label statistics from a source (the ``tenant_profiles`` table, wired in app.py) into
    :class:`TenantOverlays` every ``interval_s``, in a worker thread; a failed read keeps the last ones."""

    def __init__(self, load: Callable[[], dict[int, dict[str, LabelStats]]], overlays: TenantOverlays,
                 interval_s: float) -> None:
        self.load, self.overlays, self.interval_s = load, overlays, interval_s
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        self.overlays.replace(await asyncio.to_thread(self.load))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception as exc:
                logger.warning("tenant profiles: could not reload them (%s: %s); keeping the last", type(exc).__name__,
                               exc)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="tenant-profiles")

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
