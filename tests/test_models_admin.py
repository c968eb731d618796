"""The /admin/models API on the full app: CRUD, errors, and changes reaching a second replica without restart."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import parse_config

ADMIN = "sk-admin-models-test"
H = {"authorization": f"Bearer {ADMIN}"}


def _config(tmp_path: Path) -> Any:
    return parse_config({
        "auth": {"mode": "open"},
        "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
        "registry": {"poll_interval_s": 0.2},
        "admin": {"env_allowlist": ["NEW_KEY_FOR_TEST"]},
        "models": [{"name": "seeded", "router_cost": 1.0,
                    "litellm_params": {"model": "openai/seeded", "api_base": "http://127.0.0.1:9/v1",
                                       "api_key": "x"}}],
    }, base_dir=tmp_path)


def _wait_models(client: TestClient, pred: Any, timeout_s: float = 5.0) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        names = {m["id"] for m in client.get("/v1/models").json()["data"]}
        if pred(names) or time.monotonic() > deadline:
            return names
        time.sleep(0.05)


def test_admin_models_across_replicas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    cfg = _config(tmp_path)
    with TestClient(create_app(cfg)) as a, TestClient(create_app(cfg)) as b:
        assert a.get("/admin/models").status_code == 401
        listed = a.get("/admin/models", headers=H).json()["data"]
        assert [m["name"] for m in listed] == ["seeded"] and listed[0]["source"] == "config"
        body = {"name": "new", "router_cost": 3.0, "input_cost_per_1m": 0.5,
                "litellm_params": {"model": "openai/new", "api_key": "os.environ/NEW_KEY_FOR_TEST"}}
        monkeypatch.setenv("NEW_KEY_FOR_TEST", "sk-x")
        r = a.post("/admin/models", headers=H, json=body)
        assert r.status_code == 201 and r.json()["litellm_params"]["api_key"] == "os.environ/NEW_KEY_FOR_TEST"
        assert a.post("/admin/models", headers=H, json=body).status_code == 409
        # the other replica sees it without a restart
        assert "new" in _wait_models(b, lambda n: "new" in n)
        r = b.patch("/admin/models/new", headers=H, json={"router_cost": 4.0})
        assert r.status_code == 200 and r.json()["router_cost"] == 4.0 and r.json()["version"] == 2
        r = b.patch("/admin/models/new", headers=H, json={"router_cost": -1})
        assert r.status_code == 400 and "router_cost" in r.json()["error"]["message"]
        r = b.patch("/admin/models/new", headers=H, json={"colour": "red"})
        assert r.status_code == 400 and "colour" in r.json()["error"]["message"]
        r = a.post("/admin/models", headers=H, content=b"{nope")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        assert a.post("/admin/models/new/disable", headers=H).json()["enabled"] is False
        assert "new" not in _wait_models(b, lambda n: "new" not in n)
        r = a.get("/admin/models/ghost", headers=H)
        assert r.status_code == 404 and "unknown model 'ghost'; known: new, seeded" in r.json()["error"]["message"]
        assert a.delete("/admin/models/new", headers=H).json()["deleted"] is True
        assert a.delete("/admin/models/new", headers=H).status_code == 404
        # profiling and re-profiling need the UniRoute router
        r = a.post("/admin/models/seeded/profile", headers=H, json={})
        assert r.status_code == 400 and "router.policy: uniroute" in r.json()["error"]["message"]
        assert a.post("/admin/models/ghost/profile", headers=H, json={}).status_code == 404
        assert a.post("/admin/models/seeded/profile", headers=H, json={"concurrency": 0}).status_code == 400
        assert a.get("/admin/models/seeded/profile", headers=H).status_code == 404
        assert a.post("/admin/reprofile", headers=H).status_code == 400
        assert a.get("/admin/reprofile/last", headers=H).status_code == 404
        assert a.get("/admin/models/seeded/profile").status_code == 401


def test_stored_params_beyond_64_bit_integers_are_answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """litellm_params are free-form (config.yaml, the CLI): an integer orjson cannot encode is still shown."""
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    cfg = parse_config({"auth": {"mode": "open"}, "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
                        "models": [{"name": "big", "router_cost": 1.0,
                                    "litellm_params": {"model": "openai/big", "seed": 2**70 + 1}}]},
                       base_dir=tmp_path)
    with TestClient(create_app(cfg)) as client:
        r = client.get("/admin/models/big", headers=H)
        assert r.status_code == 200 and r.json()["litellm_params"]["seed"] == 2**70 + 1
