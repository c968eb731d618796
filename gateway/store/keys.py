"""The ``api_keys`` table: insert, look up, list and revoke keys.

Every SQL statement on keys outside the budget columns lives here (the budget statements are in
:mod:`gateway.store.budget`). The rules (key format, hashing, λ ranges, what a valid key is) are
:mod:`gateway.access.auth`'s; this module stores what it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from gateway.errors import ConflictError, NotFoundError
from gateway.store.engine import Store
from gateway.store.tables import ApiKey, KeyPacing, utcnow


def insert_key(
    store: Store,
    *,
    name: str,
    key_hash: str,
    key_prefix: str,
    default_lambda: float,
    lambda_min: float,
    lambda_max: float,
    budget_usd: float | None,
    budget_period: str,
    period_start: datetime,
    rpm_limit: int | None,
    allowed_models: Sequence[str] | None,
    created_at: datetime,
    trusted: bool = False,
    budget_policy: str = "block",
) -> ApiKey:
    """Add a key row; 409 when the name is taken (names stay taken after revocation)."""
    row = ApiKey(
        name=name, key_hash=key_hash, key_prefix=key_prefix, default_lambda=default_lambda,
        lambda_min=lambda_min, lambda_max=lambda_max, budget_usd=budget_usd, budget_period=budget_period,
        period_start=period_start, spend_usd=0.0, reserved_usd=0.0, total_spend_usd=0.0,
        rpm_limit=rpm_limit, allowed_models=list(allowed_models) if allowed_models is not None else None,
        created_at=created_at, trusted=trusted, budget_policy=budget_policy,
    )
    try:
        with store.session() as s:
            s.add(row)
    except IntegrityError:
        raise ConflictError(f"a key named {name!r} already exists (names stay taken after revocation); "
                            "pick another name",
                            param="name") from None
    return row


def key_by_hash(store: Store, key_hash: str) -> ApiKey | None:
    """The key whose SHA-256 is ``key_hash`` (revoked or not), or None."""
    with store.sessions() as s:
        return s.scalar(sa.select(ApiKey).where(ApiKey.key_hash == key_hash))


def list_keys(store: Store, *, include_revoked: bool = True) -> list[ApiKey]:
    with store.sessions() as s:
        q = sa.select(ApiKey).order_by(ApiKey.id)
        if not include_revoked:
            q = q.where(ApiKey.revoked_at.is_(None))
        return list(s.scalars(q))


def get_key(store: Store, name: str) -> ApiKey:
    with store.sessions() as s:
        row = s.scalar(sa.select(ApiKey).where(ApiKey.name == name))
    if row is None:
        raise NotFoundError(f"no API key named {name!r}", param="name")
    return row


def set_trusted(store: Store, name: str, trusted: bool) -> ApiKey:
    """Mark a key trusted or not (its feedback counts with ``profiling.feedback_from: trusted``)."""
    with store.session() as s:
        row = s.scalar(sa.select(ApiKey).where(ApiKey.name == name).with_for_update())
        if row is None:
            raise NotFoundError(f"no API key named {name!r}", param="name")
        row.trusted = trusted
    return row


def set_budget_policy(store: Store, name: str, policy: str) -> ApiKey:
    """Set a key's ``budget_policy``; its pacing state (``key_pacing``) is forgotten, so a new pace starts."""
    with store.session() as s:
        row = s.scalar(sa.select(ApiKey).where(ApiKey.name == name).with_for_update())
        if row is None:
            raise NotFoundError(f"no API key named {name!r}", param="name")
        row.budget_policy = policy
        s.execute(sa.delete(KeyPacing).where(KeyPacing.key_id == row.id))
    return row


def revoke_key(store: Store, name: str) -> ApiKey:
    """Mark a key revoked (idempotent: revoking twice keeps the first time)."""
    with store.session() as s:
        row = s.scalar(sa.select(ApiKey).where(ApiKey.name == name).with_for_update())
        if row is None:
            raise NotFoundError(f"no API key named {name!r}", param="name")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
    return row
