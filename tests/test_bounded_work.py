"""Bounded work, in process: the structural scanner of request bodies (against a reference computed from the
parsed JSON, over random documents cut into random chunks), the limits as the app answers them, the key
checked before the body, the body read timeout of the middleware, CPU-heavy steps off the event loop, the
stream relay's counters, and the byte bound on upstream responses (issue 10, rows 2, 10 and 12)."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import LimitsConfig, parse_config
from gateway.errors import InvalidRequestError, UpstreamError
from gateway.http.bodies import chat_shape, json_shape
from gateway.serving.bounded import BoundedTransport, ResponseTooLargeError, UpstreamBodyError
from gateway.serving.forwarding import RelayedText, count_tokens, map_exception

SMALL = LimitsConfig(max_messages=5, max_content_parts=3, max_tools=2, max_json_depth=6, max_json_items=60)


# ------------------------------------------------------------------------------------------ the scanner
def _reference(doc: Any, limits: LimitsConfig) -> set[str]:
    """The limits ``doc`` breaks, from the parsed value."""
    broken: set[str] = set()
    items = 0

    def walk(v: Any, depth: int) -> None:
        nonlocal items
        if isinstance(v, dict | list):
            items += 1 + max(0, len(v) - 1)
            if depth + 1 > limits.max_json_depth:
                broken.add("limits.max_json_depth")
            for x in v.values() if isinstance(v, dict) else v:
                walk(x, depth + 1)

    walk(doc, 0)
    if items > limits.max_json_items:
        broken.add("limits.max_json_items")
    if isinstance(doc, dict):
        msgs = doc.get("messages")
        if isinstance(msgs, list):
            if len(msgs) > limits.max_messages:
                broken.add("limits.max_messages")
            for m in msgs:
                if isinstance(m, dict) and isinstance(m.get("content"), list) \
                        and len(m["content"]) > limits.max_content_parts:
                    broken.add("limits.max_content_parts")
        for key in ("tools", "functions"):
            if isinstance(doc.get(key), list) and len(doc[key]) > limits.max_tools:
                broken.add("limits.max_tools")
    return broken


def _scan(raw: bytes, cuts: list[int], limits: LimitsConfig = SMALL, chat: bool = True) -> str | None:
    shape = chat_shape(limits) if chat else json_shape(limits)
    bounds = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    try:
        for a, b in itertools.pairwise(bounds):
            shape.feed(raw[a:b])
    except InvalidRequestError as exc:
        assert exc.code == "limit_exceeded" and exc.status_code == 400
        found = [k for k in ("max_messages", "max_content_parts", "max_tools", "max_json_depth", "max_json_items")
                 if f"limits.{k}" in exc.message]
        assert len(found) == 1, exc.message
        return f"limits.{found[0]}"
    return None


# strings that make the scanner's life hard: quotes, backslashes, brackets, commas, colons, unicode
_tricky = st.text(alphabet=st.sampled_from(list('ab"\\[]{},: \n\u00e9\u4e2d')), max_size=8)
_key = st.sampled_from(["messages", "content", "tools", "functions", "role", "x"]) | _tricky
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False) | _tricky,
    lambda inner: st.lists(inner, max_size=7) | st.dictionaries(_key, inner, max_size=4),
    max_leaves=40,
)
_message = st.fixed_dictionaries({"role": st.just("user")}, optional={
    "content": _tricky | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _tricky}), max_size=5),
    "x": _json})
_chat = st.fixed_dictionaries({"model": st.just("m")}, optional={
    "messages": st.lists(_message, max_size=7), "tools": st.lists(_json, max_size=4),
    "functions": st.lists(_json, max_size=4), "metadata": _json, "content": st.lists(_json, max_size=6)})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_chat | _json, cuts=st.lists(st.integers(0, 10_000), max_size=12), ensure_ascii=st.booleans())
def test_the_scanner_refuses_exactly_what_breaks_a_limit(doc: Any, cuts: list[int], ensure_ascii: bool) -> None:
    raw = json.dumps(doc, ensure_ascii=ensure_ascii).encode()  # ensure_ascii: keys and text as \\u escapes
    broken = _reference(doc, SMALL)
    got = _scan(raw, cuts)
    if broken:
        assert got in broken, (got, broken)
    else:
        assert got is None
    deep: set[str | None] = {b for b in broken if b in ("limits.max_json_depth", "limits.max_json_items")}
    assert _scan(raw, cuts, chat=False) in (deep or {None})


def test_escaped_keys_strings_and_chunk_edges() -> None:
    doc = {"m\u00e9ta": ['\\"]]]', "a,b,c"], "messages": [{"role": "user", "content": [{"type": "text",
                                                                                      "text": "\\\\"}] * 4}]}
    raw = json.dumps(doc).encode().replace(b'"messages"', b'"m\\u0065ssages"').replace(b'"content"',
                                                                                       b'"cont\\u0065nt"')
    assert json.loads(raw)["messages"][0]["content"]  # still the same request
    for cut in range(len(raw) + 1):  # every place a chunk boundary can fall
        for cut2 in (cut, cut + 1, cut + 2):
            assert _scan(raw, [cut, cut2]) == "limits.max_content_parts", (cut, cut2)
    escaped_key = json.dumps({"messages": [{"role": "user"}] * 6}).encode().replace(b"messages", b"mess\\u0061ges")
    assert _scan(escaped_key, []) == "limits.max_messages"
    nested = json.dumps({"metadata": {"messages": [1] * 50}}).encode()  # not the request's messages
    assert _scan(nested, [], LimitsConfig(max_messages=5)) is None


def test_the_scanner_is_cheap_on_the_adversarial_body() -> None:
    import time

    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "a"}] * 300_000})
    shape = chat_shape(LimitsConfig())
    t0 = time.process_time()
    with pytest.raises(InvalidRequestError, match=r"limits\.max_messages"):
        for i in range(0, len(body), 16384):
            shape.feed(body[i:i + 16384])
    assert i < 128 * 1024  # refused within the first ~64 KB of the 9 MB
    assert time.process_time() - t0 < 0.5  # ~10 ms on the dev machine (orjson parsing it all: ~0.5 s)


# ------------------------------------------------------------------------------------- the app (in process)
@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("limits")
    cfg = parse_config({
        "server": {"body_timeout_s": 0.5},
        "auth": {"mode": "open"},
        "database_url": f"sqlite:///{root / 'gw.db'}",
        "database": {"spill_dir": str(root / "spill")},
        "limits": {"max_messages": 5, "max_content_parts": 3, "max_tools": 2, "max_json_depth": 8,
                   "max_json_items": 200},
        "models": [{"name": "m", "router_cost": 1.0,
                    "litellm_params": {"model": "openai/m", "api_base": "http://127.0.0.1:9/v1", "api_key": "x"}}],
    }, base_dir=root)
    with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
        yield c


def _msgs(n: int) -> list[dict[str, Any]]:
    return [{"role": "user", "content": "hi"}] * n


@pytest.mark.parametrize(("body", "key", "param"), [
    ({"model": "m", "messages": _msgs(6)}, "limits.max_messages", "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 4}]},
     "limits.max_content_parts", "messages[0].content"),
    ({"model": "m", "messages": _msgs(1), "tools": [{"type": "function", "function": {"name": "f"}}] * 3},
     "limits.max_tools", "tools"),
    ({"model": "m", "messages": _msgs(1), "functions": [{"name": "f"}] * 3}, "limits.max_tools", "functions"),
    ({"model": "m", "messages": _msgs(1), "metadata": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}},
     "limits.max_json_depth", None),
    ({"model": "m", "messages": _msgs(1), "logit_bias": {str(i): 1 for i in range(300)}},
     "limits.max_json_items", None),
])
def test_each_limit_answers_400_naming_its_config_key(client: TestClient, body: dict[str, Any], key: str,
                                                      param: str | None) -> None:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert key in err["message"] and err["code"] == "limit_exceeded" and err["param"] == param, err


@pytest.mark.parametrize(("path", "body", "key", "param"), [
    ("/v1/responses", {"model": "m", "input": _msgs(6)}, "limits.max_messages", "input"),
    ("/v1/responses", {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "a"}] * 4}]},
     "limits.max_content_parts", "input[0].content"),
    ("/v1/responses", {"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f"}] * 3},
     "limits.max_tools", "tools"),
    ("/v1/messages", {"model": "m", "max_tokens": 5, "messages": _msgs(6)}, "limits.max_messages", "messages"),
    ("/v1/messages", {"model": "m", "max_tokens": 5,
                      "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 4}]},
     "limits.max_content_parts", "messages[0].content"),
    ("/v1/embeddings", {"model": "m", "input": ["a"] * 300}, "limits.max_json_items", None),
])
def test_the_structural_limits_hold_on_every_model_endpoint(client: TestClient, path: str, body: dict[str, Any],
                                                             key: str, param: str | None) -> None:
    """The same limits as chat (docs/security/bounded-work.md): the Responses API's ``input`` items count as
    messages and their ``content`` lists as content parts."""
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert key in err["message"], err
    if path != "/v1/messages":  # Anthropic-shaped there: {"type": "error", "error": {"type", "message"}}
        assert err["code"] == "limit_exceeded" and err["param"] == param, err
    ok = client.post(path, json={**body, **({"input": _msgs(5)} if path == "/v1/responses" and param == "input"
                                            else {})})
    assert param != "input" or "limits." not in ok.text  # five input items are within the limit


def test_every_json_body_gets_the_depth_and_size_limits(client: TestClient) -> None:
    deep = b"[" * 5000 + b"1" + b"]" * 5000  # deeper than orjson's own limit, and than Python's recursion limit
    for path in ("/v1/feedback", "/v1/chat/completions"):
        r = client.post(path, content=orjson.dumps({"request_id": "x", "x": [[[[[[[[[1]]]]]]]]]}))
        assert r.status_code == 400 and "limits.max_json_depth" in r.json()["error"]["message"], r.text
        r = client.post(path, content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "limits.max_json_depth" in r.json()["error"]["message"], r.text


def test_413_for_a_body_over_max_body_bytes_by_header_or_by_stream(tmp_path: Path) -> None:
    cfg = parse_config({"server": {"max_body_bytes": 1000}, "auth": {"mode": "open"},
                        "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
                        "database": {"spill_dir": str(tmp_path / "spill")},
                        "models": [{"name": "m", "router_cost": 1.0, "litellm_params": {"model": "openai/m"}}]},
                       base_dir=tmp_path)
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "a" * 2000}]})
    with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", content=body)
        assert r.status_code == 413 and "server.max_body_bytes" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", content=iter([body[:600], body[600:]]))  # chunked: no content-length
        assert r.status_code == 413 and r.headers["connection"] == "close"


# ---------------------------------------------------------------- the key before the body; the body's deadline
def _asgi(app: Any, headers: list[tuple[bytes, bytes]], receive: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": headers, "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 2), "state": {}}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 10))
    return sent


def test_a_keyless_request_is_refused_without_reading_its_body(tmp_path: Path) -> None:
    """ASGI level: the body never comes (receive would wait forever), the 401 is sent all the same."""
    cfg = parse_config({"auth": {"mode": "keys"}, "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
                        "database": {"spill_dir": str(tmp_path / "spill")},
                        "models": [{"name": "m", "router_cost": 1.0, "litellm_params": {"model": "openai/m"}}]},
                       base_dir=tmp_path)
    reads = 0

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        await asyncio.Event().wait()  # a 9 MB body that never arrives
        raise AssertionError

    with TestClient(create_app(cfg)) as c:  # runs the lifespan; the ASGI call below reuses the started app
        app = c.app
        for auth in ([], [(b"authorization", b"Bearer sk-ur-not-a-key")]):
            sent = _asgi(app, [(b"content-type", b"application/json"), (b"content-length", b"9000000"), *auth],
                         receive)
            assert sent[0]["status"] == 401
            assert (b"connection", b"close") in sent[0]["headers"]  # 9 MB promised: not read, not drained
    assert reads == 0


def test_a_trickled_body_gets_408_from_the_middleware(client: TestClient) -> None:
    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": b" ", "more_body": True}  # one byte every 0.2 s, forever

    sent = _asgi(client.app, [(b"content-type", b"application/json"), (b"content-length", b"1000")], receive)
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert b"server.body_timeout_s" in sent[1]["body"]


# ------------------------------------------------------------------------------ CPU-heavy steps off the loop
def test_large_bodies_are_parsed_validated_and_estimated_in_a_worker_thread(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.serving.service import ChatService

    cfg = parse_config({"auth": {"mode": "open"}, "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
                        "database": {"spill_dir": str(tmp_path / "spill")}, "limits": {"offload_bytes": 4096},
                        "models": [{"name": "m", "router_cost": 1.0,
                                    "litellm_params": {"model": "openai/m", "api_base": "http://127.0.0.1:9/v1",
                                                       "api_key": "x"}}]}, base_dir=tmp_path)
    threads: dict[str, set[str]] = {"parse": set(), "estimate": set()}
    import gateway.http.chat as chat

    real_parse, real_estimate = chat._parse, ChatService._estimate

    def parse(raw: bytes) -> Any:
        threads["parse"].add(threading.current_thread().name)
        return real_parse(raw)

    def estimate(self: Any, req: Any, tries: Any, principal: Any) -> Any:
        threads["estimate"].add(threading.current_thread().name)
        return real_estimate(self, req, tries, principal)

    monkeypatch.setattr(chat, "_parse", parse)
    monkeypatch.setattr(ChatService, "_estimate", estimate)
    with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
        assert c.portal is not None
        loop_thread = c.portal.call(lambda: threading.current_thread().name)
        c.post("/v1/chat/completions", json={"model": "m", "messages": _msgs(1)})  # small: inline
        assert threads == {"parse": {loop_thread}, "estimate": {loop_thread}}
        c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "a" * 5000}]})
    assert len(threads["parse"]) == 2 and len(threads["estimate"]) == 2  # the large one: in a worker thread


def test_the_stream_relay_keeps_counts_not_text() -> None:
    text = ("The quick brown fox jumps over the lazy dog. " * 2000).split(" ")
    relayed = RelayedText("openai/gpt-4o")
    for i, word in enumerate(text):
        relayed.add(word if i == 0 else " " + word)
        assert relayed._pending_chars < RelayedText.BATCH + 64  # at most one batch of text held
    whole = " ".join(text)
    assert relayed.chars == len(whole)
    exact = count_tokens("openai/gpt-4o", text=whole)
    assert abs(relayed.tokens() - exact) <= exact * 0.01 + 30  # per-batch counting: boundary effects only


# ------------------------------------------------------------------------------ upstream responses, bounded
def _transport(handler: Any, limit: int = 1000) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=BoundedTransport(httpx2.MockTransport(handler), limit))


def _answer(data: bytes, **headers: str) -> httpx2.Response:
    """A response whose body streams in 16 KB pieces, as a real transport's does (not read in advance)."""
    async def pieces() -> Any:
        for i in range(0, len(data), 16384):
            yield data[i:i + 16384]

    return httpx2.Response(200, content=pieces(), headers={k.replace("_", "-"): v for k, v in headers.items()})


async def _get(client: httpx2.AsyncClient, stream: bool = False) -> bytes:
    if stream:
        async with client.stream("GET", "http://up/x") as r:
            return b"".join([c async for c in r.aiter_bytes()])
    return (await client.get("http://up/x")).content


async def test_a_response_over_the_limit_fails_by_header_or_by_count() -> None:
    seen: list[str] = []

    def by_length(request: httpx2.Request) -> httpx2.Response:
        seen.append(request.headers["accept-encoding"])
        return httpx2.Response(200, content=b"x" * 1001)

    with pytest.raises(ResponseTooLargeError, match=r"forwarding\.max_response_bytes"):
        await _get(_transport(by_length))
    assert seen == ["gzip, deflate"]

    async def chunks() -> Any:
        for _ in range(10_000):  # would be 10 MB: refused after ~1 KB
            yield b"x" * 1000

    def by_count(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=chunks())

    with pytest.raises(ResponseTooLargeError):
        await _get(_transport(by_count))
    ok = await _get(_transport(lambda r: _answer(b"y" * 1000)))
    assert ok == b"y" * 1000


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
async def test_compressed_answers_are_bounded_decoded(encoding: str) -> None:
    def pack(data: bytes) -> bytes:
        if encoding == "gzip":
            return gzip.compress(data)
        if encoding == "deflate":
            return zlib.compress(data)
        c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return c.compress(data) + c.flush()

    name = "deflate" if encoding == "raw-deflate" else encoding
    small, bomb = pack(b'{"ok": true}'), pack(b"\0" * 50_000_000)  # 50 MB of zeros in ~50 KB
    assert len(bomb) < 100_000
    ok = await _get(_transport(lambda r: _answer(small, content_encoding=name)))
    assert ok == b'{"ok": true}'
    with pytest.raises(ResponseTooLargeError):
        await _get(_transport(lambda r: _answer(bomb, content_encoding=name), limit=1_000_000))


async def test_an_unasked_encoding_is_refused_and_stream_events_are_bounded() -> None:
    with pytest.raises(UpstreamBodyError, match="br"):
        await _get(_transport(lambda r: _answer(b"x", content_encoding="br")))
    sse = "text/event-stream"
    events = b"".join(b"data: " + b"a" * 500 + b"\n\n" for _ in range(100))  # 50 KB in events of 500 B: fine
    assert await _get(_transport(lambda r: _answer(events, content_type=sse)), True) == events
    crlf = b"".join(b"data: " + b"a" * 500 + b"\r\n\r\n" for _ in range(100))
    assert await _get(_transport(lambda r: _answer(crlf, content_type=sse)), True) == crlf
    with pytest.raises(ResponseTooLargeError, match="one event"):
        await _get(_transport(lambda r: _answer(b"data: " + b"a" * 2000, content_type=sse)), True)


def test_a_refused_answer_maps_to_a_502_naming_the_limit() -> None:
    import openai

    try:
        try:
            raise ResponseTooLargeError(32, stream=False)
        except ResponseTooLargeError as inner:
            raise openai.APIConnectionError(request=httpx2.Request("POST", "http://up")) from inner
    except openai.APIConnectionError as exc:
        err = map_exception(exc, "m")
    assert isinstance(err, UpstreamError) and err.status_code == 502
    assert "forwarding.max_response_bytes" in err.message and "'m'" in err.message
