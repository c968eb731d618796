"""Tenants are isolated (issue #10, rows 5 and 9 of the table, deliverable 3): what one tenant can do to a
model everyone shares, and what it can see of the others.

- A request the provider refuses (a 4xx: 400, 409, 413, 422, ...) or that cannot even be encoded (a field
  nested 1000 deep) is the request's fault: the client gets 400 ``invalid_request_error`` (not 502) and the
  model's cooldown does not count it, so nobody can put a healthy model into cooldown for free.
- With ``auth.mode: keys``, ``/metrics`` (every key name, spend and budget) needs a credential
  (``metrics.auth``): ``$UNIROUTE_METRICS_TOKEN`` or the admin key.
- ``/v1/models``, ``/v1/models/{id}`` and every error that names models (404's "known", 403's "allowed")
  show only the models the caller's key may use.

Real servers on loopback: ``uniroute serve`` (uvicorn) → LiteLLM → tests/fake_upstream.py, reached with httpx
and the official openai SDK.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import parse_config
from tests.procs import free_port, running, server_env
from tests.test_metrics import _value

ADMIN = "sk-admin-" + secrets.token_urlsafe(12)
SCRAPE = "scrape-" + secrets.token_urlsafe(12)


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _models(base: str) -> list[dict[str, Any]]:
    def entry(name: str, upstream: str, cost: float, **kw: Any) -> dict[str, Any]:
        return {"name": name, "router_cost": cost, "input_cost_per_1m": 1.0, "output_cost_per_1m": 1.0,
                "litellm_params": {"model": f"openai/{upstream}", "api_base": base, "api_key": "fake"}, **kw}

    return [entry("good", "good", 1.0), entry("spare", "spare", 2.0), entry("down", "down-500", 3.0, routable=False)]


@dataclass
class Stack:
    base: str
    key: str  # may use every model
    narrow: str  # may use "good" only


@pytest.fixture(scope="module")
def stack(fake_upstream_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("views")
    port = free_port()
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "auth": {"mode": "keys"}, "database_url": f"sqlite:///{root / 'gw.db'}",
        "database": {"spill_dir": str(root / "spill")},
        "router": {"policy": "cheapest"},
        "fallback": {"max_attempts": 3, "cooldown_failures": 3, "cooldown_window_s": 600, "cooldown_s": 600},
        "models": _models(fake_upstream_url),
    }))
    base = f"http://127.0.0.1:{port}"
    with running(["-m", "gateway.cli.main", "serve", "--config", str(cfg)], f"{base}/health/readiness",
                 env=server_env(UNIROUTE_ADMIN_KEY=ADMIN, UNIROUTE_METRICS_TOKEN=SCRAPE)), \
            httpx.Client(base_url=base, headers=_bearer(ADMIN), timeout=30) as admin:
        keys = []
        for body in ({"name": "wide", "lambda": 0.1}, {"name": "narrow", "lambda": 0.1, "models": ["good"]}):
            r = admin.post("/admin/keys", json=body)
            assert r.status_code == 201, r.text
            keys.append(str(r.json()["key"]))
        yield Stack(base, *keys)


def _metrics(stack: Stack) -> str:
    r = httpx.get(f"{stack.base}/metrics", headers=_bearer(SCRAPE), timeout=10)
    assert r.status_code == 200, r.text
    return r.text


# ------------------------------------------------------------------- row 5: request faults and cooldown
_DEEP = '{"a":' * 1000 + "{}" + "}" * 1000
PAYLOADS = {"provider 400": "reject:400 please", "provider 409": "reject:409 please",
            "provider 413": "reject:413 please", "provider 422": "reject:422 please"}


def _body(model: str, stream: bool, kind: str) -> str:
    """The raw JSON body (a 1000-deep field cannot go through json.dumps, so it is spliced in as text)."""
    if kind == "1000-deep field":
        body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": "DEEP"}}]}
        return json.dumps(body).replace('"DEEP"', _DEEP)
    return json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": PAYLOADS[kind]}]})


def test_requests_the_provider_refuses_are_400_and_never_cool_a_healthy_model(stack: Stack) -> None:
    """Issue #10 row 5: three payloads the provider rejects put a healthy model into cooldown (and a 1000-deep
    field gave 502). Here: twenty such requests, named and `auto`, plain and streamed; cooldown after 3."""
    h = {**_bearer(stack.key), "content-type": "application/json"}
    with httpx.Client(base_url=stack.base, timeout=30) as c:
        for kind in [*PAYLOADS, "1000-deep field"]:
            for model in ("good", "auto"):
                for stream in (False, True):
                    r = c.post("/v1/chat/completions", content=_body(model, stream, kind), headers=h)
                    what = f"{kind}, {model}, stream={stream}"
                    assert r.status_code == 400, (what, r.status_code, r.text)
                    assert r.json()["error"]["type"] == "invalid_request_error", (what, r.text)
                    assert r.headers["x-uniroute-attempts"] in ("0", "1"), what  # not retried on another model
    text = _metrics(stack)
    assert _value(text, "uniroute_models_in_cooldown") == 0
    assert _value(text, "uniroute_cooldowns_total", model="good") == 0
    with openai.OpenAI(base_url=stack.base + "/v1", api_key=stack.key, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as info:  # the SDK sees an OpenAI-shaped 400
            client.chat.completions.create(model="good", messages=[{"role": "user", "content": "reject:413"}])
        assert "rejected the request" in info.value.message
        raw = client.chat.completions.with_raw_response.create(model="auto",
                                                               messages=[{"role": "user", "content": "hello"}])
        ext = (raw.parse().model_extra or {})["uniroute"]
        assert [a["model"] for a in ext["attempts"]] == ["good"]  # still first: not cooling
        # the contrast: a model that fails by itself is cooled after three failures, as before
        for _ in range(3):
            with pytest.raises(openai.APIStatusError) as failed:
                client.chat.completions.create(model="down", messages=[{"role": "user", "content": "hi"}])
            assert failed.value.status_code == 502
    assert _value(_metrics(stack), "uniroute_cooldowns_total", model="down") == 1


# ------------------------------------------------------- row 9: the models a key sees, in lists and errors
def test_a_restricted_key_sees_only_its_models(stack: Stack) -> None:
    with openai.OpenAI(base_url=stack.base + "/v1", api_key=stack.narrow, max_retries=0) as narrow:
        assert [m.id for m in narrow.models.list()] == ["auto", "good"]
        assert narrow.models.retrieve("good").id == "good"
        for name in ("spare", "nope"):  # another tenant's model looks like no model at all
            with pytest.raises(openai.NotFoundError) as info:
                narrow.models.retrieve(name)
            assert "known: auto, good" in info.value.message and "spare" not in info.value.message.replace(
                f"'{name}'", "")
        with pytest.raises(openai.NotFoundError) as nf:
            narrow.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        assert "known: auto, good" in nf.value.message and "spare" not in nf.value.message
        assert "down" not in nf.value.message
        with pytest.raises(openai.PermissionDeniedError) as denied:
            narrow.chat.completions.create(model="spare", messages=[{"role": "user", "content": "hi"}])
        assert denied.value.message.endswith("allowed: auto, good") and "down" not in denied.value.message
        assert narrow.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}]).model == "good"
    with openai.OpenAI(base_url=stack.base + "/v1", api_key=stack.key, max_retries=0) as wide:
        assert [m.id for m in wide.models.list()] == ["auto", "down", "good", "spare"]
    for path in ("/v1/models", "/v1/models/good"):  # keys mode: the list is the caller's, so it needs a caller
        r = httpx.get(stack.base + path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


# ---------------------------------------------------------------- row 9: /metrics needs a credential
def test_metrics_need_a_credential_in_keys_mode(stack: Stack) -> None:
    with httpx.Client(base_url=stack.base, timeout=10) as c:
        assert c.post("/v1/chat/completions", headers=_bearer(stack.narrow),
                      json={"model": "good", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        for headers in ({}, _bearer(stack.narrow), _bearer(stack.key), _bearer("not-it"), {"authorization": "Basic x"}):
            for method in ("GET", "HEAD"):
                r = c.request(method, "/metrics", headers=headers)
                assert r.status_code == 401, (headers, method, r.status_code)
                assert "narrow" not in r.text and "litellm_" not in r.text
        for token in (SCRAPE, ADMIN):
            r = c.get("/metrics", headers=_bearer(token))
            assert r.status_code == 200
            assert _value(r.text, "litellm_proxy_total_requests_metric_total", api_key_alias="narrow") >= 1


@pytest.mark.parametrize(("mode", "setting", "env", "sent", "status"), [
    ("keys", "auto", {}, None, 403),  # a credential is needed and none is configured: says how to enable it
    ("keys", "auto", {"UNIROUTE_METRICS_TOKEN": SCRAPE}, None, 401),
    ("keys", "auto", {"UNIROUTE_METRICS_TOKEN": SCRAPE}, SCRAPE, 200),
    ("keys", "auto", {"UNIROUTE_ADMIN_KEY": ADMIN}, ADMIN, 200),
    ("keys", "token", {"UNIROUTE_ADMIN_KEY": ADMIN}, SCRAPE, 401),
    ("keys", "none", {}, None, 200),  # the operator chose an open /metrics
    ("open", "auto", {}, None, 200),  # an open gateway has no key names to hide
    ("open", "token", {"UNIROUTE_METRICS_TOKEN": SCRAPE}, None, 401),
    ("open", "token", {"UNIROUTE_METRICS_TOKEN": SCRAPE}, SCRAPE, 200),
], ids=lambda v: {SCRAPE: "scrape-token", ADMIN: "admin-key"}.get(v) if isinstance(v, str) else None)
# (the ids name the credential, not its random value: parallel workers must collect the same test ids)
def test_metrics_auth_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, setting: str,
                               env: dict[str, str], sent: str | None, status: int) -> None:
    for var in ("UNIROUTE_METRICS_TOKEN", "UNIROUTE_ADMIN_KEY"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    cfg = parse_config({"auth": {"mode": mode}, "metrics": {"auth": setting},
                        "database_url": f"sqlite:///{tmp_path / 'm.db'}", "models": _models("http://127.0.0.1:9/v1")},
                       base_dir=tmp_path)
    with TestClient(create_app(cfg)) as client:
        r = client.get("/metrics", headers=_bearer(sent) if sent else {})
        assert r.status_code == status, r.text
        if status == 403:
            assert r.json()["error"]["code"] == "metrics_disabled" and "UNIROUTE_METRICS_TOKEN" in r.text
        elif status == 401:
            assert r.json()["error"]["type"] == "authentication_error"


def test_metrics_auth_is_a_checked_setting() -> None:
    from gateway.config import ConfigError

    with pytest.raises(ConfigError, match=r"metrics\.auth"):
        parse_config({"metrics": {"auth": "admin-ish"}})
