"""/v1/usage and the /admin/keys API over HTTP, with the store-backed Accounting."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.access.accounting import Accounting, AccountingSettings
from gateway.errors import GatewayError
from gateway.http import keys as admin
from gateway.http.responses import gateway_error
from gateway.http.state import GatewayState

ADMIN = "sk-admin-test-0123456789"


@pytest.fixture
async def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    acc = Accounting(AccountingSettings(database_url=f"sqlite:///{tmp_path / 'u.db'}", auth_mode="keys"))
    await acc.start(["small", "large"])
    app = Starlette(routes=[
        Route("/v1/usage", admin.usage, methods=["GET"]),
        Route("/admin/keys", admin.list_keys_endpoint, methods=["GET"]),
        Route("/admin/keys", admin.create_key_endpoint, methods=["POST"]),
        Route("/admin/keys/{name}", admin.get_key_endpoint, methods=["GET"]),
        Route("/admin/keys/{name}", admin.revoke_key_endpoint, methods=["DELETE"]),
    ], exception_handlers={GatewayError: gateway_error})  # handlers raise; app.py registers the same handler
    app.state.gateway = GatewayState(accounting=acc)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c
    await acc.aclose()


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_admin_key_lifecycle_and_usage(client: httpx.AsyncClient) -> None:
    r = await client.post("/admin/keys", headers=_auth(ADMIN),
                          json={"name": "alice", "lambda": 0.2, "budget_usd": 3.0, "period": "day", "rpm": 5,
                                "models": ["small"]})
    assert r.status_code == 201, r.text
    created = r.json()
    raw = created["key"]
    assert raw.startswith("sk-ur-") and created["prefix"] == raw[:10] and r.headers["cache-control"] == "no-store"
    r = await client.get("/admin/keys", headers=_auth(ADMIN))
    assert [k["name"] for k in r.json()["data"]] == ["alice"] and raw not in r.text
    r = await client.get("/v1/usage", headers=_auth(raw))
    assert r.status_code == 200
    u = r.json()
    assert u["key"]["name"] == "alice" and u["budget"]["limit_usd"] == 3.0 and u["budget"]["remaining_usd"] == 3.0
    assert u["budget"]["period"] == "day" and u["rpm_limit"] == 5 and u["models"] == ["small"]
    r = await client.get("/admin/keys", headers=_auth(raw))  # a client key on the admin API
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_denied"
    r = await client.delete("/admin/keys/alice", headers=_auth(ADMIN))
    assert r.status_code == 200 and r.json()["revoked_at"]
    r = await client.get("/v1/usage", headers=_auth(raw))
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"name": "b", "lambda": 5, "lambda_max": 1}, 400, "need lambda_min <= lambda <= lambda_max"),
        ({"name": "b", "lambda": 0.1, "period": "week"}, 400, "unknown budget period 'week'; valid: day, month"),
        ({"name": "b"}, 400, "lambda: Field required"),
        ({"name": "b", "lambda": 0.1, "colour": "red"}, 400, "colour: Extra inputs are not permitted"),
        ({"name": "b", "lambda": 20}, 400, "lambda must lie in [0, 10], the λ range the config allows"),
        ({"name": "b", "lambda": 1, "lambda_max": 11}, 400, "lambda_max must lie in [0, 10]"),
        ("not json", 400, "not valid JSON"),
    ],
)
async def test_admin_create_rejects_bad_input(client: httpx.AsyncClient, body: object, status: int,
                                              needle: str) -> None:
    kw: dict[str, Any] = {"content": body} if isinstance(body, str) else {"json": body}
    r = await client.post("/admin/keys", headers=_auth(ADMIN), **kw)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text


async def test_admin_auth_errors(client: httpx.AsyncClient) -> None:
    r = await client.get("/admin/keys")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = await client.get("/admin/keys", headers=_auth("sk-ur-wrong"))
    assert r.status_code == 401
    r = await client.get("/admin/keys/nobody", headers=_auth(ADMIN))
    assert r.status_code == 404 and "no API key named 'nobody'" in r.json()["error"]["message"]
    await client.post("/admin/keys", headers=_auth(ADMIN), json={"name": "dup", "lambda": 0.1})
    r = await client.post("/admin/keys", headers=_auth(ADMIN), json={"name": "dup", "lambda": 0.1})
    assert r.status_code == 409
    r = await client.get("/v1/usage")
    assert r.status_code == 401
