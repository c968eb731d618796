"""The impact report of a model about to be activated (docs/IMPACT.md): routing/impact.py on the store's data.

The pool is every other enabled, routable model with an active profile for the router's artifact (with its
``router_cost``); the traffic mix is the clusters of the ``auto`` requests of the request log within
``profiling.impact_window_s``; the λ are :data:`routing.impact.DEFAULT_IMPACT_GRID`, the router's default λ
and each active key's λ.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np

from gateway.config import GatewayConfig
from gateway.store import models as catalog
from gateway.store import profiling as profiling_sql
from gateway.store.engine import Store
from gateway.store.tables import utcnow
from routing.artifact import RouterArtifact
from routing.impact import DEFAULT_IMPACT_GRID, ImpactReport, cluster_traffic, impact_report
from routing.policy import PoolModel


def store_impact(config: GatewayConfig, store: Store, art: RouterArtifact, model: str, psi: np.ndarray,
                 cost: float) -> ImpactReport:
    """The report for ``model`` (Ψ ``psi``, router cost ``cost``) joining the stored pool."""
    variant = config.router.variant
    key = catalog.profile_key(art.version, variant)
    profiles = catalog.active_profiles(store, key)
    specs = {r.name: catalog.spec_from_row(r) for r in catalog.list_models(store) if r.enabled}
    pool = [PoolModel(name, float(specs[name].router_cost), p.psi) for name, p in profiles.items()
            if name != model and name in specs and specs[name].routable]
    since = utcnow() - timedelta(seconds=config.profiling.impact_window_s)
    clusters = profiling_sql.recent_auto_clusters(store, since)
    traffic = cluster_traffic(clusters, art.k)
    lambdas = [("grid", lam) for lam in DEFAULT_IMPACT_GRID]
    lambdas.append(("default", config.router.default_lambda))
    lambdas += [(f"key {name}", lam) for name, lam in profiling_sql.key_lambdas(store)]
    z_val = art.membership(art.val_embeddings, variant)
    report = impact_report(z_val, pool, PoolModel(model, cost, np.asarray(psi, dtype=np.float64)), traffic, lambdas)
    report.traffic_requests = len(clusters)
    return report
