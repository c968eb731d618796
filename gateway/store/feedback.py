"""The ``feedback`` table as ``POST /v1/feedback`` writes it: ownership check and insert (one per request)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from gateway.errors import ConflictError
from gateway.store.engine import Store
from gateway.store.tables import Feedback, RequestRow


def _by_key(q: sa.Select[Any], key_id: int | None) -> sa.Select[Any]:
    return q.where(RequestRow.key_id.is_(None) if key_id is None else RequestRow.key_id == key_id)


def request_owned_by(store: Store, request_id: str, key_id: int | None) -> bool:
    """True when the request log holds ``request_id`` made by ``key_id`` (None: an anonymous request)."""
    with store.session() as s:
        q = _by_key(sa.select(RequestRow.id).where(RequestRow.request_id == request_id), key_id)
        return s.scalars(q.limit(1)).first() is not None


def is_client_request_id(store: Store, client_request_id: str, key_id: int | None) -> bool:
    """True when ``key_id`` sent a request with this client-chosen id (to say which id feedback needs)."""
    with store.session() as s:
        q = _by_key(sa.select(RequestRow.id).where(RequestRow.client_request_id == client_request_id), key_id)
        return s.scalars(q.limit(1)).first() is not None


def add_feedback(store: Store, request_id: str, key_id: int | None, score: float, source: str) -> int:
    """Store one score in [0, 1] for a request; returns the feedback row's id.

    One feedback per request: a second one is refused with 409 (the unique index on
    ``feedback.request_id`` decides, so two racing posts cannot both be stored)."""
    try:
        with store.session() as s:
            row = Feedback(request_id=request_id, key_id=key_id, score=score, source=source)
            s.add(row)
            s.flush()
            return int(row.id)
    except IntegrityError:
        pass
    with store.session() as s:
        first = s.scalar(sa.select(Feedback).where(Feedback.request_id == request_id))
    said = f" (score {first.score:g}, sent {first.created_at:%Y-%m-%dT%H:%M:%SZ})" if first is not None else ""
    raise ConflictError(f"request {request_id!r} already has feedback{said}: one feedback per request; "
                        "the first one stands", param="request_id", code="feedback_exists")
