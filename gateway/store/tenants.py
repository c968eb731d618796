"""The ``tenant_profiles`` table: each key's labels per model and router, as per-cluster sums (docs/ROUTING_FEATURES.md).

An upload replaces the key's whole label set for the router (idempotent: uploading the same file twice gives
the same overlay). Every replica reads the whole table for its router key (:func:`load_all`, by the poller of
``gateway/serving/tenants.py`` wired in app.py): it is small — K floats per (key, model) with labels.
"""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa

from gateway.serving.interfaces import LabelStats
from gateway.store.engine import Store
from gateway.store.tables import TenantProfile, utcnow


def replace_labels(store: Store, key_id: int, router_version: str, stats: Mapping[str, LabelStats],
                   source: str = "labels") -> int:
    """Make ``stats`` the key's label set on router ``router_version`` (other models' rows go); returns rows written."""
    now = utcnow()
    with store.session() as s:
        s.execute(sa.delete(TenantProfile).where(TenantProfile.key_id == key_id,
                                                 TenantProfile.router_version == router_version))
        for model, st in stats.items():
            s.add(TenantProfile(key_id=key_id, router_version=router_version, model_name=model,
                                errors=list(st.errors), counts=list(st.counts), labels=st.labels, source=source,
                                updated_at=now))
    return len(stats)


def delete_labels(store: Store, key_id: int, router_version: str) -> int:
    with store.session() as s:
        res = s.execute(sa.delete(TenantProfile).where(TenantProfile.key_id == key_id,
                                                       TenantProfile.router_version == router_version))
        return int(getattr(res, "rowcount", 0) or 0)


def labels_of(store: Store, key_id: int, router_version: str) -> dict[str, LabelStats]:
    """One key's label set on router ``router_version`` (``{}`` without one)."""
    return _load(store, router_version, key_id).get(key_id, {})


def load_all(store: Store, router_version: str) -> dict[int, dict[str, LabelStats]]:
    """``{key id: {model: LabelStats}}`` of every key with labels on router ``router_version``."""
    return _load(store, router_version, None)


def _load(store: Store, router_version: str, key_id: int | None) -> dict[int, dict[str, LabelStats]]:
    q = sa.select(TenantProfile).where(TenantProfile.router_version == router_version)
    if key_id is not None:
        q = q.where(TenantProfile.key_id == key_id)
    out: dict[int, dict[str, LabelStats]] = {}
    with store.session() as s:
        for row in s.scalars(q.order_by(TenantProfile.key_id, TenantProfile.model_name)):
            out.setdefault(int(row.key_id), {})[row.model_name] = LabelStats(
                tuple(float(v) for v in row.errors), tuple(float(v) for v in row.counts), int(row.labels))
    return out
