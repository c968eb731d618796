"""The ``tenant_profiles`` table: each key's labels per model and router, as per-cluster sums (docs/ROUTING_FEATURES.md).

Two sources per (key, router, model): ``labels`` (uploaded) and ``feedback`` (the key's own feedback, rebuilt
by each re-profiling pass with ``profiling.tenant_feedback``); readers get their sums. An upload replaces the
key's whole uploaded label set for the router (idempotent: uploading the same file twice gives
the same overlay). Every replica reads the whole table for its router key (:func:`load_all`, by the poller of
``gateway/serving/tenants.py`` wired in app.py): it is small — K floats per (key, model) with labels.
"""

from __future__ import annotations

from collections.abc import Mapping

import sqlalchemy as sa

from gateway.serving.interfaces import LabelStats
from gateway.store.engine import Store
from gateway.store.tables import TenantProfile, utcnow

LABELS, FEEDBACK = "labels", "feedback"


def _rows(key_id: int, router_version: str, stats: Mapping[str, LabelStats], source: str) -> list[TenantProfile]:
    now = utcnow()
    return [TenantProfile(key_id=key_id, router_version=router_version, model_name=model, errors=list(st.errors),
                          counts=list(st.counts), labels=st.labels, source=source, updated_at=now)
            for model, st in stats.items()]


def replace_labels(store: Store, key_id: int, router_version: str, stats: Mapping[str, LabelStats]) -> int:
    """Make ``stats`` the key's uploaded label set on router ``router_version`` (other models' label rows go);
    returns rows written."""
    with store.session() as s:
        s.execute(sa.delete(TenantProfile).where(TenantProfile.key_id == key_id, TenantProfile.source == LABELS,
                                                 TenantProfile.router_version == router_version))
        s.add_all(_rows(key_id, router_version, stats, LABELS))
    return len(stats)


def replace_feedback(store: Store, router_version: str, stats: Mapping[int, Mapping[str, LabelStats]]) -> int:
    """Make ``stats`` (key id → model → sums of its own feedback) every key's feedback rows on the router."""
    with store.session() as s:
        s.execute(sa.delete(TenantProfile).where(TenantProfile.source == FEEDBACK,
                                                 TenantProfile.router_version == router_version))
        for key_id, by_model in stats.items():
            s.add_all(_rows(key_id, router_version, by_model, FEEDBACK))
    return sum(len(m) for m in stats.values())


def delete_labels(store: Store, key_id: int, router_version: str) -> int:
    """Forget the key's uploaded labels (its feedback rows, rebuilt by each re-profiling pass, stay)."""
    with store.session() as s:
        res = s.execute(sa.delete(TenantProfile).where(TenantProfile.key_id == key_id, TenantProfile.source == LABELS,
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
        for row in s.scalars(q.order_by(TenantProfile.key_id, TenantProfile.model_name, TenantProfile.source)):
            mine = out.setdefault(int(row.key_id), {})
            st = LabelStats(tuple(float(v) for v in row.errors), tuple(float(v) for v in row.counts), int(row.labels))
            prev = mine.get(row.model_name)
            if prev is not None and len(prev.counts) == len(st.counts):  # labels + own feedback: their sums add
                st = LabelStats(tuple(a + b for a, b in zip(prev.errors, st.errors, strict=True)),
                                tuple(a + b for a, b in zip(prev.counts, st.counts, strict=True)),
                                prev.labels + st.labels)
            mine[row.model_name] = st
    return out
