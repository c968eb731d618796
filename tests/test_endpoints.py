"""HTTP behaviour of the gateway app (in process), forwarding to a real replay upstream on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import load_config
from routing.dataset import load_dataset
from tests.gateway_setup import make_dataset, replay_args, write_config
from tests.procs import replay_upstream

LIMIT = 4096


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ep"))


@pytest.fixture(scope="module")
def client(dataset: Path) -> Iterator[TestClient]:
    async def store_ok() -> None:
        return None

    with replay_upstream(dataset, *replay_args()) as base:
        cfg = load_config(write_config(dataset.parent, dataset, base, max_body_bytes=LIMIT))
        app = create_app(cfg, readiness_checks={"store": store_ok})
        with TestClient(app, raise_server_exceptions=False) as c:
            yield c


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "small-general", "messages": [{"role": "user", "content": "hello"}], **kw}


def test_named_model_json(client: TestClient, dataset: Path) -> None:
    ds = load_dataset(dataset)
    j = ds.models.index("large-general")
    r = client.post("/v1/chat/completions", json=chat(model="large-general",
                                                      messages=[{"role": "user", "content": ds.prompts[0]}]),
                    headers={"x-uniroute-request-id": "my-id-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "large-general"
    assert body["choices"][0]["message"]["content"] == f"The answer is ({ds.responses[0][j]})."
    assert r.headers["x-uniroute-model"] == "large-general"
    # the client's id is echoed apart; the request id is the gateway's own (what feedback addresses)
    assert r.headers["x-uniroute-client-request-id"] == "my-id-1" == body["uniroute"]["client_request_id"]
    assert r.headers["x-uniroute-request-id"] == body["uniroute"]["request_id"]
    assert body["uniroute"]["request_id"].startswith("req-") and body["uniroute"]["request_id"] != "my-id-1"
    assert float(r.headers["x-uniroute-cost"]) == pytest.approx(body["uniroute"]["cost_usd"]) and body["uniroute"]["cost_usd"] > 0
    assert body["usage"]["prompt_tokens"] > 0


def test_auto_falls_back_past_failing_cheapest(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=chat(model="auto"))
    assert r.status_code == 200, r.text
    ext = r.json()["uniroute"]
    assert r.headers["x-uniroute-model"] == "small-general" == ext["model"] == r.json()["model"]
    assert [a["model"] for a in ext["attempts"]] == ["bad-500", "small-general"]
    assert r.headers["x-uniroute-attempts"] == "2"
    assert r.headers["x-uniroute-request-id"].startswith("req-")


def test_stream_sse(client: TestClient) -> None:
    with client.stream("POST", "/v1/chat/completions",
                       json=chat(stream=True, stream_options={"include_usage": True})) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-uniroute-model"] == "small-general" and r.headers["x-uniroute-attempts"] == "1"
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "small-general" for c in chunks)
    assert chunks[-1]["usage"]["total_tokens"] > 0 and chunks[-1]["uniroute"]["cost_usd"] > 0
    assert "NO RECORDING" in "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]).upper()


def test_lambda_header_and_body(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=chat(model="auto"), headers={"x-uniroute-lambda": "0.5"})
    assert r.json()["uniroute"]["lambda"] == 0.5
    r = client.post("/v1/chat/completions", json=chat(model="auto", uniroute={"lambda": 3}))
    assert r.status_code == 400 and "[0.0, 2.0]" in r.json()["error"]["message"]


def test_models(client: TestClient) -> None:
    r = client.get("/v1/models")
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[0] == "auto" and {"small-general", "large-general", "bad-500", "bad-429", "bad-timeout"} <= set(ids)
    assert client.get("/v1/models/small-general").json()["id"] == "small-general"
    assert client.get("/v1/models/auto").json()["object"] == "model"
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_health_and_openapi(client: TestClient) -> None:
    assert client.get("/health/liveliness").json() == {"status": "ok"}
    r = client.get("/health/readiness")
    assert r.status_code == 200 and r.json()["router"] == "cheapest"
    assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]


def test_readiness_fails_when_a_check_fails(client: TestClient) -> None:
    async def store_down() -> None:
        raise ConnectionError("database unreachable")

    checks = client.app.state.gateway.readiness_checks  # type: ignore[attr-defined]
    checks["store"], saved = store_down, checks["store"]
    try:
        r = client.get("/health/readiness")
    finally:
        checks["store"] = saved
    assert r.status_code == 503 and "database unreachable" in r.json()["error"]["message"]


BAD_CASES: list[tuple[str, str, Any, int, str, str | None]] = [
    # (id, method, body (bytes or JSON), status, error type, param or message needle)
    ("malformed-json", "POST", b'{"model": "x", "messages": [', 400, "invalid_request_error", "not valid JSON"),
    ("not-an-object", "POST", b"[1, 2]", 400, "invalid_request_error", "JSON object"),
    ("missing-messages", "POST", {"model": "small-general"}, 400, "invalid_request_error", "messages"),
    ("messages-wrong-type", "POST", chat(messages="hello"), 400, "invalid_request_error", "messages"),
    ("model-wrong-type", "POST", chat(model=3), 400, "invalid_request_error", "model"),
    ("max-tokens-wrong-type", "POST", chat(max_tokens="many"), 400, "invalid_request_error", "max_tokens"),
    ("temperature-out-of-range", "POST", chat(temperature=2.5), 400, "invalid_request_error", "temperature"),
    ("empty-content-list", "POST", chat(messages=[{"role": "user", "content": []}]), 400,
     "invalid_request_error", "messages[0].content"),
    ("unknown-role", "POST", chat(messages=[{"role": "wizard", "content": "x"}]), 400,
     "invalid_request_error", "messages[0].role"),
    ("unknown-model", "POST", chat(model="gpt-99"), 404, "invalid_request_error", "known: auto, "),
    ("body-over-limit", "POST", chat(messages=[{"role": "user", "content": "x" * (2 * LIMIT)}]), 413,
     "invalid_request_error", "limit"),
    ("wrong-method", "GET", None, 405, "invalid_request_error", "not allowed"),
    ("upstream-timeout", "POST", chat(model="bad-timeout"), 504, "timeout", "timed out"),
    ("upstream-429", "POST", chat(model="bad-429"), 429, "rate_limit_exceeded", "injected rate limit"),
    ("upstream-500", "POST", chat(model="bad-500"), 502, "upstream_error", "injected server error"),
]


@pytest.mark.parametrize(("case", "method", "body", "status", "etype", "needle"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_inputs(client: TestClient, case: str, method: str, body: Any, status: int, etype: str,
                    needle: str | None) -> None:
    if method == "GET":
        r = client.get("/v1/chat/completions")
    elif isinstance(body, bytes):
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == etype
    if needle:
        assert needle in err["message"] or needle == err["param"]
    if case == "unknown-model":
        assert err["code"] == "model_not_found" and "small-general" in err["message"]
    if status == 400 and case not in {"malformed-json", "not-an-object"}:
        assert err["param"] == needle
    assert "Traceback" not in r.text
    assert "x-uniroute-request-id" in r.headers
    # every chat response says how many upstream calls it made (a 405 to GET too)
    assert r.headers["x-uniroute-attempts"] == ("1" if case.startswith("upstream") else "0")


def test_streaming_errors_before_first_chunk_are_plain_errors(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=chat(model="bad-429", stream=True))
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded"


def test_chunked_body_over_limit_is_413(client: TestClient) -> None:
    def gen() -> Iterator[bytes]:
        for _ in range(4):
            yield b" " * LIMIT

    r = client.post("/v1/chat/completions", content=gen(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert r.headers["x-uniroute-attempts"] == "0"


def test_unknown_route_is_openai_404(client: TestClient) -> None:
    r = client.post("/v1/completions", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x", 1]), "content": _json})
_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["small-general", "nope", 1, None]), "messages": st.lists(_message, max_size=2) | _json},
    optional={"temperature": _json, "n": _json, "stream": _json, "stop": _json, "uniroute": _json, "tools": _json},
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies | _json)
def test_no_client_input_gives_500(client: TestClient, body: Any) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
