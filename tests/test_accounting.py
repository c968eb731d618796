"""The gateway with its store-backed accounting: keys, λ ranges, budgets, rate limits, request log,
/v1/usage, /admin/keys, /metrics and readiness, in process (SQLite and PostgreSQL) and as real servers
(uvicorn --workers 2 in multiprocess mode, scraped by a real Prometheus)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import load_config
from gateway.store.engine import Store
from gateway.store.models import params_for_table, spec_from_row
from gateway.store.tables import ModelRow, RequestRow
from tests.gateway_setup import make_dataset, replay_args, write_config
from tests.procs import free_port, replay_upstream, running, server_env
from tests.storeutil import REDIS_URL, database, require_redis
from tests.test_metrics import _value, prometheus_server, promql, wait_promql

ADMIN = "sk-admin-" + secrets.token_urlsafe(16)
SCRAPE = "scrape-" + secrets.token_urlsafe(16)  # UNIROUTE_METRICS_TOKEN of the servers below


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    dataset = make_dataset(tmp_path_factory.mktemp("acc"))
    with replay_upstream(dataset, *replay_args()) as base:
        yield dataset, base


def _config(root: Path, upstream: tuple[Path, str], **overrides: Any) -> Path:
    dataset, base = upstream
    path = write_config(root, dataset, base)
    data = yaml.safe_load(path.read_text())
    data.update(overrides)
    data["models"].append({"name": "secret-model", "router_cost": 50, "routable": False,
                           "litellm_params": {"model": "openai/x", "api_base": base, "api_key": "os.environ/UR_TEST_KEY",
                                              "aws_secret_access_key": "literal-secret"}})
    path.write_text(yaml.safe_dump(data))
    return path


def _chat(model: str = "small-general", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **kw}


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def keyed(request: pytest.FixtureRequest, tmp_path: Path, upstream: tuple[Path, str],
          monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, str]]:
    require_redis()
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("UR_TEST_KEY", "resolved-secret-value")
    with database(request.param, tmp_path) as url:
        cfg = load_config(_config(tmp_path, upstream, auth={"mode": "keys"}, database_url=url, redis_url=REDIS_URL,
                                  rate_limit={"redis_prefix": f"uniroute:test:{secrets.token_hex(4)}:"}))
        with TestClient(create_app(cfg), raise_server_exceptions=False) as client:
            yield client, url


def test_keys_budgets_limits_log_usage_metrics(keyed: tuple[TestClient, str]) -> None:
    client, url = keyed
    # -- admin creates keys; a missing or wrong key is refused OpenAI-style -------------------------
    def create(**body: Any) -> str:
        r = client.post("/admin/keys", headers=_bearer(ADMIN), json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    alice = create(name="alice", **{"lambda": 0.2}, lambda_max=1.0, budget_usd=1.0, rpm=100)
    slow = create(name="slow", **{"lambda": 0.1}, rpm=2)
    r = client.post("/v1/chat/completions", json=_chat())
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = client.post("/v1/chat/completions", json=_chat(), headers=_bearer("sk-ur-not-a-key"))
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"

    # -- a served request: cost settled into the budget, logged, counted -----------------------------
    costs = []
    for model in ("small-general", "auto", "large-general"):
        r = client.post("/v1/chat/completions", json=_chat(model), headers=_bearer(alice))
        assert r.status_code == 200, r.text
        costs.append(float(r.headers["x-uniroute-cost"]))
    r = client.post("/v1/chat/completions", json=_chat(), headers={**_bearer(alice), "x-uniroute-lambda": "5"})
    assert r.status_code == 400 and "[0.0, 1.0]" in r.json()["error"]["message"]

    # -- budget: an estimate that cannot fit is refused before forwarding -----------------------------
    r = client.post("/v1/chat/completions", json=_chat(max_tokens=50_000_000), headers=_bearer(alice))
    body = r.json()["error"]
    assert r.status_code == 429 and body["type"] == "budget_exceeded" and "'alice'" in body["message"]
    assert "$1.0000" in body["message"] and "monthly" in body["message"]

    # -- rate limit (Redis): the third request within a minute gets 429 + Retry-After ---------------
    for _ in range(2):
        assert client.post("/v1/chat/completions", json=_chat(), headers=_bearer(slow)).status_code == 200
    r = client.post("/v1/chat/completions", json=_chat(), headers=_bearer(slow))
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 60

    # -- usage: exact spend from the budget columns, request counts from the log -----------------------
    deadline = time.monotonic() + 10
    while True:
        u = client.get("/v1/usage", headers=_bearer(alice)).json()
        if u["period_requests"]["requests"] >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert u["budget"]["spent_usd"] == pytest.approx(sum(costs))
    assert u["budget"]["remaining_usd"] == pytest.approx(1.0 - sum(costs)) and u["budget"]["reserved_usd"] == 0
    assert u["period_requests"]["requests"] == 5  # 3 served, 1 bad λ, 1 over budget

    # -- the request log holds every request of a key, with routing and cost -------------------------
    store = Store(url)
    with store.sessions() as s:
        rows = list(s.scalars(sa.select(RequestRow).where(RequestRow.key_name == "alice")
                              .order_by(RequestRow.started_at)))
        seeded = {m.name: m for m in s.scalars(sa.select(ModelRow))}
    store.dispose()
    assert [r.status_code for r in rows] == [200, 200, 200, 400, 429]
    assert [r.requested_model for r in rows[:3]] == ["small-general", "auto", "large-general"]
    assert rows[1].candidates and rows[1].lam == 0.2 and rows[1].routed_model == "small-general"
    assert [r.cost_usd for r in rows[:3]] == pytest.approx(costs) and rows[4].error_type == "budget_exceeded"
    assert all(r.prompt_text is None for r in rows)  # database.store_prompts is off
    # the models table is seeded from the config, env references kept and literal secrets never stored
    assert spec_from_row(seeded["secret-model"]).litellm_params["api_key"] == "os.environ/UR_TEST_KEY"
    assert "literal-secret" not in str(spec_from_row(seeded["secret-model"]).litellm_params)
    assert {"small-general", "large-general", "bad-500"} <= set(seeded)

    # -- metrics: they name every key, so in keys mode they need a credential (here the admin key) -----
    for headers in ({}, _bearer(alice), _bearer("sk-ur-not-a-key")):
        r = client.get("/metrics", headers=headers)
        assert r.status_code == 401 and "alice" not in r.text, r.text
    text = client.get("/metrics", headers=_bearer(ADMIN)).text
    assert _value(text, "litellm_proxy_total_requests_metric_total", api_key_alias="alice") == 5
    assert _value(text, "litellm_proxy_total_requests_metric_total", api_key_alias="slow", status_code="429") == 1
    assert _value(text, "litellm_spend_metric_total", api_key_alias="alice") == pytest.approx(sum(costs))
    assert _value(text, "litellm_remaining_api_key_budget_metric", api_key_alias="alice") == pytest.approx(
        1.0 - sum(costs))
    assert _value(text, "uniroute_routing_decisions_total") == 1
    assert _value(text, "uniroute_fallbacks_total", from_model="bad-500", to_model="small-general") == 1
    assert _value(text, "litellm_in_flight_requests") == 0
    assert alice not in text and alice[10:] not in text and "hello there" not in text

    # -- readiness checks the database; revocation is refused at once --------------------------------
    assert client.get("/health/readiness").status_code == 200
    assert client.delete("/admin/keys/alice", headers=_bearer(ADMIN)).status_code == 200
    r = client.post("/v1/chat/completions", json=_chat(), headers=_bearer(alice))
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    assert client.get("/admin/keys", headers=_bearer(slow)).status_code == 403


def test_open_mode_logs_anonymous_and_readiness_fails_without_database(
        tmp_path: Path, upstream: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UR_TEST_KEY", "x")
    db = tmp_path / "open.db"
    cfg = load_config(_config(tmp_path, upstream, database_url=f"sqlite:///{db}",
                              database={"store_prompts": True}))
    with TestClient(create_app(cfg), raise_server_exceptions=False) as client:
        assert client.post("/v1/chat/completions", json=_chat()).status_code == 200
        u = client.get("/v1/usage").json()
        assert u["key"] is None and "open gateway" in u["note"]
        assert client.get("/admin/keys", headers=_bearer("anything")).status_code in (401, 403)
    store = Store(f"sqlite:///{db}")
    with store.sessions() as s:
        row = s.scalar(sa.select(RequestRow))
    store.dispose()
    assert row is not None and row.key_name == "anonymous" and row.key_id is None
    assert row.prompt_text == "hello there"  # store_prompts: true
    bad = load_config(_config(tmp_path, upstream, database_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
                              database={"auto_migrate": False, "log_close_timeout_s": 0.5}))
    with TestClient(create_app(bad), raise_server_exceptions=False) as client:
        r = client.get("/health/readiness")
        assert r.status_code == 503 and "database: database unreachable" in r.json()["error"]["message"]
        # requests are still served while the database is down (the log waits in memory)
        assert client.post("/v1/chat/completions", json=_chat()).status_code == 200
    # shut down with the database still down: the row is spilled to disk, not lost
    spilled = list((tmp_path / "var" / "request-log-spill").glob("requests-*.jsonl"))
    assert len(spilled) == 1 and "hello there" not in spilled[0].read_text()  # store_prompts is off here


def test_params_for_table() -> None:
    assert params_for_table({"model": "m", "api_key": "os.environ/K", "api_base": "http://x",
                             "aws_secret_access_key": "abc", "vertex_credentials": "{...}"}) == {
        "model": "m", "api_key": "os.environ/K", "api_base": "http://x",
        "aws_secret_access_key": "<redacted: write it as os.environ/NAME to keep a reference>",
        "vertex_credentials": "<redacted: write it as os.environ/NAME to keep a reference>",
    }


# ------------------------------------------------------------------ real servers: workers and Prometheus
@pytest.fixture(scope="module")
def two_workers(upstream: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The gateway under `uvicorn --workers 2` in Prometheus multiprocess mode (the documented recipe), its
    /metrics behind the scrape token (metrics.auth: token, $UNIROUTE_METRICS_TOKEN)."""
    root = tmp_path_factory.mktemp("mp")
    prom_dir = root / "prom"
    prom_dir.mkdir()
    cfg = _config(root, upstream, database_url=f"sqlite:///{root / 'gw.db'}", metrics={"auth": "token"})
    port = free_port()
    env = server_env(UNIROUTE_CONFIG=str(cfg), PROMETHEUS_MULTIPROC_DIR=str(prom_dir), UR_TEST_KEY="x",
                     UNIROUTE_METRICS_TOKEN=SCRAPE)
    with running(["-m", "uvicorn", "--factory", "gateway.app:app_from_env", "--host", "127.0.0.1", "--port",
                  str(port), "--workers", "2", "--log-level", "info", "--no-access-log"],
                 f"http://127.0.0.1:{port}/health/readiness", env=env, log=root / "gateway.log"):
        yield f"http://127.0.0.1:{port}", prom_dir


def _send(base: str, n: int) -> None:
    for i in range(n):
        with httpx.Client(timeout=30) as c:  # a fresh connection each time spreads requests over workers
            r = c.post(f"{base}/v1/chat/completions", json=_chat("auto" if i % 2 else "large-general"))
            assert r.status_code == 200, r.text


def test_multiprocess_metrics_with_two_uvicorn_workers(two_workers: tuple[str, Path]) -> None:
    base, prom_dir = two_workers
    sent = 0
    while sent < 200:
        _send(base, 10)
        sent += 10
        pids = {p.stem.rsplit("_", 1)[-1] for p in prom_dir.glob("counter_*.db")}
        if len(pids) >= 2:
            break
    assert len(pids) == 2, f"all {sent} requests went to one worker"
    for _ in range(6):  # whichever worker answers, /metrics counts both workers' requests
        with httpx.Client(headers={"authorization": f"Bearer {SCRAPE}"}) as c:
            text = c.get(f"{base}/metrics").text
        assert _value(text, "litellm_proxy_total_requests_metric_total") == sent
        assert _value(text, "litellm_proxy_total_requests_metric_total", model="large-general") == sent // 2
        assert _value(text, "litellm_request_total_latency_metric_count") == sent
        assert _value(text, "litellm_in_flight_requests") == 0
        assert _value(text, "uniroute_registry_models", state="enabled") == 6


def _liveliness(base: str) -> str:
    try:
        return f"liveliness {httpx.get(f'{base}/health/liveliness', timeout=5).status_code}"
    except httpx.HTTPError as exc:
        return f"liveliness failed: {exc!r}"


def test_real_prometheus_scrapes_the_gateway(two_workers: tuple[str, Path], tmp_path: Path) -> None:
    base, prom_dir = two_workers
    with httpx.Client() as c:
        assert c.get(f"{base}/metrics").status_code == 401  # no token, no metrics
        before = _value(c.get(f"{base}/metrics", headers=_bearer(SCRAPE)).text, "litellm_proxy_total_requests_metric_total")
    with prometheus_server([base.removeprefix("http://")], tmp_path, bearer_token=SCRAPE) as prom:
        _send(base, 12)
        total = before + 12
        q = 'sum(litellm_proxy_total_requests_metric_total{job="uniroute", status_code="200"})'
        try:
            assert wait_promql(prom, q, total) == total
        except pytest.fail.Exception as exc:  # seen once in CI (Prometheus refused for 60 s): say what the gateway did
            log = prom_dir.parent / "gateway.log"
            pytest.fail(f"{exc}\nthe gateway now: {_liveliness(base)}; its log (uvicorn's supervisor at info):\n"
                        + log.read_text(errors="replace")[-4000:])
        assert promql(prom, 'sum(litellm_requests_metric_total{requested_model="auto"})') is not None
        assert promql(prom, 'count(litellm_request_total_latency_metric_bucket{model="large-general"}) > 0')


@pytest.fixture(scope="module")
def slow_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    dataset = make_dataset(tmp_path_factory.mktemp("slow"))
    with replay_upstream(dataset, "--latency-ms", "*=300") as base:
        yield dataset, base


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def test_50_concurrent_chat_requests_never_overspend(kind: str, tmp_path: Path,
                                                            slow_upstream: tuple[Path, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """50 chat requests at once through the gateway against one budget: the cap holds end to end."""
    import asyncio

    from gateway.access.auth import create_key

    monkeypatch.setenv("UR_TEST_KEY", "x")
    with database(kind, tmp_path) as url:
        cfg = load_config(_config(tmp_path, slow_upstream, auth={"mode": "keys"}, database_url=url))
        store = Store(url)
        store.upgrade()
        raw, row = create_key(store, "burst", default_lambda=0.1, budget_usd=0.001)
        app = create_app(cfg)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=60) as c:
                # max_tokens makes the estimate ~1e-4 USD: about ten fit the 1e-3 budget at once
                rs = await asyncio.gather(*(
                    c.post("/v1/chat/completions", json=_chat(max_tokens=1000), headers=_bearer(raw))
                    for _ in range(50)))
        ok = [r for r in rs if r.status_code == 200]
        refused = [r for r in rs if r.status_code != 200]
        assert ok and refused, [r.status_code for r in rs]
        assert len(ok) <= 10  # at most budget / estimate held at once (300 ms upstream: no settle in between)
        assert all(r.status_code == 429 and r.json()["error"]["type"] == "budget_exceeded" for r in refused)
        with store.sessions() as s:
            from gateway.store.tables import ApiKey

            key = s.get(ApiKey, row.id)
        store.dispose()
        assert key is not None
        assert key.reserved_usd == pytest.approx(0.0, abs=1e-12)
        assert key.spend_usd == pytest.approx(sum(float(r.headers["x-uniroute-cost"]) for r in ok))
        assert key.spend_usd <= 0.001  # actual costs are below the estimates here, so no overspend at all
