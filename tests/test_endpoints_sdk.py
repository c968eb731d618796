"""``/v1/responses``, ``/v1/messages`` and ``/v1/embeddings`` with the official clients (issue 12).

A REAL ``uniroute serve`` in ``auth.mode: keys`` (SQLite store, a key with a budget from ``uniroute keys
create``) in front of the replay upstream, reached through LiteLLM on loopback. The ``openai`` SDK calls
``responses.create`` (plain, streamed, a tool call and its round trip) and ``embeddings.create``; the
``anthropic`` SDK calls ``messages.create`` and ``messages.stream`` (with ``system``, and a tool use round trip).
Every call goes through ``model: "auto"`` (embeddings: a named model), which the cheapest-first policy sends
to ``bad-500`` first and falls back from. Afterwards each request is a row of the ``requests`` table with its
endpoint, and its cost is charged to the key. A model that reports impossible usage is charged the counted
figure, and that figure is the usage every client reads (streamed or not, on each endpoint).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import httpx
import openai
import pytest
import sqlalchemy as sa
import yaml
from anthropic.types import ContentBlockParam
from openai.types.responses import ResponseFunctionToolCall

from replay.app import embed_text
from routing.dataset import BenchmarkDataset, load_dataset
from tests.gateway_setup import make_dataset, replay_args, write_config
from tests.procs import (
    ROOT,
    fake_upstream,
    free_port,
    gateway_server,
    python,
    replay_server,
    running_all,
    server_env,
)

if TYPE_CHECKING:  # imported by the tests that use it (~3 s of CPU): not by every pytest-xdist worker collecting
    import anthropic

EMBED = "embed-small"
SCRAPE = "scrape-token-for-the-sdk-test"  # UNIROUTE_METRICS_TOKEN
TOOL = {"name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@dataclass
class Stack:
    base: str  # http://127.0.0.1:PORT
    key: str
    db_url: str
    data: BenchmarkDataset
    cfg: Any = None  # the gateway's config file (for `uniroute keys create`)

    def answer(self, model: str, row: int = 0) -> str:
        letter = self.data.responses[row][self.data.models.index(model)]
        return f"The answer is ({letter})."


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("sdk")
    dataset = make_dataset(root)
    replay, replay_base = replay_server(dataset, *replay_args())
    port = free_port()
    cfg = write_config(root, dataset, replay_base, port=port, log_level="warning")
    data = yaml.safe_load(cfg.read_text())
    db_url = f"sqlite:///{root / 'gateway.db'}"
    data.update(auth={"mode": "keys"}, database_url=db_url,
                database={"spill_dir": str(root / "spill"), "log_flush_interval_s": 0.2})
    data["models"].append({"name": EMBED, "kind": "embedding", "router_cost": 1, "input_cost_per_1m": 100.0,
                           "litellm_params": {"model": f"openai/{EMBED}", "api_base": replay_base,
                                              "api_key": "replay"}})
    with fake_upstream() as fake_base:  # its -echo model answers the body it was sent
        # -midfail: the stream breaks after its first chunk; -absurd, -negative: usage that cannot be true
        for name in ("echo", "midfail", "absurd", "negative"):
            data["models"].append({"name": name, "router_cost": 1, "routable": False, "input_cost_per_1m": 1.0,
                                   "litellm_params": {"model": f"openai/fake-{name}", "api_base": fake_base,
                                                      "api_key": "x"}})
        # the budget cap: -nousage never reports usage; a dear output price makes a big max_tokens exceed a budget
        data["models"].append({"name": "nousage", "router_cost": 1, "routable": False, "input_cost_per_1m": 1.0,
                               "output_cost_per_1m": 10.0, "litellm_params": {
                                   "model": "openai/fake-x-nousage", "api_base": fake_base, "api_key": "x"}})
        cfg.write_text(yaml.safe_dump(data))
        yield from _serve(cfg, replay, port, db_url, dataset)


def _serve(cfg: Any, replay: Any, port: int, db_url: str, dataset: Any) -> Iterator[Stack]:
    with running_all(replay, gateway_server(cfg, env=server_env(UNIROUTE_METRICS_TOKEN=SCRAPE))):
        out = python(
            ["-m", "gateway.cli.main", "keys", "create", "--name", "sdk", "--lambda", "0.2",
             "--budget", "100", "--config", str(cfg)],
            cwd=ROOT, env=server_env(), check=True, timeout=60)
        yield Stack(f"http://127.0.0.1:{port}", out.stdout.strip().splitlines()[-1], db_url, load_dataset(dataset),
                    cfg)


@pytest.fixture(scope="module")
def oa(stack: Stack) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=stack.base + "/v1", api_key=stack.key, max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def an(stack: Stack) -> Iterator[anthropic.Anthropic]:
    import anthropic

    with anthropic.Anthropic(base_url=stack.base, api_key=stack.key, max_retries=0, timeout=30) as c:
        yield c


def _rows(stack: Stack, request_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The ``requests`` rows of ``request_ids`` (waits for the background writer, bounded)."""
    engine = sa.create_engine(stack.db_url)
    try:
        deadline = time.monotonic() + 15
        while True:
            with engine.connect() as c:
                rows = {r.request_id: r._asdict() for r in c.execute(sa.text(
                    "SELECT request_id, endpoint, requested_model, routed_model, cost_usd, status_code, stream, "
                    "prompt_tokens, completion_tokens FROM requests"))}
            found = {i: rows[i] for i in request_ids if i in rows}
            if len(found) == len(request_ids) or time.monotonic() > deadline:
                return found
            time.sleep(0.2)
    finally:
        engine.dispose()


def _spend(stack: Stack) -> float:
    engine = sa.create_engine(stack.db_url)
    try:
        with engine.connect() as c:
            return float(c.execute(sa.text("SELECT spend_usd FROM api_keys WHERE name = 'sdk'")).scalar_one())
    finally:
        engine.dispose()


def _charged(stack: Stack, before: float, cost: float) -> None:
    """The key's spend rose by ``cost`` (a stream's settlement may land just after its last event)."""
    deadline = time.monotonic() + 10
    while _spend(stack) < before + cost * 0.999 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _spend(stack) == pytest.approx(before + cost)


def _key(stack: Stack, name: str, *flags: str) -> str:
    """A new client key made with ``uniroute keys create`` (the key is the last line it prints)."""
    out = python(
        ["-m", "gateway.cli.main", "keys", "create", "--name", name, *flags, "--config", str(stack.cfg)],
        cwd=ROOT, env=server_env(), check=True, timeout=60)
    return out.stdout.strip().splitlines()[-1]


def _logged(stack: Stack, rid: str, endpoint: str, *, stream: bool) -> dict[str, Any]:
    row = _rows(stack, [rid])[rid]
    assert (row["endpoint"] == endpoint and row["requested_model"] == "auto") or endpoint == "embeddings"
    assert row["status_code"] == 200 and bool(row["stream"]) == stream
    assert row["cost_usd"] > 0 and row["prompt_tokens"] > 0
    return row


# -- /v1/responses ------------------------------------------------------------------------------------------

def test_responses_plain_auto(stack: Stack, oa: openai.OpenAI) -> None:
    prompt = stack.data.prompts[0]
    before = _spend(stack)
    raw = oa.responses.with_raw_response.create(model="auto", input=prompt, instructions="Answer with a letter.",
                                                max_output_tokens=200)
    response = raw.parse()
    assert raw.headers["x-uniroute-model"] == "small-general" == response.model  # bad-500 failed first
    assert raw.headers["x-uniroute-attempts"] == "2"
    assert response.output_text == stack.answer("small-general")
    assert response.usage is not None and response.usage.output_tokens > 0
    ext = (response.model_extra or {})["uniroute"]
    assert ext["requested_model"] == "auto" and ext["cost_usd"] > 0
    assert float(raw.headers["x-uniroute-cost"]) == pytest.approx(ext["cost_usd"])
    row = _logged(stack, raw.headers["x-uniroute-request-id"], "responses", stream=False)
    assert row["routed_model"] == "small-general" and row["cost_usd"] == pytest.approx(ext["cost_usd"])
    assert _spend(stack) == pytest.approx(before + ext["cost_usd"])


def test_responses_stream_auto(stack: Stack, oa: openai.OpenAI) -> None:
    prompt = stack.data.prompts[1]
    before = _spend(stack)
    with oa.responses.with_streaming_response.create(model="auto", input=[{"role": "user", "content": prompt}],
                                                     stream=True) as raw:
        assert raw.headers["x-uniroute-model"] == "small-general"
        rid = raw.headers["x-uniroute-request-id"]
        events = list(raw.parse())
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == stack.answer("small-general", 1)
    completed = events[-1]
    assert completed.type == "response.completed"  # (narrows the event's type)
    assert completed.response.model == "small-general"
    ext = (completed.model_extra or {})["uniroute"]  # the last event carries the routing facts
    assert ext["model"] == "small-general" and ext["cost_usd"] > 0
    row = _logged(stack, rid, "responses", stream=True)
    assert row["cost_usd"] == pytest.approx(ext["cost_usd"])
    _charged(stack, before, ext["cost_usd"])


def test_responses_tool_call_round_trip(stack: Stack, oa: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", **TOOL}]
    first = oa.responses.create(model="auto", input="What is the weather in Paris?", tools=tools)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    prompt = stack.data.prompts[2]
    second = oa.responses.create(model="auto", tools=tools, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
        {"role": "user", "content": prompt},
    ])
    assert second.output_text == stack.answer("small-general", 2)


def test_responses_parameters_reach_the_model(oa: openai.OpenAI) -> None:
    """instructions, max_output_tokens, temperature and text.format arrive upstream (as chat parameters)."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    r = oa.responses.create(model="echo", input="x", instructions="Be brief.", max_output_tokens=33, temperature=0.5,
                            text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    sent = json.loads(r.output_text)
    assert sent["max_tokens"] == 33 and sent["temperature"] == 0.5
    assert sent["response_format"]["type"] == "json_schema" and sent["response_format"]["json_schema"]["schema"] == schema


def test_responses_previous_response_id_is_refused(stack: Stack, oa: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oa.responses.create(model="auto", input="hi", previous_response_id="resp_123")
    assert "previous_response_id is not supported" in str(info.value)


# -- /v1/embeddings -----------------------------------------------------------------------------------------

def test_embeddings_named_model(stack: Stack, oa: openai.OpenAI) -> None:
    before = _spend(stack)
    raw = oa.embeddings.with_raw_response.create(model=EMBED, input=["alpha", "beta"])  # the SDK asks base64
    result = raw.parse()
    assert raw.headers["x-uniroute-model"] == EMBED
    assert [d.embedding for d in result.data] == [pytest.approx(embed_text("alpha")), pytest.approx(embed_text("beta"))]
    single = oa.embeddings.create(model=EMBED, input="alpha", encoding_format="float", dimensions=8)
    assert single.data[0].embedding == pytest.approx(embed_text("alpha", 8))
    row = _logged(stack, raw.headers["x-uniroute-request-id"], "embeddings", stream=False)
    assert row["requested_model"] == EMBED and _spend(stack) > before


@pytest.mark.parametrize(("model", "needle"), [("auto", "'auto' routes chat models"),
                                               ("small-general", "is a chat model")])
def test_embeddings_need_an_embedding_model(oa: openai.OpenAI, model: str, needle: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oa.embeddings.create(model=model, input="x")
    assert needle in str(info.value)


def test_chat_refuses_an_embedding_model(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oa.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "x"}])
    assert "embedding model" in str(info.value)


# -- /v1/messages (Anthropic) -------------------------------------------------------------------------------

def test_messages_plain_auto_with_system(stack: Stack, an: anthropic.Anthropic) -> None:
    before = _spend(stack)
    raw = an.messages.with_raw_response.create(model="auto", max_tokens=200, system="Answer with a letter.",
                                               messages=[{"role": "user", "content": stack.data.prompts[3]}])
    message = raw.parse()
    assert raw.headers["x-uniroute-model"] == "small-general" == message.model
    assert message.content[0].type == "text" and message.content[0].text == stack.answer("small-general", 3)
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0
    ext = (message.model_extra or {})["uniroute"]
    row = _logged(stack, raw.headers["x-uniroute-request-id"], "messages", stream=False)
    assert row["cost_usd"] == pytest.approx(ext["cost_usd"])
    assert _spend(stack) == pytest.approx(before + ext["cost_usd"])


def test_messages_stream_auto(stack: Stack, an: anthropic.Anthropic) -> None:
    before = _spend(stack)
    with an.messages.stream(model="auto", max_tokens=200,
                            messages=[{"role": "user", "content": stack.data.prompts[4]}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        rid = stream.response.headers["x-uniroute-request-id"]
        assert stream.response.headers["x-uniroute-model"] == "small-general"
    assert text == stack.answer("small-general", 4)
    assert final.model == "small-general" and final.usage.output_tokens > 0
    row = _logged(stack, rid, "messages", stream=True)
    _charged(stack, before, row["cost_usd"])


def test_messages_stream_events(stack: Stack) -> None:
    """The raw event sequence, with the routing facts on the last event."""
    with httpx.stream("POST", stack.base + "/v1/messages", timeout=30, headers={"x-api-key": stack.key},
                      json={"model": "auto", "max_tokens": 100, "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.status_code == 200
        names = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event: ")]
    assert names[0] == "message_start" and names[-1] == "message_stop", names
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(names)


def test_messages_tool_use_round_trip(stack: Stack, an: anthropic.Anthropic) -> None:
    tools: Any = [{"name": TOOL["name"], "description": TOOL["description"], "input_schema": TOOL["parameters"]}]
    ask: Any = {"role": "user", "content": "What is the weather in Paris?"}
    first = an.messages.create(model="auto", max_tokens=100, tools=tools, messages=[ask])
    uses = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather"
    second = an.messages.create(model="auto", max_tokens=200, tools=tools, messages=[
        ask, {"role": "assistant", "content": [cast(ContentBlockParam, b.model_dump()) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"},
                                     {"type": "text", "text": stack.data.prompts[5]}]}])
    assert second.content[0].type == "text" and second.content[0].text == stack.answer("small-general", 5)


def test_messages_parameters_reach_the_model(an: anthropic.Anthropic) -> None:
    m = an.messages.create(model="echo", max_tokens=44, stop_sequences=["END"], system="Be brief.",
                           messages=[{"role": "user", "content": "x"}], extra_body={"temperature": 0.25})
    assert m.content[0].type == "text"
    sent = json.loads(m.content[0].text)
    assert sent["max_tokens"] == 44 and sent["temperature"] == 0.25 and sent["stop"] == ["END"]


def _body(error: anthropic.APIStatusError) -> dict[str, Any]:
    """The error's JSON body (the SDK types it ``object``)."""
    assert isinstance(error.body, dict), error.body
    return error.body


def test_messages_errors_are_anthropic_shaped(stack: Stack, an: anthropic.Anthropic) -> None:
    import anthropic

    with (anthropic.Anthropic(base_url=stack.base, api_key="sk-ur-not-a-key", max_retries=0) as bad,
          pytest.raises(anthropic.AuthenticationError) as auth):
        bad.messages.create(model="auto", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert auth.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": _body(auth.value)["error"]["message"]}}
    with pytest.raises(anthropic.NotFoundError) as missing:
        an.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert _body(missing.value)["error"]["type"] == "not_found_error"
    assert "unknown model 'no-such-model'" in _body(missing.value)["error"]["message"]
    r = httpx.post(stack.base + "/v1/messages", headers={"x-api-key": stack.key},
                   json={"model": "auto", "messages": [{"role": "user", "content": "x"}]})  # no max_tokens
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": "missing required field 'max_tokens'"}}
    r = httpx.get(stack.base + "/v1/messages", headers={"x-api-key": stack.key})
    assert r.status_code == 405 and r.json()["type"] == "error"
    with pytest.raises(anthropic.BadRequestError) as lam:  # the same λ rules as chat: the key's range is [0, 2]
        an.messages.create(model="auto", max_tokens=10, messages=[{"role": "user", "content": "x"}],
                           extra_body={"uniroute": {"lambda": 9}})
    assert "outside the allowed range" in _body(lam.value)["error"]["message"]
    with pytest.raises(anthropic.APIStatusError) as upstream:  # a named rate-limited model: no fallback, its 429
        an.messages.create(model="bad-429", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert upstream.value.status_code == 429 and _body(upstream.value)["error"]["type"] == "rate_limit_error"


def test_responses_stream_with_a_tool_call(stack: Stack, oa: openai.OpenAI) -> None:
    """``responses.create(stream=True)`` with tools: the function call arrives as typed events, through ``auto``,
    logged and charged."""
    tools: Any = [{"type": "function", **TOOL}]
    before = _spend(stack)
    with oa.responses.with_streaming_response.create(model="auto", input="What is the weather in Paris?",
                                                     tools=tools, stream=True) as raw:
        assert raw.headers["x-uniroute-model"] == "small-general"
        rid = raw.headers["x-uniroute-request-id"]
        events = list(raw.parse())
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    added = [e.item for e in events if e.type == "response.output_item.added" and e.item.type == "function_call"]
    assert [item.name for item in added] == ["get_weather"], types
    completed = events[-1]
    assert completed.type == "response.completed"  # (narrows the event's type)
    calls = [item for item in completed.response.output if isinstance(item, ResponseFunctionToolCall)]
    assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments or "{}") == {}
    row = _logged(stack, rid, "responses", stream=True)
    _charged(stack, before, row["cost_usd"])


def test_messages_stream_with_a_tool_use(stack: Stack, an: anthropic.Anthropic) -> None:
    """``messages.stream`` with tools: a ``tool_use`` block and ``stop_reason: tool_use``, logged and charged."""
    tools: Any = [{"name": TOOL["name"], "description": TOOL["description"], "input_schema": TOOL["parameters"]}]
    before = _spend(stack)
    with an.messages.stream(model="auto", max_tokens=100, tools=tools,
                            messages=[{"role": "user", "content": "What is the weather in Paris?"}]) as stream:
        final = stream.get_final_message()
        rid = stream.response.headers["x-uniroute-request-id"]
        assert stream.response.headers["x-uniroute-model"] == "small-general"
    uses = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather", final
    row = _logged(stack, rid, "messages", stream=True)
    _charged(stack, before, row["cost_usd"])


_LAMBDA_BODIES: dict[str, dict[str, Any]] = {
    "/v1/responses": {"model": "auto", "input": "hi"},
    "/v1/messages": {"model": "auto", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]},
}


@pytest.mark.parametrize("path", list(_LAMBDA_BODIES))
def test_lambda_header_and_body_on_every_endpoint(stack: Stack, path: str) -> None:
    """λ by the ``x-uniroute-lambda`` header or the body's ``uniroute.lambda``, and the key's range, as on chat."""
    auth = {"authorization": f"Bearer {stack.key}"}
    r = httpx.post(stack.base + path, headers={**auth, "x-uniroute-lambda": "0.5"}, json=_LAMBDA_BODIES[path],
                   timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["uniroute"]["lambda"] == 0.5 and r.headers["x-uniroute-lambda"] == "0.5"
    r = httpx.post(stack.base + path, headers=auth, json={**_LAMBDA_BODIES[path], "uniroute": {"lambda": 1.5}},
                   timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["uniroute"]["lambda"] == 1.5
    r = httpx.post(stack.base + path, headers={**auth, "x-uniroute-lambda": "9"}, json=_LAMBDA_BODIES[path],
                   timeout=30)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "outside the allowed range" in message
    assert (r.json().get("type") == "error") == (path == "/v1/messages")  # Anthropic-shaped there only


@pytest.mark.parametrize("path", [*_LAMBDA_BODIES, "/v1/embeddings"])
def test_a_client_request_id_is_echoed_and_logged_apart(stack: Stack, path: str) -> None:
    """``x-uniroute-client-request-id`` (in the OpenAPI document of every model endpoint) is echoed and logged,
    and the gateway's own id stays the request's id."""
    body = _LAMBDA_BODIES.get(path, {"model": EMBED, "input": "x"})
    r = httpx.post(stack.base + path, headers={"authorization": f"Bearer {stack.key}",
                                               "x-uniroute-client-request-id": "my-id.42"}, json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-uniroute-client-request-id"] == "my-id.42"
    rid = r.headers["x-uniroute-request-id"]
    assert rid.startswith("req-") and r.json()["uniroute"]["client_request_id"] == "my-id.42"
    engine = sa.create_engine(stack.db_url)
    try:
        deadline = time.monotonic() + 15
        while True:
            with engine.connect() as c:
                got = c.execute(sa.text("SELECT client_request_id FROM requests WHERE request_id = :r"),
                                {"r": rid}).scalar_one_or_none()
            if got is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        engine.dispose()
    assert got == "my-id.42"


def test_rate_limit_applies_to_every_endpoint(stack: Stack) -> None:
    """A key with ``rpm: 1``: its second request, on whichever endpoint, is a 429 with ``Retry-After``
    (``rate_limit_error`` on /v1/messages, ``rate_limit_exceeded`` elsewhere), and nothing is charged for it."""
    key = _key(stack, "rpm-one", "--lambda", "0.2", "--rpm", "1", "--budget", "10")
    auth = {"authorization": f"Bearer {key}"}  # x-api-key is /v1/messages' alone
    first = httpx.post(stack.base + "/v1/messages", headers=auth, timeout=30, json=_LAMBDA_BODIES["/v1/messages"])
    assert first.status_code == 200, first.text
    refused = [httpx.post(stack.base + path, headers=auth, timeout=30, json=body) for path, body in (
        ("/v1/messages", _LAMBDA_BODIES["/v1/messages"]), ("/v1/responses", _LAMBDA_BODIES["/v1/responses"]),
        ("/v1/embeddings", {"model": EMBED, "input": "x"}))]
    for r in refused:
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
    assert refused[0].json()["type"] == "error" and refused[0].json()["error"]["type"] == "rate_limit_error"
    for r in refused[1:]:
        assert r.json()["error"]["code"] == "rate_limit_exceeded", r.text
    engine = sa.create_engine(stack.db_url)
    try:
        with engine.connect() as c:
            held = c.execute(sa.text("SELECT reserved_usd FROM api_keys WHERE name = 'rpm-one'")).scalar_one()
    finally:
        engine.dispose()
    assert held == 0


def test_metrics_count_requests_per_endpoint(stack: Stack, oa: openai.OpenAI, an: anthropic.Anthropic) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    oa.embeddings.create(model=EMBED, input="x")
    an.messages.create(model="auto", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    oa.responses.create(model="auto", input="x")
    text = httpx.get(stack.base + "/metrics", headers={"authorization": f"Bearer {SCRAPE}"}, timeout=10).text
    counted: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "litellm_proxy_total_requests_metric":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["status_code"] == "200":
                    endpoint = sample.labels["endpoint"]
                    counted[endpoint] = counted.get(endpoint, 0) + sample.value
    assert {"responses", "messages", "embeddings"} <= set(counted), counted
    assert all(v >= 1 for v in counted.values()), counted


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
def test_a_stream_broken_mid_way_ends_with_an_error_event(stack: Stack, path: str) -> None:
    body: dict[str, Any] = {"model": "midfail", "stream": True}
    body.update({"max_tokens": 50, "messages": [{"role": "user", "content": "one two three"}]}
                if path == "/v1/messages" else {"input": "one two three"})
    with httpx.stream("POST", stack.base + path, json=body, timeout=30,
                      headers={"authorization": f"Bearer {stack.key}"}) as r:
        assert r.status_code == 200
        rid = r.headers["x-uniroute-request-id"]
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1]["type"] == "error", events
    if path == "/v1/messages":
        assert events[-1]["error"]["type"] == "api_error" and "midfail" in events[-1]["error"]["message"]
    else:
        assert events[-1]["code"] == "bad_gateway" and "midfail" in events[-1]["message"]
    row = _rows(stack, [rid])[rid]
    assert row["status_code"] == 502 and row["endpoint"] == path.rsplit("/", 1)[-1]
    assert row["prompt_tokens"] > 0  # the partial usage is charged


# -- the budget cap on every endpoint ---------------------------------------------------------------------------

def test_budget_cap_holds_on_messages_and_responses(stack: Stack, oa: openai.OpenAI, an: anthropic.Anthropic) -> None:
    """A budgeted key's request whose estimate exceeds what remains is refused before it is sent (429;
    Anthropic-shaped on /v1/messages), the default output bound is forced upstream when the request sets none,
    and a /v1/messages stream whose upstream never reports usage is charged the counted figure (> 0)."""
    out = python(
        ["-m", "gateway.cli.main", "keys", "create", "--name", "tight", "--lambda", "0.2",
         "--budget", "0.01", "--config", str(stack.cfg)],
        cwd=ROOT, env=server_env(), check=True, timeout=60)
    tight = out.stdout.strip().splitlines()[-1]
    huge = 1_000_000  # x $10/1M output = $10, far beyond the $0.01 budget
    r = httpx.post(stack.base + "/v1/messages", headers={"x-api-key": tight}, timeout=30,
                   json={"model": "nousage", "max_tokens": huge, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 429, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error", body
    assert "budget exceeded" in body["error"]["message"] and f"{huge} completion tokens" in body["error"]["message"]
    with (openai.OpenAI(base_url=stack.base + "/v1", api_key=tight, max_retries=0, timeout=30) as client,
          pytest.raises(openai.RateLimitError) as refused):
        client.responses.create(model="nousage", input="hi", max_output_tokens=huge)
    assert "budget exceeded" in str(refused.value) and f"{huge} completion tokens" in str(refused.value)
    for r in (httpx.post(stack.base + "/v1/messages", headers={"x-api-key": tight}, timeout=30, json={
                  "model": "nousage", "max_tokens": huge, "stream": True,
                  "messages": [{"role": "user", "content": "hi"}]}),
              httpx.post(stack.base + "/v1/responses", headers={"authorization": f"Bearer {tight}"}, timeout=30,
                         json={"model": "nousage", "input": "hi", "max_output_tokens": huge, "stream": True})):
        assert r.status_code == 429, r.text  # refused before any byte is streamed
    engine = sa.create_engine(stack.db_url)
    try:
        with engine.connect() as c:
            spent, held = c.execute(sa.text(
                "SELECT spend_usd, reserved_usd FROM api_keys WHERE name = 'tight'")).one()
    finally:
        engine.dispose()
    assert spent == 0 and held == 0

    # no max_output_tokens, a model whose maximum output is unknown: the default bound reaches the upstream
    sent = json.loads(oa.responses.create(model="echo", input="x").output_text)
    assert sent["max_tokens"] == 4096  # budget.default_max_output_tokens (the sdk key has a budget)

    # a stream without usage on /v1/messages: charged what was sent and relayed, counted
    before = _spend(stack)
    with an.messages.stream(model="nousage", max_tokens=100,
                            messages=[{"role": "user", "content": "count these words please"}]) as stream:
        text = "".join(stream.text_stream)
        rid = stream.response.headers["x-uniroute-request-id"]
    assert text
    row = _rows(stack, [rid])[rid]
    assert row["status_code"] == 200 and row["endpoint"] == "messages" and row["stream"]
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0 and row["cost_usd"] > 0, row
    deadline = time.monotonic() + 10
    while _spend(stack) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _spend(stack) > before

    # answers without usage (not streamed) on both endpoints: counted too
    rids = [oa.responses.with_raw_response.create(model="nousage", input="count me", max_output_tokens=50)
            .headers["x-uniroute-request-id"],
            an.messages.with_raw_response.create(model="nousage", max_tokens=50,
                                                 messages=[{"role": "user", "content": "count me"}])
            .headers["x-uniroute-request-id"]]
    with httpx.stream("POST", stack.base + "/v1/responses", timeout=30, headers={"authorization": f"Bearer {stack.key}"},
                      json={"model": "nousage", "input": "count me", "max_output_tokens": 50, "stream": True}) as r:
        assert r.status_code == 200
        rids.append(r.headers["x-uniroute-request-id"])
        lines = list(r.iter_lines())  # read to the end (stopping early would be a disconnect)
    assert any("output_text.delta" in line for line in lines)
    for rid, row in _rows(stack, rids).items():
        assert row["status_code"] == 200 and row["completion_tokens"] > 0 and row["cost_usd"] > 0, (rid, row)
    assert len(_rows(stack, rids)) == 3


# -- usage the sanity check corrects: the client sees the figures charged ----------------------------------------

def _corrected_row(stack: Stack, rid: str) -> tuple[int, int, float]:
    """(prompt tokens, completion tokens, cost) of request ``rid`` as logged and charged; it must be flagged
    ``usage_corrected``."""
    _rows(stack, [rid])  # waits for the writer
    engine = sa.create_engine(stack.db_url)
    try:
        with engine.connect() as c:
            row = c.execute(sa.text("SELECT prompt_tokens, completion_tokens, cost_usd, usage_corrected FROM requests "
                                    "WHERE request_id = :r"), {"r": rid}).one()
    finally:
        engine.dispose()
    assert row.usage_corrected, rid
    assert 0 < row.prompt_tokens < 1000 and 0 < row.completion_tokens < 1000, row  # counted, not 10^9 or < 0
    return row.prompt_tokens, row.completion_tokens, row.cost_usd


@pytest.mark.parametrize("model", ["absurd", "negative"])
def test_corrected_usage_is_what_the_client_sees(stack: Stack, oa: openai.OpenAI, an: anthropic.Anthropic,
                                                 model: str) -> None:
    """A model that reports impossible usage (10^9 tokens, or negative) is charged the counted figure, and the
    client's usage is that figure on every endpoint, streamed or not: the Responses stream's
    ``response.completed``, the Messages stream's ``message_delta`` (so the SDK's final message), chat's usage
    chunk, and each non-streaming answer's ``usage``."""
    prompt = "one two three four five six seven eight"
    before = _spend(stack)
    charged = 0.0
    # /v1/responses, streamed (the openai SDK's typed events) and not
    with oa.responses.with_streaming_response.create(model=model, input=prompt, stream=True) as raw:
        rid = raw.headers["x-uniroute-request-id"]
        events = list(raw.parse())
    completed = events[-1]
    assert completed.type == "response.completed" and completed.response.usage is not None
    pt, ct, cost = _corrected_row(stack, rid)
    usage = completed.response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (pt, ct, pt + ct)
    assert (completed.model_extra or {})["uniroute"]["cost_usd"] == pytest.approx(cost)
    charged += cost
    plain = oa.responses.with_raw_response.create(model=model, input=prompt)
    pt, ct, cost = _corrected_row(stack, plain.headers["x-uniroute-request-id"])
    plain_usage = plain.parse().usage
    assert plain_usage is not None
    assert (plain_usage.input_tokens, plain_usage.output_tokens, plain_usage.total_tokens) == (pt, ct, pt + ct)
    charged += cost
    # /v1/messages, streamed (the anthropic SDK's accumulated final message, and the raw message_delta) and not
    with an.messages.stream(model=model, max_tokens=100, messages=[{"role": "user", "content": prompt}]) as stream:
        deltas = [e for e in stream if e.type == "message_delta"]
        final = stream.get_final_message()
        rid = stream.response.headers["x-uniroute-request-id"]
    pt, ct, cost = _corrected_row(stack, rid)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (pt, ct)
    assert len(deltas) == 1 and (deltas[0].usage.input_tokens, deltas[0].usage.output_tokens) == (pt, ct)
    charged += cost
    raw_message = an.messages.with_raw_response.create(model=model, max_tokens=100,
                                                       messages=[{"role": "user", "content": prompt}])
    pt, ct, cost = _corrected_row(stack, raw_message.headers["x-uniroute-request-id"])
    message = raw_message.parse()
    assert (message.usage.input_tokens, message.usage.output_tokens) == (pt, ct)
    charged += cost
    # /v1/chat/completions, streamed with include_usage (as it already was)
    with oa.chat.completions.with_streaming_response.create(
            model=model, messages=[{"role": "user", "content": prompt}], stream=True,
            stream_options={"include_usage": True}) as raw_chat:
        rid = raw_chat.headers["x-uniroute-request-id"]
        chunks = list(raw_chat.parse())
    usages = [c.usage for c in chunks if c.usage is not None]
    pt, ct, cost = _corrected_row(stack, rid)
    assert len(usages) == 1 and (usages[0].prompt_tokens, usages[0].completion_tokens) == (pt, ct)
    charged += cost
    assert _spend(stack) == pytest.approx(before + charged)
