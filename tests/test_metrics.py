"""Prometheus metrics: names and labels, multiprocess mode under uvicorn --workers 2, a real Prometheus."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics, metrics_app
from gateway.serving.interfaces import RequestRecord
from tests.procs import popen
from tests.storeutil import REPO_ROOT, free_port, require


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in _samples(text).items() if n == name and want <= ls)


def _record(**kw: object) -> RequestRecord:
    now = datetime.now(UTC)
    base: dict[str, Any] = dict(request_id="r", started_at=now, finished_at=now, requested_model="auto",
                                   stream=False, routed_model="small", key_name="alice", status_code=200,
                                   prompt_tokens=100, completion_tokens=20, cost_usd=0.5, latency_ms=250.0,
                                   upstream_latency_ms=200.0, cluster=4,
                                   candidates=[{"model": "small", "objective": 0.2}])
    base.update(kw)
    return RequestRecord(**base)


def test_observe_request_names_and_labels() -> None:
    m = Metrics()
    m.set_registry(["small", "large"], routable=["small"])
    m.observe_request(_record())
    m.observe_request(_record(routed_model="large", status_code=200, ttft_ms=50.0, stream=True,
                              attempts=[{"model": "small", "status": 502}, {"model": "large", "status": 200}]))
    m.observe_request(_record(requested_model="gpt-made-up", routed_model=None, status_code=404,
                              error_type="invalid_request_error", prompt_tokens=None, completion_tokens=None,
                              cost_usd=None, upstream_latency_ms=None, candidates=[]))
    m.set_key_budget("alice", 10.0, 7.5)
    text = m.render().decode()
    req = "litellm_proxy_total_requests_metric_total"
    assert _value(text, req) == 3
    assert _value(text, req, requested_model="auto", model="small", status_code="200", status_class="2xx",
                  api_key_alias="alice") == 1
    assert _value(text, req, requested_model="other", model="none", status_code="404") == 1  # unbounded → other
    assert _value(text, "litellm_proxy_failed_requests_metric_total", exception_class="invalid_request_error") == 1
    assert _value(text, "litellm_requests_metric_total") == 2
    assert _value(text, "litellm_input_tokens_metric_total", model="small") == 100
    assert _value(text, "litellm_output_tokens_metric_total") == 40
    assert _value(text, "litellm_total_tokens_metric_total") == 240
    assert _value(text, "litellm_spend_metric_total", api_key_alias="alice") == pytest.approx(1.0)
    assert _value(text, "litellm_request_total_latency_metric_count") == 3
    assert _value(text, "litellm_request_total_latency_metric_sum") == pytest.approx(0.75)
    assert _value(text, "litellm_llm_api_latency_metric_count") == 2
    assert _value(text, "litellm_overhead_latency_metric_sum") == pytest.approx(0.1)
    assert _value(text, "litellm_llm_api_time_to_first_token_metric_count", model="large") == 1
    assert _value(text, "uniroute_routing_decisions_total", model="small", cluster="4") == 2
    assert _value(text, "uniroute_fallbacks_total", from_model="small", to_model="large") == 1
    assert _value(text, "litellm_deployment_successful_fallbacks_total", fallback_model="large") == 1
    assert _value(text, "litellm_remaining_api_key_budget_metric", api_key_alias="alice") == 7.5
    assert _value(text, "litellm_api_key_max_budget_metric", api_key_alias="alice") == 10.0
    assert _value(text, "uniroute_registry_models", state="enabled") == 2
    assert _value(text, "uniroute_registry_models", state="routable") == 1
    assert "gpt-made-up" not in text


def test_no_secret_or_prompt_in_labels() -> None:
    m = Metrics()
    m.set_registry(["small"])
    m.observe_request(_record(prompt_text="my secret prompt", key_name="alice"))
    text = m.render().decode()
    assert "secret prompt" not in text and "sk-ur-" not in text


async def test_metrics_app() -> None:
    m = Metrics()
    m.observe_request(_record())
    transport = httpx.ASGITransport(app=metrics_app(m))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert "litellm_proxy_total_requests_metric_total" in r.text
        r = await c.post("/metrics")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# ------------------------------------------------------------------------------- subprocess servers
def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1) as client:  # one client: httpx.get() costs ~30 ms of CPU per call
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
            try:
                if client.get(url).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout} s")


@pytest.fixture
def demo_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    workers = getattr(request, "param", 1)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    if workers > 1:
        mp = tmp_path / "prom-mp"
        mp.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(mp)
    proc = popen(  # forked by the zygote, except with workers > 1 (PROMETHEUS_MULTIPROC_DIR: tests/zygote.py)
        ["-m", "uvicorn", "--app-dir", str(REPO_ROOT / "tests"), "--factory", "metricsdemo:create_app", "--host",
         "127.0.0.1", "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
        env=env, cwd=tmp_path,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/metrics", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("demo_server", [2], indirect=True)
def test_multiprocess_uvicorn_two_workers(demo_server: str) -> None:
    pids: set[str] = set()
    sent = 0
    while len(pids) < 2 and sent < 400:  # fresh connections until both workers have served some
        for _ in range(20):
            with httpx.Client() as c:
                pids.add(c.post(f"{demo_server}/hit").text)
            sent += 1
    assert len(pids) == 2, f"all {sent} requests went to one worker"
    for _ in range(6):  # whichever worker answers /metrics reports every worker's requests
        with httpx.Client() as c:
            text = c.get(f"{demo_server}/metrics").text
        assert _value(text, "litellm_proxy_total_requests_metric_total") == sent
        assert _value(text, "litellm_spend_metric_total") == pytest.approx(0.002 * sent)
        assert _value(text, "litellm_request_total_latency_metric_count") == sent
        assert _value(text, "litellm_in_flight_requests") == 0


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    require("the `prometheus` binary (Debian package prometheus)", found is not None)
    assert found is not None
    return found


@contextlib.contextmanager
def prometheus_server(targets: list[str], tmp_path: Path, *, bearer_token: str | None = None) -> Iterator[str]:
    """A real Prometheus on a loopback port, scraping ``targets`` (host:port) every 2 s; with ``bearer_token``
    it sends ``Authorization: Bearer <token>`` read from a credentials file, as deploy/prometheus.yml does."""
    binary = prometheus_binary()
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    auth = ""
    if bearer_token is not None:
        (tmp_path / "uniroute-metrics-token").write_text(bearer_token)
        auth = "    authorization:\n      type: Bearer\n      credentials_file: uniroute-metrics-token\n"
    cfg.write_text(
        "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n  evaluation_interval: 2s\n"
        "scrape_configs:\n  - job_name: uniroute\n    metrics_path: /metrics\n" + auth
        + f"    static_configs:\n      - targets: {targets!r}\n".replace("'", '"')
    )
    proc = subprocess.Popen(
        [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/-/ready", proc, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def promql(prom: str, query: str) -> float | None:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": query}, timeout=5)
    r.raise_for_status()
    data = r.json()["data"]["result"]
    return float(data[0]["value"][1]) if data else None


def wait_promql(prom: str, query: str, expected: float, timeout: float = 60) -> float | None:
    """Poll ``query`` until it returns ``expected``; on timeout fail with the scrape targets' state."""
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = promql(prom, query)
        if got == expected:
            return got
        time.sleep(0.5)
    targets = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    state = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in targets]
    pytest.fail(f"{query} = {got}, expected {expected} after {timeout} s; targets: {state}")


def test_real_prometheus_scrapes_and_promql_counts(demo_server: str, tmp_path: Path) -> None:
    target = demo_server.removeprefix("http://")
    with prometheus_server([target], tmp_path) as prom:
        with httpx.Client() as c:
            for i in range(17):
                c.post(f"{demo_server}/hit", params={"model": "large" if i % 3 == 0 else "small"})
            c.post(f"{demo_server}/hit", params={"status": "502"})
        q = 'sum(litellm_proxy_total_requests_metric_total{job="uniroute"})'
        assert wait_promql(prom, q, 18) == 18
        assert promql(prom, 'sum(litellm_proxy_total_requests_metric_total{model="large"})') == 6
        assert promql(prom, 'sum(litellm_proxy_failed_requests_metric_total{exception_status="502"})') == 1
        assert promql(prom, 'up{job="uniroute"}') == 1


def test_dashboard_queries_parse_and_use_only_our_metrics(tmp_path: Path) -> None:
    """Every PromQL expression of deploy/grafana-dashboard.json parses, and names only metrics we export."""
    import json
    import re

    dash = json.loads((REPO_ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    m = Metrics()
    exported = {s.name for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples}
    exported |= {fam.name for fam in m.registry.collect()}
    m.observe_request(_record(ttft_ms=1.0, attempts=[{"model": "a"}, {"model": "b"}]))
    m.observe_request(_record(status_code=500, error_type="upstream_error"))
    m.set_key_budget("k", 1, 1)
    m.set_registry(["small"])
    m.request_log_dropped.inc(0)
    exported |= {s.name for fam in m.registry.collect() for s in fam.samples}
    used = {n for e in exprs for n in re.findall(r"\b((?:litellm|uniroute)_[a-z_]+)", e)}
    assert used <= exported, f"dashboard uses metrics we do not export: {sorted(used - exported)}"
    assert {"uniroute_key_lambda", "uniroute_profile_drift"} <= used  # the paced λ and drift panels (issue 13)
    promtool = shutil.which("promtool")
    require("promtool (Debian package prometheus)", promtool is not None)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": e.replace("$__rate_interval", "5m").replace("$__range", "1h")
         .replace("$job", ".*")} for i, e in enumerate(exprs)]}]}
    (tmp_path / "rules.yml").write_text(json.dumps(rules))
    out = subprocess.run([str(promtool), "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    # the shipped config scrapes with a bearer token read from a file beside it (git-ignored: the operator
    # writes it); promtool checks that the file exists, so check a copy with a token file next to it
    shipped = (REPO_ROOT / "deploy" / "prometheus.yml").read_text()
    auth = yaml.safe_load(shipped)["scrape_configs"][0]["authorization"]
    assert auth["type"] == "Bearer" and auth["credentials_file"] == "uniroute-metrics-token"
    (tmp_path / "prometheus.yml").write_text(shipped)
    shutil.copy(REPO_ROOT / "deploy" / "alerts.yml", tmp_path / "alerts.yml")  # its rule_files
    (tmp_path / "uniroute-metrics-token").write_text("a-scrape-token")
    out = subprocess.run([str(promtool), "check", "config", str(tmp_path / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prepare_multiprocess_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.metrics import MULTIPROC_ENV, prepare_multiprocess_dir

    monkeypatch.setenv(MULTIPROC_ENV, "placeholder")  # recorded, so the variable set below is undone after
    monkeypatch.delenv(MULTIPROC_ENV)
    assert prepare_multiprocess_dir(1) is None and MULTIPROC_ENV not in os.environ
    created = prepare_multiprocess_dir(2, base=tmp_path)
    assert created is not None and os.environ[MULTIPROC_ENV] == created and Path(created).is_dir()
    stale = Path(created) / "counter_123.db"
    stale.write_bytes(b"x")
    assert prepare_multiprocess_dir(2) is None  # set already: kept, but emptied of a previous run's samples
    assert not stale.exists()
