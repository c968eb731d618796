"""The impact report of a model about to be activated (docs/IMPACT.md): routing/impact.py on the store's data.

The pool is every other enabled, routable model with an active profile for the router's artifact (with its
``router_cost``); the traffic mix is the clusters of the ``auto`` requests of the request log within
``profiling.impact_window_s``; the λ are :data:`routing.impact.DEFAULT_IMPACT_GRID`, the router's default λ
and each active key's λ (a ``budget_policy: pace`` key's: the λ its pacer last stored, labelled ``paced``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np

from gateway.config import GatewayConfig
from gateway.store import models as catalog
from gateway.store import profiling as profiling_sql
from gateway.store.engine import Store
from gateway.store.tables import utcnow
from routing.artifact import RouterArtifact
from routing.impact import DEFAULT_IMPACT_GRID, ImpactReport, cluster_traffic, impact_report
from routing.policy import PoolModel

#: how each kind of key λ is labelled in the report
KEY_LABELS = {"default": "key {name}", "paced": "key {name} (paced λ)",
              "paced-unstarted": "key {name} (paced, not stepped yet: its default λ)"}


def key_rows(store: Store) -> list[tuple[str, float]]:
    """(label, λ) of every active key, a paced key at the λ its pacer stored."""
    return [(KEY_LABELS[which].format(name=name), lam) for name, lam, which in profiling_sql.key_lambdas(store)]


def store_pool(config: GatewayConfig, store: Store, art: RouterArtifact, model: str) -> list[PoolModel]:
    """Every other enabled, routable model with an active profile for the artifact and the configured variant."""
    key = catalog.profile_key(art.version, config.router.variant)
    profiles = catalog.active_profiles(store, key)
    specs = {r.name: catalog.spec_from_row(r) for r in catalog.list_models(store) if r.enabled}
    return [PoolModel(name, float(specs[name].router_cost), p.psi) for name, p in sorted(profiles.items())
            if name != model and name in specs and specs[name].routable]


def store_impact(config: GatewayConfig, store: Store, art: RouterArtifact, model: str, psi: np.ndarray,
                 cost: float) -> tuple[ImpactReport, dict[str, Any]]:
    """The report for ``model`` (Ψ ``psi``, router cost ``cost``) joining the stored pool, and what it was
    computed from (the pool's names, costs and Ψ, the candidate's cost, the default λ: the follow-up's inputs)."""
    variant = config.router.variant
    pool = store_pool(config, store, art, model)
    since = utcnow() - timedelta(seconds=config.profiling.impact_window_s)
    clusters = profiling_sql.recent_auto_clusters(store, since)
    traffic = cluster_traffic(clusters, art.k)
    lambdas = [("grid", lam) for lam in DEFAULT_IMPACT_GRID]
    lambdas.append(("default", config.router.default_lambda))
    lambdas += key_rows(store)
    z_val = art.membership(art.val_embeddings, variant)
    report = impact_report(z_val, pool, PoolModel(model, cost, np.asarray(psi, dtype=np.float64)), traffic, lambdas)
    report.traffic_requests = len(clusters)
    inputs = {"pool": [{"name": m.name, "cost": m.cost, "psi": [float(v) for v in np.asarray(m.psi)]}
                       for m in pool],
              "candidate_cost": float(cost), "default_lambda": float(config.router.default_lambda)}
    return report, inputs
