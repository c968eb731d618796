"""ChatService in process over the in-memory fake upstream (tests/fake_upstream.py: FakeUpstream); the
standard parameters are checked end to end, through LiteLLM to the same fake upstream as a real server."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import parse_config
from gateway.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    UpstreamError,
)
from gateway.protocol import parse_chat_request
from gateway.serving.forwarding import Forwarder
from gateway.serving.interfaces import MemorySink, OpenAuthenticator, Principal, Reservation
from gateway.serving.registry import Registry
from gateway.serving.service import ChatContext, ChatService
from routing.policy import CheapestPolicy
from tests.fake_upstream import FakeUpstream


class RecordingBudget:
    def __init__(self) -> None:
        self.reserved: list[float] = []
        self.settled: list[float] = []

    async def reserve(self, principal: Principal, estimate_usd: float) -> Reservation:
        self.reserved.append(estimate_usd)
        return Reservation(key_id=principal.key_id, amount_usd=estimate_usd)

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        self.settled.append(actual_usd)


def make_service(principal: Principal | None = None, *,
                 base_url: str | None = None) -> tuple[ChatService, MemorySink, RecordingBudget]:
    """The service over five models, in memory (FakeUpstream), or through LiteLLM to the fake upstream
    server at ``base_url``."""
    api_base = base_url or "http://fake-upstream.invalid/v1"  # never dialled in memory

    def m(name: str, cost: float, upstream: str | None = None) -> dict[str, Any]:
        return {"name": name, "router_cost": cost, "input_cost_per_1m": 1.0, "output_cost_per_1m": 2.0,
                "litellm_params": {"model": f"openai/{upstream or name}", "api_base": api_base, "api_key": "t"}}

    cfg = parse_config({"models": [m("cheap-500", 1), m("mid", 2), m("big", 10), m("drops-midfail", 50),
                                   {**m("params-echo", 60), "routable": False}]})
    registry = Registry.from_config(cfg)
    fw = Forwarder(max_attempts=3, upstream=None if base_url else FakeUpstream())
    registry.on_replace(fw.register)
    sink, budget = MemorySink(), RecordingBudget()
    auth = OpenAuthenticator(principal) if principal else None
    return ChatService(registry, CheapestPolicy(), fw, authenticator=auth, budget=budget, sink=sink), sink, budget


def req(**kw: Any) -> Any:
    return parse_chat_request({"model": "auto", "messages": [{"role": "user", "content": "hi"}], **kw})


CTX = ChatContext(request_id="req-1")


async def test_auto_routes_cheapest_and_falls_back() -> None:
    svc, sink, budget = make_service()
    res = await svc.complete(req(), CTX)
    assert res.model == "mid" and res.body["model"] == "mid"
    ext = res.body["uniroute"]
    assert ext["requested_model"] == "auto" and ext["model"] == "mid" and ext["lambda"] == 0.1
    assert [c["model"] for c in ext["candidates"]] == ["cheap-500", "mid", "big", "drops-midfail"]
    assert [(a["model"], a["status"]) for a in ext["attempts"]] == [("cheap-500", 502), ("mid", 200)]
    assert res.cost_usd is not None and res.cost_usd > 0
    assert ext["cost_usd"] == pytest.approx(res.cost_usd)
    rec = sink.records[-1]
    assert rec.routed_model == "mid" and rec.status_code == 200 and rec.cost_usd == res.cost_usd
    assert rec.prompt_tokens and rec.completion_tokens and rec.latency_ms and rec.latency_ms > 0
    assert budget.reserved[0] > 0 and budget.settled == [res.cost_usd]


async def test_named_model_is_served_by_it() -> None:
    svc, _, _ = make_service()
    res = await svc.complete(req(model="big"), CTX)
    assert res.model == "big"
    assert res.body["uniroute"]["candidates"] == []


async def test_unknown_model_lists_known() -> None:
    svc, sink, _ = make_service()
    with pytest.raises(ModelNotFoundError) as info:
        await svc.complete(req(model="gpt-9"), CTX)
    assert info.value.code == "model_not_found"
    assert "known: auto, cheap-500, mid, big, drops-midfail, params-echo" in info.value.message
    assert sink.records[-1].status_code == 404


async def test_lambda_from_body_header_and_range() -> None:
    principal = Principal(key_id=1, key_name="k", key_prefix="sk-k", default_lambda=0.2, lambda_min=0.1,
                          lambda_max=1.0)
    svc, _, _ = make_service(principal)
    assert (await svc.complete(req(), CTX)).body["uniroute"]["lambda"] == 0.2
    assert (await svc.complete(req(uniroute={"lambda": 0.5}), CTX)).body["uniroute"]["lambda"] == 0.5
    hdr = ChatContext(request_id="r", lambda_header="0.7")
    assert (await svc.complete(req(), hdr)).body["uniroute"]["lambda"] == 0.7
    assert (await svc.complete(req(uniroute={"lambda": 0.3}), hdr)).body["uniroute"]["lambda"] == 0.3
    with pytest.raises(InvalidRequestError, match=r"\[0.1, 1.0\]") as info:
        await svc.complete(req(uniroute={"lambda": 5}), CTX)
    assert info.value.param == "uniroute.lambda"
    with pytest.raises(InvalidRequestError, match="x-uniroute-lambda"):
        await svc.complete(req(), ChatContext(request_id="r", lambda_header="lots"))


async def test_allowed_models() -> None:
    principal = Principal(key_id=1, key_name="k", key_prefix="", default_lambda=0.1,
                          allowed_models=frozenset({"big"}))
    svc, _, _ = make_service(principal)
    assert (await svc.complete(req(), CTX)).model == "big"
    with pytest.raises(PermissionDeniedError):
        await svc.complete(req(model="mid"), CTX)


async def test_stream_relays_and_puts_uniroute_on_last_chunk() -> None:
    svc, sink, budget = make_service()
    st = await svc.stream(req(stream=True), CTX)
    assert st.model == "mid"
    chunks = [c async for c in st.chunks]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "echo: hi"
    assert all(c["model"] == "mid" for c in chunks)
    assert all("uniroute" not in c for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop"  # no usage asked: the finish chunk carries it
    assert all("usage" not in c for c in chunks)
    ext = last["uniroute"]
    assert ext["model"] == "mid" and ext["cost_usd"] > 0 and len(ext["attempts"]) == 2
    assert sink.records[-1].cost_usd == ext["cost_usd"] and sink.records[-1].stream
    assert budget.settled[-1] == ext["cost_usd"]


async def test_stream_include_usage() -> None:
    svc, _, _ = make_service()
    st = await svc.stream(req(model="big", stream=True, stream_options={"include_usage": True}), CTX)
    chunks = [c async for c in st.chunks]
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0 and "cost" not in last["usage"]
    assert last["uniroute"]["cost_usd"] > 0


async def test_stream_failing_mid_way_ends_with_error() -> None:
    svc, sink, _ = make_service()
    st = await svc.stream(req(model="drops-midfail", stream=True), CTX)
    chunks = [c async for c in st.chunks]
    assert chunks[0]["choices"][0]["delta"]["content"] == "echo:"
    assert chunks[-1]["error"]["type"] == "upstream_error"
    assert sink.records[-1].status_code == 502


async def test_stream_errors_before_first_chunk_raise() -> None:
    svc, sink, _ = make_service()
    with pytest.raises(UpstreamError):
        await svc.stream(req(model="cheap-500", stream=True), CTX)
    assert sink.records[-1].status_code == 502 and sink.records[-1].attempts[0]["status"] == 502


@pytest.mark.parametrize("consume", [0, 2])
async def test_stream_closed_early_is_logged_and_settled(consume: int) -> None:
    svc, sink, budget = make_service()
    st = await svc.stream(req(model="big", stream=True), CTX)
    for _ in range(consume):
        await st.chunks.__anext__()
    n_before = len(sink.records)
    await st.aclose()
    await st.aclose()  # idempotent
    assert len(sink.records) == n_before + 1
    rec = sink.records[-1]
    assert rec.status_code == 499 and rec.error_type == "client_disconnected"
    # the partial usage: prompt tokens of the messages, completion tokens of what was relayed (none when the client
    # read nothing), priced at 1 and 2 USD per 1M tokens; the budget is settled with it
    assert rec.prompt_tokens and rec.prompt_tokens > 0
    assert rec.completion_tokens is not None and (rec.completion_tokens > 0) == (consume > 0)
    assert rec.cost_usd == pytest.approx((rec.prompt_tokens * 1.0 + rec.completion_tokens * 2.0) / 1e6)
    assert budget.settled[-1] == pytest.approx(rec.cost_usd) and len(budget.settled) == len(budget.reserved)


async def test_standard_parameters_reach_the_backend(fake_upstream_url: str) -> None:
    svc, _, _ = make_service(base_url=fake_upstream_url)
    params: dict[str, Any] = {
        "temperature": 0.3, "top_p": 0.9, "max_tokens": 12, "max_completion_tokens": 13, "stop": ["END"], "n": 2,
        "seed": 7, "user": "u-1", "logprobs": True, "top_logprobs": 2, "frequency_penalty": 0.5,
        "presence_penalty": -0.5, "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
    }
    res = await svc.complete(req(model="params-echo", uniroute={"lambda": 0.2}, **params), CTX)
    import json

    got = json.loads(res.body["choices"][0]["message"]["content"])
    for key, value in params.items():
        assert got.get(key) == value, key
    assert set(got) == {*params, "model"}  # nothing of the gateway's own (uniroute, prices, retries) leaks
