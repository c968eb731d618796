"""Graceful overload end to end (issue 14.5): `uniroute serve` (real uvicorn, SQLite request log) with
`server.max_in_flight: 3` → LiteLLM → tests/fake_upstream.py, whose `-held` models answer and whose
`-heldstream` models finish their stream only when the test releases them (no race with a clock on a loaded
machine). With three requests in flight the fourth gets 503 `overloaded` with `Retry-After` at once; probes and
/metrics still answer; once load drops, requests are admitted again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import ServerSpec, free_port, gateway_server, running_all, server_env

LIMIT = 3


@dataclass
class Stack:
    base: str  # the gateway, without /v1
    db_url: str
    upstream: str  # the fake upstream, whose POST /release lets the held requests go on


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("overload")
    up_port, port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"

    def model(name: str, cost: float) -> dict[str, Any]:
        return {"name": name, "router_cost": cost, "input_cost_per_1m": 1.0, "output_cost_per_1m": 2.0,
                "litellm_params": {"model": f"openai/{name}", "api_base": f"{upstream}/v1", "api_key": "t"}}

    db_url = f"sqlite:///{root / 'log.db'}"
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning", "max_in_flight": LIMIT},
        "auth": {"mode": "open"},
        "database_url": db_url,
        "database": {"log_flush_interval_s": 0.1},
        "router": {"policy": "cheapest"},
        "models": [model("b-ok", 1), model("x-held", 10), model("x-heldstream", 10)],
    }))
    fake = ServerSpec(["-m", "uvicorn", "tests.fake_upstream:app", "--host", "127.0.0.1", "--port", str(up_port),
                       "--log-level", "warning"], f"{upstream}/health")
    with running_all(fake, gateway_server(cfg, env=server_env())):
        base = f"http://127.0.0.1:{port}"
        # warm-up: the first call through LiteLLM imports its provider code, which the timings below are not about
        r = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                       json={"model": "b-ok", "messages": [{"role": "user", "content": "warm-up"}]})
        assert r.status_code == 200, r.text
        yield Stack(base, db_url, upstream)


def _metric(base: str, name: str, **labels: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    want = set(labels.items())
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and want <= set(s.labels.items()))


def _rows(db_url: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))
    finally:
        engine.dispose()


def _call(base: str, model: str, tag: str) -> int:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": tag}]}
    if model.endswith("heldstream"):
        body["stream"] = True
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            for _ in r.iter_bytes():
                pass
            return r.status_code
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30).status_code


class Held:
    """Requests the fake upstream holds in flight until :meth:`release`."""

    def __init__(self, stack: Stack, futures: list[Future[int]]) -> None:
        self.stack, self.futures = stack, futures

    def pending(self) -> bool:
        """None of the held requests has been answered yet."""
        return not any(f.done() for f in self.futures)

    def release(self) -> list[int]:
        """Lets the held requests finish; their status codes."""
        httpx.post(f"{self.stack.upstream}/release", timeout=10).raise_for_status()
        return [f.result(timeout=60) for f in self.futures]


@contextmanager
def _fill(stack: Stack, tag: str, models: tuple[str, ...] = ("x-held", "x-heldstream", "x-held")) -> Iterator[Held]:
    """LIMIT held requests in flight (by default two non-streaming, one open stream), from the moment the gateway
    counts them until they are released (at the latest when the block ends, so a failed test leaves none behind)."""
    with ThreadPoolExecutor(LIMIT) as pool:
        held = Held(stack, [pool.submit(_call, stack.base, m, f"{tag}-{i}") for i, m in enumerate(models[:LIMIT])])
        try:
            deadline = time.monotonic() + 15
            while _metric(stack.base, "litellm_in_flight_requests") < LIMIT:
                assert time.monotonic() < deadline, "the held requests never got in flight"
                time.sleep(0.05)
            yield held
        finally:
            httpx.post(f"{stack.upstream}/release", timeout=10)


def test_one_more_than_max_in_flight_gets_503_at_once_and_is_admitted_when_load_drops(stack: Stack) -> None:
    shed_before = _metric(stack.base, "uniroute_requests_shed_total")
    rid = f"shed-{time.time_ns()}"
    with _fill(stack, rid) as held:
        # answered at once, not queued behind the requests ahead of it: those are held until the test releases
        # them (after these checks), so a queued request would get no answer before its read timeout (30 s, far
        # less than the upstream's 60 s hold) and the test would fail there; no wall-clock bound, which a loaded
        # machine running the suite in parallel broke for a correct refusal (10 s at a load average of 10)
        r = httpx.post(f"{stack.base}/v1/chat/completions", headers={"x-uniroute-client-request-id": rid},
                       json={"model": "b-ok", "messages": [{"role": "user", "content": "one too many"}]}, timeout=30)
        assert r.status_code == 503, r.text
        assert held.pending()
        assert r.headers["retry-after"] == "1"
        assert r.headers["x-uniroute-request-id"].startswith("req-") and r.headers["x-uniroute-attempts"] == "0"
        error = r.json()["error"]
        assert error["type"] == "overloaded" and error["code"] == "overloaded"
        assert "server.max_in_flight" in error["message"] and "retry" in error["message"]
        # the official SDK sees a retryable server error, with the gateway's message
        with openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=0) as client, \
                pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="b-ok", messages=[{"role": "user", "content": "sdk"}])
        assert info.value.status_code == 503 and "server.max_in_flight" in info.value.message
        # any API route is shed, the probes and the metrics never
        assert httpx.get(f"{stack.base}/v1/models", timeout=10).status_code == 503
        assert httpx.get(f"{stack.base}/health/liveliness", timeout=30).status_code == 200
        assert httpx.get(f"{stack.base}/health/readiness", timeout=30).status_code == 200
        assert held.pending()  # the probes were answered while every slot was held, not queued behind them
        assert _metric(stack.base, "uniroute_requests_shed_total") == shed_before + 3
        assert held.release() == [200] * LIMIT  # the admitted ones finish normally
    # load dropped: admitted again
    ok = httpx.post(f"{stack.base}/v1/chat/completions", timeout=30,
                    json={"model": "b-ok", "messages": [{"role": "user", "content": "after"}]})
    assert ok.status_code == 200, ok.text
    assert _metric(stack.base, "litellm_in_flight_requests") == 0
    # the shed request has its log row (503, overloaded; nothing was read, so no model and no key)
    deadline = time.monotonic() + 5
    while not (rows := _rows(stack.db_url, "SELECT * FROM requests WHERE client_request_id = :r", r=rid)):
        assert time.monotonic() < deadline, "no log row for the shed request"
        time.sleep(0.1)
    (row,) = rows
    assert row.status_code == 503 and row.error_type == "overloaded" and row.request_id == \
        r.headers["x-uniroute-request-id"]
    assert row.requested_model == "" and row.routed_model is None
    # nothing was a 500: not in the log, not in the metrics
    assert not _rows(stack.db_url, "SELECT request_id FROM requests WHERE status_code >= 500 AND status_code <> 503")
    assert _metric(stack.base, "litellm_proxy_total_requests_metric_total", status_code="500") == 0


def test_streams_hold_their_slot_until_they_end(stack: Stack) -> None:
    """An open stream counts: with LIMIT streams open the next request is shed; after they end it is served."""
    with _fill(stack, f"stream-{time.time_ns()}", ("x-heldstream",) * LIMIT) as held:
        r = httpx.post(f"{stack.base}/v1/chat/completions", timeout=10,
                       json={"model": "b-ok", "messages": [{"role": "user", "content": "while streaming"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert held.release() == [200] * LIMIT
    r = httpx.post(f"{stack.base}/v1/chat/completions", timeout=30,
                   json={"model": "b-ok", "messages": [{"role": "user", "content": "after the streams"}]})
    assert r.status_code == 200


def test_as_many_clients_as_slots_are_never_refused(stack: Stack) -> None:
    """LIMIT clients sending streams back to back on kept-alive connections: a client's next request may arrive
    while the handler of its previous one still finishes (log row, settlement); it must not be refused."""
    def client(i: int) -> list[int]:
        out = []
        with httpx.Client(timeout=30) as c:
            for j in range(15):
                body = {"model": "b-ok", "stream": j % 2 == 0, "messages": [{"role": "user", "content": f"{i}-{j}"}]}
                with c.stream("POST", f"{stack.base}/v1/chat/completions", json=body) as r:
                    for _ in r.iter_bytes():
                        pass
                    out.append(r.status_code)
        return out

    with ThreadPoolExecutor(LIMIT) as pool:
        statuses = [s for f in [pool.submit(client, i) for i in range(LIMIT)] for s in f.result()]
    assert statuses == [200] * (15 * LIMIT)


def test_the_openai_sdk_waits_retry_after_and_retries(stack: Stack) -> None:
    """docs/DEPLOY.md: a refused request is retried by the OpenAI SDK after Retry-After (here: refused again,
    the slots are held until the test releases them)."""
    with _fill(stack, f"sdk-{time.time_ns()}") as held:
        shed_before = _metric(stack.base, "uniroute_requests_shed_total")
        t0 = time.monotonic()
        with openai.OpenAI(base_url=f"{stack.base}/v1", api_key="unused", max_retries=1) as client, \
                pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="b-ok", messages=[{"role": "user", "content": "retry me"}])
        took = time.monotonic() - t0
        assert _metric(stack.base, "uniroute_requests_shed_total") == shed_before + 2  # the SDK tried twice
        # ... waiting Retry-After (1 s) in between: the SDK's own first back-off is at most 0.5 s (no upper bound:
        # a loaded machine may take seconds to answer the two refusals)
        assert took >= 0.9, took
        assert held.release() == [200] * LIMIT
