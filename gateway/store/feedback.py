"""The ``feedback`` table as ``POST /v1/feedback`` writes it: ownership check and insert."""

from __future__ import annotations

import sqlalchemy as sa

from gateway.store.engine import Store
from gateway.store.tables import Feedback, RequestRow


def request_owned_by(store: Store, request_id: str, key_id: int | None) -> bool:
    """True when the request log holds ``request_id`` made by ``key_id`` (None: an anonymous request)."""
    with store.session() as s:
        q = sa.select(RequestRow.id).where(RequestRow.request_id == request_id)
        q = q.where(RequestRow.key_id.is_(None) if key_id is None else RequestRow.key_id == key_id)
        return s.scalars(q.limit(1)).first() is not None


def add_feedback(store: Store, request_id: str, key_id: int | None, score: float, source: str) -> int:
    """Store one score in [0, 1] for a request; returns the feedback row's id."""
    with store.session() as s:
        row = Feedback(request_id=request_id, key_id=key_id, score=score, source=source)
        s.add(row)
        s.flush()
        return int(row.id)
