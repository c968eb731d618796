"""OpenTelemetry traces (issue 12, item 6) received by a small OTLP/HTTP receiver started by the test.

The gateway (in process, ``telemetry.otlp_endpoint`` set) serves a chat completion and a streamed Anthropic
message through ``auto`` (the cheapest-first policy tries ``bad-500``, then falls back) from the replay
upstream. The receiver decodes what it gets (``ExportTraceServiceRequest`` protobuf): one request span per
request with the GenAI attributes and the UniRoute facts, the routing span and one span per upstream
attempt under it, all in one trace. Without ``otlp_endpoint`` nothing is exported.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import load_config
from tests.gateway_setup import make_dataset, replay_args, write_config
from tests.procs import replay_upstream

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest


@contextlib.contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[bytes]]]:
    """An OTLP/HTTP receiver on loopback: yields its traces URL and the request bodies it got."""
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers.get("content-length", 0))))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", bodies
    finally:
        server.shutdown()
        server.server_close()


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind)


def spans(bodies: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for body in bodies:
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            service = {a.key: _value(a.value) for a in rs.resource.attributes}.get("service.name")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append({"name": s.name, "trace": s.trace_id.hex(), "id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(), "service": service, "status": s.status.code,
                                "attrs": {a.key: _value(a.value) for a in s.attributes}})
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("otel"))


def _app(dataset: Path, base: str, telemetry: dict[str, Any] | None) -> Any:
    cfg = write_config(dataset.parent, dataset, base)
    data = yaml.safe_load(cfg.read_text())
    if telemetry is not None:
        data["telemetry"] = telemetry
    cfg.write_text(yaml.safe_dump(data))

    async def store_ok() -> None:
        return None

    return create_app(load_config(cfg), readiness_checks={"store": store_ok})


def test_a_span_per_request_with_routing_and_attempts(dataset: Path) -> None:
    with replay_upstream(dataset, *replay_args()) as base, otlp_receiver() as (url, bodies):
        app = _app(dataset, base, {"otlp_endpoint": url, "service_name": "uniroute-test", "schedule_delay_ms": 50})
        with TestClient(app) as client:
            r = client.post("/v1/chat/completions",
                            json={"model": "auto", "messages": [{"role": "user", "content": "hello"}]})
            assert r.status_code == 200, r.text
            chat_id = r.headers["x-uniroute-request-id"]
            with client.stream("POST", "/v1/messages", json={
                    "model": "auto", "max_tokens": 50, "stream": True,
                    "messages": [{"role": "user", "content": "hi"}]}) as s:
                assert s.status_code == 200
                messages_id = s.headers["x-uniroute-request-id"]
                list(s.iter_lines())
        # the lifespan's end flushed the batch
    got = spans(bodies)
    assert got and {s["service"] for s in got} == {"uniroute-test"}
    by_id = {s["id"]: s for s in got}
    for rid, endpoint in ((chat_id, "chat"), (messages_id, "messages")):
        (request,) = [s for s in got if s["attrs"].get("uniroute.request_id") == rid]
        a = request["attrs"]
        assert request["name"] == f"uniroute.request {endpoint}" and request["parent"] == ""
        assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "auto"
        assert a["gen_ai.response.model"] == "small-general"
        assert a["gen_ai.usage.input_tokens"] > 0 and a["gen_ai.usage.output_tokens"] > 0
        assert a["uniroute.lambda"] == pytest.approx(0.1) and a["uniroute.cost_usd"] > 0
        assert a["uniroute.candidates"][:2] == ["bad-500", "small-general"] and a["uniroute.attempts"] == 2
        assert a["http.response.status_code"] == 200
        children = [s for s in got if s["parent"] == request["id"]]
        names = [s["name"] for s in children]
        assert "uniroute.route" in names and "chat bad-500" in names and "chat small-general" in names, names
        assert all(s["trace"] == request["trace"] for s in children)
        failed = next(s for s in children if s["name"] == "chat bad-500")
        assert failed["status"] == 2 and failed["attrs"]["error.type"]  # STATUS_CODE_ERROR
        assert failed["attrs"]["gen_ai.request.model"] == "openai/bad-500"
        route = next(s for s in children if s["name"] == "uniroute.route")
        assert route["attrs"]["uniroute.candidates"][0] == "bad-500"
        assert any(s["name"] == "uniroute.rank" and by_id[s["parent"]] is route for s in got)


def test_no_endpoint_no_export(dataset: Path) -> None:
    with (replay_upstream(dataset, *replay_args()) as base, otlp_receiver() as (_, bodies),
          TestClient(_app(dataset, base, None)) as client):
        r = client.post("/v1/chat/completions",
                        json={"model": "small-general", "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200
        assert client.app.state.gateway.chat_service().tracing.enabled is False  # type: ignore[attr-defined]
    assert bodies == []


def test_uniroute_routing_spans_and_every_endpoint(tmp_path: Path) -> None:
    """With the UniRoute router (a fitted K-means artifact): the routing span has ``uniroute.embed`` and
    ``uniroute.rank`` under it and the request span carries the prompt's cluster; ``/v1/responses`` and
    ``/v1/embeddings`` get their request spans too, the latter with an ``embeddings <model>`` attempt span."""
    from tests import routing_features as rf

    data, art = rf.fit(tmp_path / "fit")
    with replay_upstream(data) as replay, otlp_receiver() as (url, bodies):
        cfg = rf.write_config(tmp_path / "config.yaml", data, art, replay, f"sqlite:///{tmp_path / 'gw.db'}", 0,
                              auth={"mode": "open"},
                              telemetry={"otlp_endpoint": url, "service_name": "uniroute-test",
                                         "schedule_delay_ms": 50})
        raw = yaml.safe_load(cfg.read_text())
        raw["models"].append({"name": "embed-small", "kind": "embedding", "router_cost": 1, "input_cost_per_1m": 1.0,
                              "litellm_params": {"model": "openai/embed-small", "api_base": replay,
                                                 "api_key": "replay"}})
        cfg.write_text(yaml.safe_dump(raw))
        with TestClient(create_app(load_config(cfg))) as client:
            r = client.post("/v1/responses", json={"model": "auto", "input": "What is 2 + 2?"})
            assert r.status_code == 200, r.text
            responses_id, cluster = r.headers["x-uniroute-request-id"], r.json()["uniroute"]["cluster"]
            r = client.post("/v1/embeddings", json={"model": "embed-small", "input": ["alpha", "beta"]})
            assert r.status_code == 200, r.text
            embeddings_id = r.headers["x-uniroute-request-id"]
    got = spans(bodies)
    by_id = {s["id"]: s for s in got}
    (request,) = [s for s in got if s["attrs"].get("uniroute.request_id") == responses_id]
    assert request["name"] == "uniroute.request responses" and request["parent"] == ""
    assert isinstance(cluster, int) and request["attrs"]["uniroute.cluster"] == cluster
    assert request["attrs"]["gen_ai.request.model"] == "auto" and request["attrs"]["uniroute.candidates"]
    (route,) = [s for s in got if s["name"] == "uniroute.route" and s["parent"] == request["id"]]
    assert route["attrs"]["uniroute.cluster"] == cluster
    under_route = {s["name"] for s in got if s["parent"] == route["id"]}
    assert {"uniroute.embed", "uniroute.rank"} <= under_route, under_route
    served = request["attrs"]["gen_ai.response.model"]
    assert any(s["name"] == f"chat {served}" and by_id.get(s["parent"]) is request for s in got)
    (emb,) = [s for s in got if s["attrs"].get("uniroute.request_id") == embeddings_id]
    assert emb["name"] == "uniroute.request embeddings"
    assert emb["attrs"]["gen_ai.operation.name"] == "embeddings"
    assert emb["attrs"]["gen_ai.response.model"] == "embed-small" and emb["attrs"]["gen_ai.usage.input_tokens"] > 0
    attempts = [s for s in got if s["parent"] == emb["id"]]
    assert [s["name"] for s in attempts] == ["embeddings embed-small"], attempts
