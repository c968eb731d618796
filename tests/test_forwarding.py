"""Forwarding through LiteLLM to a real small upstream on loopback (tests/fake_upstream.py, one server per
session: the ``fake_upstream_url`` fixture); no mocks."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
)
from gateway.serving.forwarding import (
    HTTP_CLIENTS,
    Attempt,
    Forwarder,
    HttpClientKind,
    LiteLLMUpstream,
    map_exception,
    provider_message,
)
from gateway.serving.registry import ModelEntry, Registry
from tests.fake_upstream import PROVIDER_MESSAGE
from tests.procs import connect_without_waiting

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def base_url(fake_upstream_url: str) -> str:
    return fake_upstream_url


def entry(base_url: str, name: str, *, upstream: str | None = None, timeout_s: float = 5.0) -> ModelEntry:
    return ModelEntry(name=name, litellm_params={"model": f"openai/{upstream or name}", "api_base": base_url,
                                                 "api_key": "test"},
                      input_cost_per_token=1e-6, output_cost_per_token=2e-6, router_cost=1.0, timeout_s=timeout_s)


def forwarder(*entries: ModelEntry, max_attempts: int = 3, http_client: HttpClientKind = "aiohttp") -> Forwarder:
    fw = Forwarder(max_attempts=max_attempts, upstream=LiteLLMUpstream(http_client=http_client))
    Registry(entries).on_replace(fw.register)
    return fw


async def test_complete_returns_response_and_cost(base_url: str) -> None:
    ok = entry(base_url, "ok")
    done = await forwarder(ok).complete([ok], MSG, {"temperature": 0.5, "max_tokens": 7})
    assert done.entry is ok
    assert done.response.choices[0].message.content == 'echo: hello there {"max_tokens": 7, "temperature": 0.5}'
    usage = done.response.usage
    assert done.cost_usd == pytest.approx(usage.prompt_tokens * 1e-6 + usage.completion_tokens * 2e-6)
    assert [a.status for a in done.attempts] == [200]


@pytest.mark.parametrize(
    ("name", "error", "needle"),
    [
        ("m-500", UpstreamError, PROVIDER_MESSAGE),
        ("m-429", UpstreamRateLimitError, "slow down"),
        ("m-400", InvalidRequestError, "this provider rejects the request"),
    ],
)
async def test_provider_errors_are_mapped(base_url: str, name: str, error: type[GatewayError], needle: str) -> None:
    e = entry(base_url, name)
    with pytest.raises(error) as info:
        await forwarder(e).complete([e], MSG, {})
    assert needle in info.value.message
    assert "Traceback" not in info.value.message and "litellm." not in info.value.message


async def test_timeout_is_504(base_url: str) -> None:
    e = entry(base_url, "m-slow", timeout_s=0.5)
    with pytest.raises(UpstreamTimeoutError) as info:
        await forwarder(e).complete([e], MSG, {})
    assert info.value.status_code == 504


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
async def test_connection_error_is_502(http_client: HttpClientKind) -> None:
    e = ModelEntry(name="down", litellm_params={"model": "openai/down", "api_base": "http://127.0.0.1:9/v1",
                                                "api_key": "k"},
                   input_cost_per_token=0, output_cost_per_token=0, router_cost=1, timeout_s=2)
    fw = forwarder(e, http_client=http_client)
    for call in (fw.complete, fw.open_stream):
        with pytest.raises(UpstreamError) as info:  # refused: a connection error, not a timeout
            await call([e], MSG, {})
        assert info.value.status_code == 502 and "down" in info.value.message
        assert "timed out" not in info.value.message
    await fw.aclose()


@pytest.mark.parametrize("http_client", HTTP_CLIENTS)
async def test_http_clients_carry_the_same_answers_and_timeouts(base_url: str, http_client: HttpClientKind) -> None:
    ok, slow = entry(base_url, "ok"), entry(base_url, "m-slow", timeout_s=0.5)
    fw = forwarder(ok, slow, http_client=http_client)
    done = await fw.complete([ok], MSG, {"max_tokens": 7})
    assert done.response.choices[0].message.content == 'echo: hello there {"max_tokens": 7}'
    opened = await fw.open_stream([ok], MSG, {"stream_options": {"include_usage": True}})
    usage = [c.usage async for c in opened.rest if getattr(c, "usage", None)]
    assert usage and usage[-1].completion_tokens > 0
    with pytest.raises(UpstreamTimeoutError):
        await fw.complete([slow], MSG, {})
    assert isinstance(fw.upstream, LiteLLMUpstream)
    bounded = fw.upstream._call_kwargs(ok)["client"]._client._transport
    assert type(bounded).__name__ == "BoundedTransport"  # responses bounded in bytes (gateway/serving/bounded.py)
    transport = type(bounded.inner).__name__
    assert ("Aiohttp" in transport) == (http_client == "aiohttp")
    await fw.aclose()


def test_unknown_http_client_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown http_client 'curl'; valid: aiohttp, httpx"):
        LiteLLMUpstream(http_client="curl")  # type: ignore[arg-type]


async def test_falls_back_down_the_ranking_and_records_attempts(base_url: str) -> None:
    bad, limited, ok = entry(base_url, "a-500"), entry(base_url, "b-429"), entry(base_url, "ok")
    attempts: list[Attempt] = []
    done = await forwarder(bad, limited, ok).complete([bad, limited, ok], MSG, {}, attempts)
    assert done.entry is ok
    assert [(a.model, a.status) for a in attempts] == [("a-500", 502), ("b-429", 429), ("ok", 200)]


async def test_no_fallback_on_rejected_request(base_url: str) -> None:
    rejected, ok = entry(base_url, "a-400"), entry(base_url, "ok")
    attempts: list[Attempt] = []
    with pytest.raises(InvalidRequestError):
        await forwarder(rejected, ok).complete([rejected, ok], MSG, {}, attempts)
    assert [a.model for a in attempts] == ["a-400"]


async def test_max_attempts_bounds_fallback(base_url: str) -> None:
    a, b, ok = entry(base_url, "a-500"), entry(base_url, "b-500"), entry(base_url, "ok")
    attempts: list[Attempt] = []
    with pytest.raises(UpstreamError) as info:
        await forwarder(a, b, ok, max_attempts=2).complete([a, b, ok], MSG, {}, attempts)
    assert [x.model for x in attempts] == ["a-500", "b-500"]
    assert "tried: a-500 (502), b-500 (502)" in info.value.message


async def test_stream_falls_back_before_first_chunk_and_costs(base_url: str) -> None:
    bad, ok = entry(base_url, "a-500"), entry(base_url, "ok")
    fw = forwarder(bad, ok)
    attempts: list[Attempt] = []
    opened = await fw.open_stream([bad, ok], MSG, {"stream_options": {"include_usage": True}}, attempts)
    assert opened.entry is ok and [x.status for x in attempts] == [502, 200]
    text = opened.first.choices[0].delta.content or ""
    usage: Any = None
    async for chunk in opened.rest:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage
    assert text == "echo: hello there"
    cost = fw.stream_cost(ok, usage)
    assert cost == pytest.approx(usage.prompt_tokens * 1e-6 + usage.completion_tokens * 2e-6)


async def test_stream_timeout_before_first_chunk(base_url: str) -> None:
    slow = entry(base_url, "m-slow", timeout_s=0.5)
    with pytest.raises(UpstreamTimeoutError):
        await forwarder(slow).open_stream([slow], MSG, {})


def test_provider_message_strips_litellm_prefixes() -> None:
    exc = RuntimeError("litellm.InternalServerError: InternalServerError: OpenAIException - boom happened")
    assert provider_message(exc) == "boom happened"
    assert isinstance(map_exception(exc, "m"), UpstreamError)


def test_prices_registered_with_litellm(base_url: str) -> None:
    import litellm

    forwarder(entry(base_url, "priced-model"))
    info = litellm.model_cost["openai/priced-model"]
    assert info["input_cost_per_token"] == pytest.approx(1e-6)
    assert info["output_cost_per_token"] == pytest.approx(2e-6)


async def test_openai_entries_share_one_fast_client_per_base_and_key(base_url: str) -> None:
    a, b = entry(base_url, "good-a", upstream="good"), entry(base_url, "good-b", upstream="good")
    other = ModelEntry(name="other-key", litellm_params={"model": "openai/good", "api_base": base_url, "api_key": "k2"},
                       input_cost_per_token=0, output_cost_per_token=0, router_cost=1, timeout_s=2)
    fw = forwarder(a, b, other)
    assert isinstance(fw.upstream, LiteLLMUpstream)
    ca, cb, co = (fw.upstream._call_kwargs(e).get("client") for e in (a, b, other))
    assert ca is not None and ca is cb and co is not None and co is not ca
    done = await fw.complete([a], MSG, {})
    assert done.response.choices[0].message.content
    stream = await fw.open_stream([b], MSG, {"stream_options": {"include_usage": True}})
    usage = None
    async for chunk in stream.rest:
        usage = getattr(chunk, "usage", None) or usage
    assert usage is not None and fw.stream_cost(b, usage) == pytest.approx(
        usage.prompt_tokens * 1e-6 + usage.completion_tokens * 2e-6)
    await fw.aclose()


def test_fast_client_parses_like_the_sdk_and_falls_back_on_off_spec_data() -> None:
    from openai.types.chat import ChatCompletionChunk

    from gateway.serving.forwarding import _fast_client_class

    client = _fast_client_class()(base_url="http://127.0.0.1:9/v1", api_key="x", max_retries=0)
    good = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}], "extra_field": 1}
    fast = client._process_response_data(data=good, cast_to=ChatCompletionChunk, response=None)
    assert isinstance(fast, ChatCompletionChunk) and fast.choices[0].delta.content == "hi"
    off_spec = {**good, "created": "not-a-number"}  # the SDK's lenient construct keeps it
    lenient = client._process_response_data(data=off_spec, cast_to=ChatCompletionChunk, response=None)
    assert isinstance(lenient, ChatCompletionChunk) and lenient.created == "not-a-number"


async def test_raw_openai_stream_carries_what_litellms_wrapper_does(base_url: str) -> None:
    e = entry(base_url, "good")
    seen: dict[bool, tuple[str, Any, str]] = {}
    for raw in (False, True):
        fw = Forwarder(upstream=LiteLLMUpstream(raw_openai_streams=raw))
        Registry([e]).on_replace(fw.register)
        opened = await fw.open_stream([e], MSG, {"stream_options": {"include_usage": True}})
        text, usage, finish = "", None, ""
        chunk: Any = opened.first
        while True:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            usage = getattr(chunk, "usage", None) or usage
            try:
                chunk = await opened.rest.__anext__()
            except StopAsyncIteration:
                break
        assert usage is not None
        seen[raw] = (text, (usage.prompt_tokens, usage.completion_tokens), finish)
        await fw.aclose()
    assert seen[True] == seen[False] and seen[True][0]


async def test_cooldown_routes_around_a_failing_model(base_url: str) -> None:
    from gateway.serving.cooldown import Cooldowns

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    bad, ok = entry(base_url, "a-500"), entry(base_url, "ok")
    fw = Forwarder(max_attempts=3, cooldowns=Cooldowns(2, 60, 30, clock=clock))
    Registry([bad, ok]).on_replace(fw.register)
    for _ in range(2):  # two failures: both requests fall back
        attempts: list[Attempt] = []
        await fw.complete([bad, ok], MSG, {}, attempts)
        assert [a.model for a in attempts] == ["a-500", "ok"]
    attempts = []
    done = await fw.complete([bad, ok], MSG, {}, attempts)  # a-500 is cooling: straight to ok
    assert done.entry is ok and [a.model for a in attempts] == ["ok"]
    opened = await fw.open_stream([bad, ok], MSG, {}, attempts := [])
    assert opened.entry is ok and [a.model for a in attempts] == ["ok"]
    async for _ in opened.rest:
        pass
    clock.now += 31  # the cooldown is over: a-500 is tried again first
    attempts = []
    await fw.complete([bad, ok], MSG, {}, attempts)
    assert [a.model for a in attempts] == ["a-500", "ok"]


async def test_rejected_request_does_not_cool_the_model(base_url: str) -> None:
    from gateway.serving.cooldown import Cooldowns

    rejected, ok = entry(base_url, "a-400"), entry(base_url, "ok")
    cooldowns = Cooldowns(1, 60, 30)
    fw = Forwarder(max_attempts=3, cooldowns=cooldowns)
    Registry([rejected, ok]).on_replace(fw.register)
    with pytest.raises(InvalidRequestError):
        await fw.complete([rejected, ok], MSG, {})
    assert not cooldowns.cooling("a-400")


async def test_429_retry_after_sets_the_cooldown(base_url: str) -> None:
    from gateway.serving.cooldown import Cooldowns

    limited = entry(base_url, "b-429")
    cooldowns = Cooldowns(1, 60, 1)
    fw = Forwarder(max_attempts=1, cooldowns=cooldowns)
    Registry([limited]).on_replace(fw.register)
    with pytest.raises(UpstreamRateLimitError) as info:
        await fw.complete([limited], MSG, {})
    assert info.value.retry_after == 7 and info.value.headers["retry-after"] == "7"
    assert cooldowns._cooling["b-429"] - cooldowns.clock() > 6  # at least the provider's Retry-After


# -- per-model timeouts: connect, first token, whole stream ----------------------------------------------


def _timed(base_url: str, name: str, **timeouts: float) -> ModelEntry:
    import dataclasses

    others: dict[str, Any] = timeouts  # the ModelEntry fields named in the call (mypy checks **dict against each)
    return dataclasses.replace(entry(base_url, name, timeout_s=timeouts.pop("timeout_s", 10.0)), **others)


@contextlib.contextmanager
def _listener_that_never_accepts() -> Iterator[str]:
    """A listening socket whose accept queue is full: the kernel drops further SYNs, so connect() hangs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = connect_without_waiting(port, 3)
    time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        for c in fillers:
            c.close()
        srv.close()


async def test_connect_timeout_gives_up_fast_and_falls_back(base_url: str) -> None:
    with _listener_that_never_accepts() as dead:
        stuck = dataclasses.replace(entry(dead, "stuck", timeout_s=30.0), connect_timeout_s=0.5)
        ok = entry(base_url, "ok")
        attempts: list[Attempt] = []
        t0 = time.monotonic()
        done = await forwarder(stuck, ok).complete([stuck, ok], MSG, {}, attempts)
        assert done.entry is ok
        assert [(a.model, a.error_type) for a in attempts] == [("stuck", "timeout"), ("ok", None)]
        assert 0.4 < attempts[0].latency_ms / 1000 < 3.0 and time.monotonic() - t0 < 5  # not timeout_s = 30


@pytest.mark.parametrize("upstream", ["m-slow", "m-slowfirst"])  # hangs before headers / headers, then a slow chunk
async def test_first_token_timeout_on_streams_falls_back(base_url: str, upstream: str) -> None:
    slow = _timed(base_url, upstream, timeout_s=10.0, first_token_timeout_s=0.5)
    ok = entry(base_url, "ok")
    attempts: list[Attempt] = []
    t0 = time.monotonic()
    opened = await forwarder(slow, ok).open_stream([slow, ok], MSG, {}, attempts)
    assert opened.entry is ok and time.monotonic() - t0 < 8  # not timeout_s = 10 (+ the fallback's own time)
    assert attempts[0].status == 504 and attempts[0].error_type == "timeout"
    assert 0.45 < attempts[0].latency_ms / 1000 < 1.5
    async for _ in opened.rest:
        pass
    with pytest.raises(UpstreamTimeoutError, match="first_token_timeout_s"):
        await forwarder(slow).open_stream([slow], MSG, {})
    if upstream == "m-slowfirst":  # a first token within the limit is fine
        patient = _timed(base_url, upstream, timeout_s=10.0, first_token_timeout_s=4.0)
        opened = await forwarder(patient).open_stream([patient], MSG, {})
        assert opened.entry is patient
        await opened.rest.aclose()  # type: ignore[attr-defined]


def test_timeout_defaults() -> None:
    e = entry("http://x/v1", "m", timeout_s=60.0)
    assert e.connect_timeout == 5.0 and e.first_token_timeout == 60.0
    short = entry("http://x/v1", "m", timeout_s=2.0)
    assert short.connect_timeout == 2.0  # never beyond the whole call's timeout


async def test_litellm_switches_change_neither_the_request_nor_the_answer(base_url: str) -> None:
    """``skip_litellm_cost`` and ``pass_provider`` (CPU savings) send the same request body, model name included,
    and give the same answer and usage, non-streaming and streaming, as with both off."""
    e, s = entry(base_url, "sw-echo"), entry(base_url, "sw")  # -echo answers the request's JSON (not streamed)
    seen: dict[bool, tuple[Any, ...]] = {}
    for on in (False, True):
        up = LiteLLMUpstream(skip_litellm_cost=on, pass_provider=on)
        fw = Forwarder(upstream=up)
        Registry([e, s]).on_replace(fw.register)
        assert up._call_kwargs(e).get("custom_llm_provider") == ("openai" if on else None)
        done = await fw.complete([e], MSG, {"temperature": 0.5, "user": "u1"})
        body = done.response.choices[0].message.content
        opened = await fw.open_stream([s], MSG, {"stream_options": {"include_usage": True}})
        chunks = [opened.first] + [c async for c in opened.rest]
        text = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
        usage = next(c.usage for c in reversed(chunks) if getattr(c, "usage", None))
        seen[on] = (body, done.response.usage.prompt_tokens, done.response.usage.completion_tokens, done.cost_usd,
                    text, usage.prompt_tokens, usage.completion_tokens)
        await fw.aclose()
    assert seen[True] == seen[False]
    assert '"model": "sw-echo"' in seen[True][0] and '"user": "u1"' in seen[True][0]


def test_provider_passed_only_when_the_prefix_is_a_litellm_provider(base_url: str) -> None:
    up = LiteLLMUpstream()
    vllm = ModelEntry(name="v", litellm_params={"model": "hosted_vllm/org/m", "api_base": base_url},
                      input_cost_per_token=0, output_cost_per_token=0, router_cost=1, timeout_s=2)
    named = ModelEntry(name="n", litellm_params={"model": "some-org/m", "api_base": base_url},
                       input_cost_per_token=0, output_cost_per_token=0, router_cost=1, timeout_s=2)
    given = ModelEntry(name="g", litellm_params={"model": "org/m", "custom_llm_provider": "openai",
                                                 "api_base": base_url},
                       input_cost_per_token=0, output_cost_per_token=0, router_cost=1, timeout_s=2)
    Registry([vllm, named, given]).on_replace(up.register)
    assert up._call_kwargs(vllm)["custom_llm_provider"] == "hosted_vllm"
    assert up._call_kwargs(vllm)["model"] == "hosted_vllm/org/m"
    assert "custom_llm_provider" not in up._call_kwargs(named)  # a model name with a slash, not a provider
    assert up._call_kwargs(given)["custom_llm_provider"] == "openai"


async def test_litellm_cost_is_skipped_in_the_gateways_calls_only(base_url: str) -> None:
    """LiteLLM's own response cost (in ``_hidden_params``, unused by the gateway) is not computed during the
    gateway's calls with ``skip_litellm_cost``; it is computed as before with it off and for any other caller."""
    import litellm

    e = entry(base_url, "costly")
    costs: dict[str, Any] = {}
    for skip in (False, True):
        up = LiteLLMUpstream(skip_litellm_cost=skip)
        Registry([e]).on_replace(up.register)
        response = await up.complete(e, MSG, {})
        costs[f"skip={skip}"] = response._hidden_params.get("response_cost")
        await up.aclose()
    direct = await litellm.acompletion(model="openai/costly", messages=MSG, api_base=base_url, api_key="test",
                                       input_cost_per_token=1e-6, output_cost_per_token=2e-6)
    usage = direct.usage
    assert costs["skip=True"] is None
    assert costs["skip=False"] == pytest.approx(usage.prompt_tokens * 1e-6 + usage.completion_tokens * 2e-6)
    assert direct._hidden_params["response_cost"] == pytest.approx(costs["skip=False"])
