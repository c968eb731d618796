"""Tenants are isolated (issue #10, rows 4 and 9 of the table, deliverable 3): feedback.

Tried as a hostile key would: one request's feedback sent 20 times (also 20 at once), a client-chosen
request id reused by 10 requests and then used for feedback, another key's request id, a flood of thumbs
down from one key against the cluster's most accurate model. The promises (docs/security/tenants.md):

- one feedback per request: a repeat is 409 and the first stands (a unique index, on SQLite and
  PostgreSQL; migration 0005 keeps the first of rows already repeated);
- the id feedback addresses is the gateway's own (``x-uniroute-request-id``, unique); a client's id is
  echoed as ``x-uniroute-client-request-id`` and is never a feedback target;
- one key moves a cluster's Ψ by at most ``profiling.max_key_share`` in a re-profiling pass, and routing
  for every other tenant stays as it was; with ``profiling.feedback_from: trusted`` only trusted keys count.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from storeutil import database

from gateway.store.engine import Store
from gateway.store.tables import ApiKey, Feedback

DBS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
ADMIN = "sk-admin-" + secrets.token_urlsafe(12)


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# ---------------------------------------------------------------- migration 0005 on existing duplicates
@pytest.mark.parametrize("kind", DBS)
def test_migration_keeps_the_first_of_repeated_feedback(kind: str, tmp_path: Path) -> None:
    with database(kind, tmp_path) as url:
        store = Store(url)
        try:
            store.upgrade("0003")
            now = datetime.now(UTC)
            with store.engine.begin() as conn:
                conn.execute(sa.text(
                    "INSERT INTO api_keys (id, name, key_hash, key_prefix, default_lambda, lambda_min, lambda_max, "
                    "budget_period, period_start, spend_usd, reserved_usd, total_spend_usd, created_at) VALUES "
                    "(1, 'old', :h, 'sk-ur-old', 0.1, 0, 10, 'month', :t, 0, 0, 0, :t)"), {"h": "0" * 64, "t": now})
                rows = [("req-x", 0.0), ("req-x", 1.0), ("req-y", 0.5), ("req-x", 1.0), ("req-z", 1.0), ("req-y", 0.0)]
                for i, (rid, score) in enumerate(rows, start=1):
                    conn.execute(sa.text("INSERT INTO feedback (id, request_id, key_id, score, source, created_at) "
                                         "VALUES (:i, :r, 1, :s, 'user', :t)"), {"i": i, "r": rid, "s": score, "t": now})
            store.upgrade()
            assert store.current_revision() == Store.head_revision()
            with store.sessions() as s:
                kept = [(f.id, f.request_id, f.score) for f in s.scalars(sa.select(Feedback).order_by(Feedback.id))]
                key = s.scalar(sa.select(ApiKey))
            assert kept == [(1, "req-x", 0.0), (3, "req-y", 0.5), (5, "req-z", 1.0)]  # the first of each
            assert key is not None and key.trusted is False  # existing keys are not trusted
            with pytest.raises(sa.exc.IntegrityError), store.session() as s:
                s.add(Feedback(request_id="req-x", key_id=1, score=1.0))
            assert "client_request_id" in {c["name"] for c in sa.inspect(store.engine).get_columns("requests")}
            store.downgrade("0003")
            store.upgrade()
        finally:
            store.dispose()
