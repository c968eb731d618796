"""POST /v1/feedback: only the key that made the request may rate it; bad input is a 400."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.access.accounting import Accounting, AccountingSettings
from gateway.access.auth import create_key
from gateway.errors import GatewayError
from gateway.http import feedback
from gateway.http.responses import gateway_error
from gateway.http.state import GatewayState
from gateway.serving.interfaces import RequestRecord
from gateway.store.tables import Feedback


async def _client(tmp_path: Path, mode: Literal["open", "keys"]) -> tuple[httpx.AsyncClient, Accounting]:
    acc = Accounting(AccountingSettings(database_url=f"sqlite:///{tmp_path / 'f.db'}", auth_mode=mode))
    await acc.start(["m"])
    app = Starlette(routes=[Route("/v1/feedback", feedback.feedback_endpoint, methods=["POST"])],
                    exception_handlers={GatewayError: gateway_error})  # handlers raise; as app.py registers
    app.state.gateway = GatewayState(accounting=acc)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"), acc


def _record(request_id: str, key_id: int | None) -> RequestRecord:
    return RequestRecord(request_id=request_id, started_at=datetime.now(UTC), requested_model="auto", stream=False,
                         key_id=key_id, routed_model="m", cluster=0, status_code=200)


@pytest.fixture
async def keyed(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Accounting, str, str]]:
    client, acc = await _client(tmp_path, "keys")
    alice, arow = create_key(acc.store, "alice", default_lambda=0.1)
    bob, _ = create_key(acc.store, "bob", default_lambda=0.1)
    acc.writer.submit(_record("req-alice", arow.id))  # still in the writer's buffer: the endpoint flushes
    yield client, acc, alice, bob
    await client.aclose()
    await acc.aclose()


async def test_owner_only(keyed: tuple[httpx.AsyncClient, Accounting, str, str]) -> None:
    client, acc, alice, bob = keyed
    r = await client.post("/v1/feedback", json={"request_id": "req-alice", "thumbs": "up"},
                          headers={"authorization": f"Bearer {alice}"})
    assert r.status_code == 201, r.text
    assert r.json()["score"] == 1.0
    r = await client.post("/v1/feedback", json={"request_id": "req-alice", "score": 0.0},
                          headers={"authorization": f"Bearer {bob}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
    r = await client.post("/v1/feedback", json={"request_id": "nope", "score": 0.5},
                          headers={"authorization": f"Bearer {alice}"})
    assert r.status_code == 404
    r = await client.post("/v1/feedback", json={"request_id": "req-alice", "score": 0.5})
    assert r.status_code == 401
    with acc.store.session() as s:
        assert [f.score for f in s.scalars(sa.select(Feedback))] == [1.0]


@pytest.mark.parametrize(("body", "needle"), [
    ({"request_id": "req-alice", "score": 1.5}, "score"),
    ({"request_id": "req-alice"}, "exactly one of 'score'"),
    ({"request_id": "req-alice", "score": 1, "thumbs": "up"}, "exactly one of 'score'"),
    ({"request_id": "req-alice", "thumbs": "sideways"}, "thumbs"),
    ({"score": 1}, "request_id"),
    ({"request_id": "req-alice", "score": 1, "source": "bad source!"}, "source"),
    ("{not json", "not valid JSON"),
])
async def test_bad_input_is_400(keyed: tuple[httpx.AsyncClient, Accounting, str, str], body: object,
                                needle: str) -> None:
    client, _, alice, _ = keyed
    kw: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
    r = await client.post("/v1/feedback", headers={"authorization": f"Bearer {alice}"}, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle in err["message"]


async def test_open_mode_anonymous(tmp_path: Path) -> None:
    client, acc = await _client(tmp_path, "open")
    try:
        acc.writer.submit(_record("anon-req", None))
        r = await client.post("/v1/feedback", json={"request_id": "anon-req", "thumbs": "down", "source": "ui"})
        assert r.status_code == 201 and r.json()["score"] == 0.0 and r.json()["source"] == "ui"
    finally:
        await client.aclose()
        await acc.aclose()
