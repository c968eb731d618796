"""The budget pacer's statements: a paced key's budget with its ``key_pacing`` row, and the compare-and-set write.

The controller is :mod:`gateway.pacing` (pure); the policy around these statements (when to step, the
period arithmetic, the λ cache) is :mod:`gateway.access.pacing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from gateway.store.engine import Store
from gateway.store.tables import ApiKey, KeyPacing


@dataclass(frozen=True)
class PacedKey:
    """What the pacer reads of a key: its λ range, budget and spend (as the budget columns stand)."""

    budget_policy: str
    default_lambda: float
    lambda_min: float
    lambda_max: float
    budget_usd: float | None
    budget_period: str
    period_start: datetime  # the period ``spend_usd`` belongs to (it may have ended: nothing rolled it over yet)
    spend_usd: float
    reserved_usd: float


@dataclass(frozen=True)
class PaceRow:
    """A ``key_pacing`` row."""

    lam: float
    integral: float
    exposure: float
    period_start: datetime
    updated_at: datetime
    version: int


def read(store: Store, key_id: int) -> tuple[PacedKey, PaceRow | None] | None:
    """The key's budget and its pacing state (None: no such key; a None row: never paced)."""
    stmt = (sa.select(ApiKey.budget_policy, ApiKey.default_lambda, ApiKey.lambda_min, ApiKey.lambda_max,
                      ApiKey.budget_usd, ApiKey.budget_period, ApiKey.period_start, ApiKey.spend_usd,
                      ApiKey.reserved_usd, KeyPacing.lam, KeyPacing.integral, KeyPacing.exposure,
                      KeyPacing.period_start.label("pace_period_start"), KeyPacing.updated_at, KeyPacing.version)
            .outerjoin(KeyPacing, KeyPacing.key_id == ApiKey.id)
            .where(ApiKey.id == key_id))
    with store.engine.connect() as conn:
        r = conn.execute(stmt).first()
    if r is None:
        return None
    key = PacedKey(budget_policy=r.budget_policy, default_lambda=r.default_lambda, lambda_min=r.lambda_min,
                   lambda_max=r.lambda_max, budget_usd=r.budget_usd, budget_period=r.budget_period,
                   period_start=r.period_start, spend_usd=r.spend_usd, reserved_usd=r.reserved_usd)
    if r.version is None:
        return key, None
    return key, PaceRow(lam=r.lam, integral=r.integral, exposure=r.exposure, period_start=r.pace_period_start,
                        updated_at=r.updated_at, version=r.version)


def write(store: Store, key_id: int, *, lam: float, integral: float, exposure: float, period_start: datetime,
          updated_at: datetime, expected_version: int | None) -> int | None:
    """Store a new state if nobody wrote since ``expected_version`` was read (None: there was no row).

    Returns the new version, or None when another replica wrote first (its state wins; read it again)."""
    values = {"lam": lam, "integral": integral, "exposure": exposure, "period_start": period_start,
              "updated_at": updated_at}
    try:
        with store.engine.begin() as conn:
            if expected_version is None:
                conn.execute(sa.insert(KeyPacing).values(key_id=key_id, version=1, **values))
                return 1
            done = conn.execute(sa.update(KeyPacing)
                                .where(KeyPacing.key_id == key_id, KeyPacing.version == expected_version)
                                .values(version=expected_version + 1, **values)
                                .execution_options(synchronize_session=False))
            return expected_version + 1 if done.rowcount == 1 else None
    except IntegrityError:  # another replica inserted the first row
        return None

