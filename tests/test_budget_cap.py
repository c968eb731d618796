"""A budget is a hard cap (issue 10, row 1 and 3 and 12; docs/security/budgets.md), tried as a hostile tenant
would, on SQLite and PostgreSQL.

The chat service runs in process with the real budget guard (:class:`SqlBudgetGuard`) and request-log writer
on a real database, over :class:`BillingUpstream`: an in-memory provider that bills known tokens (what a
provider would: the prompt as its own tokenizer counts it, every tool, and what it generated) and
misbehaves on demand — streams without a usage chunk, usage that lies (negative, absurd), a cheap model
that fails so ``auto`` falls back to a dearer one, answers as long as the model allows when no
``max_tokens`` is sent. Clients disconnect mid-stream.

The property (random mixes of those, seeded): a key's settled spend never exceeds its budget by more than
the true cost of one request per request in flight; nothing is charged a negative or absurd amount; every
answered request has its row, the rows' costs are the charges, and no reservation stays held. The same mix
runs again with the store cut during one random wave (PostgreSQL through the TCP proxy of
tests/test_store_outage_e2e.py, SQLite by another connection holding the write lock), the service's store with
short waits (a 0.2 s SQLite busy timeout, a 0.3 s settle timeout) and the reservation keeper running: the same
property once the store is back. tests/test_budget_cap_kill.py runs it through `uniroute serve` killed with -9.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from gateway.access.auth import create_key, principal_from_row
from gateway.access.budget import SqlBudgetGuard, period_starts
from gateway.access.reservations import ReservationKeeper
from gateway.config import GatewayConfig, parse_config
from gateway.errors import BudgetExceededError, GatewayError, StoreUnavailableError
from gateway.metrics import Metrics
from gateway.protocol import parse_chat_request
from gateway.serving.estimate import count_text
from gateway.serving.forwarding import Forwarder
from gateway.serving.interfaces import OpenAuthenticator, Principal
from gateway.serving.registry import ModelEntry, Registry
from gateway.serving.service import ChatContext, ChatService
from gateway.store.engine import Store
from gateway.store.requestlog import RequestLogWriter
from gateway.store.tables import ApiKey, RequestRow, ReservationRow, utcnow
from routing.policy import CheapestPolicy
from tests.fake_upstream import ProviderError
from tests.storeutil import database, store_fixture
from tests.test_store_outage_e2e import Cut

#: the fake provider's own limit on an answer when the request sets no max_tokens (above the gateway's default)
PROVIDER_MAX_OUTPUT = 6000
CONCURRENCY = 4
MODELS: list[dict[str, Any]] = [
    # `auto` ranks by router cost: the cheap one fails (500), so every `auto` request falls back to `dear`
    {"name": "cheap-500", "router_cost": 1.0, "input_cost_per_1m": 0.5, "output_cost_per_1m": 1.0},
    {"name": "dear", "router_cost": 5.0, "input_cost_per_1m": 5.0, "output_cost_per_1m": 20.0,
     "max_output_tokens": 3000},
    {"name": "plain", "router_cost": 2.0, "input_cost_per_1m": 1.0, "output_cost_per_1m": 4.0, "routable": False},
]


@dataclass
class Billed:
    """What the provider really billed for one request."""

    model: str
    prompt_tokens: int
    completion_tokens: int = 0

    def usd(self, registry: Registry) -> float:
        e = registry.get(self.model)
        assert e is not None
        return self.prompt_tokens * e.input_cost_per_token + self.completion_tokens * e.output_cost_per_token


class BillingUpstream:
    """A gateway ``Upstream`` that bills known tokens. The request's behaviour rides in its first (system)
    message as JSON: ``{"rid", "wanted", "lie", "usage"}`` — how many tokens it would like to answer, whether
    its usage lies (``neg``/``huge``) and whether a stream sends its usage chunk."""

    def __init__(self, latency_s: tuple[float, float] = (0.001, 0.001)) -> None:
        self.billed: dict[str, Billed] = {}
        self.latency_s = latency_s  # how long the provider works on an answer (uniform in this range)

    def register(self, snapshot: Any) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def call(self, entry: ModelEntry, endpoint: str, payload: Mapping[str, Any], stream: bool) -> Any:
        raise NotImplementedError(f"the billing upstream serves chat only, not {endpoint}")

    @staticmethod
    def _name(entry: ModelEntry) -> str:
        return entry.name

    def _bill(self, entry: ModelEntry, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> tuple[dict[str, Any], int, int]:
        if entry.name.endswith("-500"):
            raise ProviderError(500, "provider on fire")
        how = json.loads(messages[0]["content"])
        text = json.dumps(messages) + json.dumps(params.get("tools") or [])
        # a provider's tokenizer may count 20% more than LiteLLM's, plus its chat template and tool prompt
        prompt = math.ceil((count_text("openai/gpt-4o", text) or 0) * 1.2) + 6 * len(messages)
        prompt += 300 if params.get("tools") else 0
        limit = params.get("max_completion_tokens") or params.get("max_tokens")
        limit = min(int(limit), PROVIDER_MAX_OUTPUT) if limit else PROVIDER_MAX_OUTPUT
        if entry.max_output_tokens is not None:
            limit = min(limit, entry.max_output_tokens)
        out = min(int(how["wanted"]), limit) * int(params.get("n") or 1)
        self.billed[how["rid"]] = Billed(entry.name, prompt, 0)
        return how, prompt, out

    @staticmethod
    def _usage(how: dict[str, Any], prompt: int, out: int) -> dict[str, int]:
        if how["lie"] == "neg":
            return {"prompt_tokens": -prompt * 1000, "completion_tokens": -5, "total_tokens": -1}
        if how["lie"] == "huge":
            return {"prompt_tokens": 10**12, "completion_tokens": 10**12, "total_tokens": 2 * 10**12}
        return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}

    async def complete(self, entry: ModelEntry, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> Any:
        from openai.types.chat import ChatCompletion

        how, prompt, out = self._bill(entry, messages, params)
        self.billed[how["rid"]].completion_tokens = out
        await asyncio.sleep(random.uniform(*self.latency_s))
        body: dict[str, Any] = {
            "id": "chatcmpl-b", "object": "chat.completion", "created": 0, "model": entry.name,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": ("a" + " a" * (out - 1)) if out else ""}}]}
        if how["usage"]:
            body["usage"] = self._usage(how, prompt, out)
        return ChatCompletion.model_validate(body)

    async def stream(self, entry: ModelEntry, messages: list[dict[str, Any]],
                     params: Mapping[str, Any]) -> AsyncIterator[Any]:
        how, prompt, out = self._bill(entry, messages, params)
        return self._chunks(entry.name, how, prompt, out)

    async def _chunks(self, model: str, how: dict[str, Any], prompt: int, out: int) -> AsyncIterator[Any]:
        from openai.types.chat import ChatCompletionChunk

        base = {"id": "chatcmpl-b", "object": "chat.completion.chunk", "created": 0, "model": model}
        billed = self.billed[how["rid"]]
        await asyncio.sleep(random.uniform(*self.latency_s))
        sent = 0
        while sent < out:
            k = min(200, out - sent)
            billed.completion_tokens += k  # billed as generated, whether or not the client reads it
            yield ChatCompletionChunk.model_validate({**base, "choices": [
                {"index": 0, "delta": {"content": " a" * k}, "finish_reason": None}]})
            sent += k
            await asyncio.sleep(0)
        yield ChatCompletionChunk.model_validate({**base, "choices": [{"index": 0, "delta": {},
                                                                       "finish_reason": "stop"}]})
        if how["usage"]:
            yield ChatCompletionChunk.model_validate({**base, "choices": [], "usage": self._usage(how, prompt, out)})


def big_tools(rng: random.Random, total_bytes: int) -> list[dict[str, Any]]:
    words = ["city", "forecast", "temperature", "humidity", "wind", "pressure", "tomorrow", "region", "units"]
    tools: list[dict[str, Any]] = []
    size = 0
    while size < total_bytes:
        desc = " ".join(rng.choice(words) for _ in range(300))
        tool = {"type": "function", "function": {"name": f"tool_{len(tools)}", "description": desc,
                                                 "parameters": {"type": "object", "properties": {
                                                     "q": {"type": "string", "description": desc}}}}}
        size += len(json.dumps(tool))
        tools.append(tool)
    return tools


@dataclass
class Env:
    service: ChatService
    upstream: BillingUpstream
    registry: Registry
    store: Store
    writer: RequestLogWriter
    principal: Principal


store = store_fixture(pool_size=10, max_overflow=20)


def billing_config(models: list[dict[str, Any]]) -> GatewayConfig:
    """A config serving ``models`` (name, router cost, prices) through an OpenAI-compatible provider name
    LiteLLM does not know, so that only the registry's prices apply (the billing upstream answers)."""
    return parse_config({"models": [{**m, "litellm_params": {"model": f"openai/unknown-{m['name']}", "api_key": "t"}}
                                    for m in models]})


@pytest.fixture
def env(store: Store, tmp_path: Path) -> Iterator[Callable[[float], Env]]:
    def env_for(budget: float) -> Env:
        cfg = billing_config(MODELS)
        registry = Registry.from_config(cfg)
        upstream = BillingUpstream()
        fw = Forwarder(max_attempts=3, upstream=upstream)
        registry.on_replace(fw.register)
        _raw, row = create_key(store, "tenant", default_lambda=0.1, budget_usd=budget)
        principal = principal_from_row(row)
        guard = SqlBudgetGuard(store)
        writer = RequestLogWriter(store, flush_interval_s=0.05, spill_dir=tmp_path / "spill", holder=guard.holder,
                                  period_starts=lambda: period_starts(utcnow()))
        writer.start()
        made.append(writer)
        service = ChatService(registry, CheapestPolicy(), fw, authenticator=OpenAuthenticator(principal),
                              budget=guard, sink=writer)
        return Env(service, upstream, registry, store, writer, principal)

    made: list[RequestLogWriter] = []
    yield env_for
    for w in made:
        w.close(5.0)


def _key(store: Store, key_id: int | None) -> ApiKey:
    with store.sessions() as s:
        row = s.get(ApiKey, key_id)
    assert row is not None
    return row


def _rows(store: Store) -> dict[str, RequestRow]:
    with store.sessions() as s:
        return {r.request_id: r for r in s.scalars(sa.select(RequestRow))}


def _held(store: Store) -> int:
    with store.sessions() as s:
        return len(s.scalars(sa.select(ReservationRow).where(ReservationRow.released_at.is_(None))).all())


def _request(rng: random.Random, rid: str) -> tuple[dict[str, Any], str]:
    """A random hostile payload and how to consume it: ('complete' | 'stream' | 'disconnect')."""
    how = {"rid": rid, "wanted": rng.choice([1, 50, 800, 3500, 5500]), "lie": rng.choice([None, None, "neg", "huge"]),
           "usage": rng.random() > 0.3}
    body: dict[str, Any] = {
        "model": rng.choice(["auto", "plain"]),
        "messages": [{"role": "system", "content": json.dumps(how)},
                     {"role": "user", "content": "tell me " * rng.choice([1, 10, 3000])}],
    }
    if rng.random() < 0.5:
        body["tools"] = big_tools(rng, rng.choice([20_000, 200_000]))
    max_tokens = rng.choice([None, None, 1, 1, 300, 4000])
    if max_tokens is not None:
        body[rng.choice(["max_tokens", "max_completion_tokens"])] = max_tokens
    if rng.random() < 0.2:
        body["n"] = 2
    mode = rng.choice(["complete", "stream", "stream", "disconnect"])
    return body, mode


async def _run(e: Env, body: dict[str, Any], mode: str, rid: str, after_s: float = 0.0) -> bool:
    """Send one request (``after_s`` from now); True if it was answered (a response or an opened stream)."""
    await asyncio.sleep(after_s)
    req = parse_chat_request(body)
    ctx = ChatContext(request_id=rid, body_bytes=len(json.dumps(body)))
    try:
        if mode == "complete":
            await e.service.complete(req, ctx)
            return True
        st = await e.service.stream(req, ctx)
    except BudgetExceededError as exc:
        assert "max_tokens" in exc.message and "remains" in exc.message, exc.message
        return False
    try:
        n = 0
        async for _chunk in st.chunks:
            n += 1
            if mode == "disconnect" and n >= 2:
                break
    finally:
        await st.aclose()
    return True


@pytest.mark.parametrize("seed", [1, 2])
async def test_spend_never_exceeds_the_budget_by_more_than_the_requests_in_flight(env: Callable[[float], Env], seed: int) -> None:
    rng = random.Random(seed)
    budget = 0.1
    e: Env = env(budget)
    answered: list[str] = []
    for wave in range(10):
        rids = [f"req-{seed}-{wave}-{i}" for i in range(CONCURRENCY)]
        payloads = [_request(rng, rid) for rid in rids]
        results = await asyncio.gather(*(_run(e, b, m, rid) for (b, m), rid in zip(payloads, rids, strict=True)),
                                       return_exceptions=True)
        for rid, res in zip(rids, results, strict=True):
            if isinstance(res, BaseException):
                assert isinstance(res, GatewayError) and not isinstance(res, BudgetExceededError), repr(res)
            elif res:
                answered.append(rid)
    assert e.writer.flush(10.0)
    assert answered and len(answered) < 40  # some were served, the cap refused others
    await _check_the_property(e, e.store, budget, answered)
    rows = await asyncio.to_thread(_rows, e.store)
    assert any(r.usage_corrected for r in rows.values())  # the lies were seen and flagged


async def _check_the_property(e: Env, store: Store, budget: float, answered: list[str]) -> None:
    """The cap, the rows, nothing held (read through ``store``, which sees the database whatever ``e``'s sees)."""
    key = await asyncio.to_thread(_key, store, e.principal.key_id)
    true = {rid: b.usd(e.registry) for rid, b in e.upstream.billed.items()}
    one = max(true.values())
    # the cap: at most one request's true cost over the budget per request in flight
    assert key.spend_usd <= budget + CONCURRENCY * one + 1e-9, (key.spend_usd, budget, one)
    assert key.reserved_usd == pytest.approx(0.0, abs=1e-9) and await asyncio.to_thread(_held, store) == 0
    rows = await asyncio.to_thread(_rows, store)
    missing = [rid for rid in answered if rid not in rows]
    assert not missing, f"answered without a row: {missing}"
    charged = [r.cost_usd or 0.0 for r in rows.values()]
    assert all(c >= 0.0 for c in charged)
    for rid in answered:  # never a lie's $1,000,000 nor a negative charge; the answer is charged
        cost = rows[rid].cost_usd or 0.0
        assert cost <= 2 * true[rid] + 1e-6, (rid, cost, true[rid])
        assert cost > 0, (rid, rows[rid].stream, rows[rid].status_code)
    assert key.spend_usd == pytest.approx(sum(charged), rel=1e-6, abs=1e-9)  # the rows are the charges


async def test_every_stream_releases_its_reservation_and_has_its_row(env: Callable[[float], Env]) -> None:
    """Plain, cut short, and without a usage chunk (charged $0 before): each is charged, logged, released."""
    e: Env = env(100.0)
    kinds: dict[str, tuple[dict[str, Any], str]] = {"plain": ({"usage": True}, "stream"), "cut": ({"usage": True}, "disconnect"),
             "nousage": ({"usage": False}, "stream"), "nousage-cut": ({"usage": False}, "disconnect"),
             "lie": ({"usage": True, "lie": "huge"}, "stream")}
    for name, (how, mode) in kinds.items():
        rid = f"req-{name}"
        body = {"model": "plain", "max_tokens": 1000, "messages": [
            {"role": "system", "content": json.dumps({"rid": rid, "wanted": 900, "lie": None, **how})},
            {"role": "user", "content": "count to a thousand"}]}
        assert await _run(e, body, mode, rid)
        assert await asyncio.to_thread(_held, e.store) == 0, name
    assert e.writer.flush(10.0)
    rows = await asyncio.to_thread(_rows, e.store)
    key = await asyncio.to_thread(_key, e.store, e.principal.key_id)
    assert key.reserved_usd == pytest.approx(0.0, abs=1e-9)
    for name in kinds:
        row = rows[f"req-{name}"]
        true = e.upstream.billed[f"req-{name}"].usd(e.registry)
        assert row.cost_usd is not None and 0 < row.cost_usd <= 2 * true, (name, row.cost_usd, true)
        assert row.completion_tokens and row.completion_tokens > 0
    assert rows["req-nousage"].completion_tokens == pytest.approx(900, rel=0.05)
    assert rows["req-lie"].usage_corrected and not rows["req-plain"].usage_corrected
    assert key.spend_usd == pytest.approx(sum(r.cost_usd or 0.0 for r in rows.values()))


async def test_a_refusal_says_the_estimate_what_remains_and_what_to_do(env: Callable[[float], Env]) -> None:
    e: Env = env(0.01)
    body = {"model": "plain", "max_tokens": 1, "tools": big_tools(random.Random(0), 200_000), "messages": [
        {"role": "system", "content": json.dumps({"rid": "r", "wanted": 1, "lie": None, "usage": True})},
        {"role": "user", "content": "hi"}]}
    with pytest.raises(BudgetExceededError) as info:
        await e.service.complete(parse_chat_request(body), ChatContext(request_id="req-refused"))
    msg = info.value.message
    assert info.value.status_code == 429 and info.value.error_type == "budget_exceeded"
    assert "$0.0100 remains" in msg and "prompt tokens" in msg and "lower max_tokens" in msg, msg
    assert "r" not in e.upstream.billed  # nothing was sent


async def test_without_max_tokens_a_budgeted_key_gets_the_bound_sent_upstream(env: Callable[[float], Env]) -> None:
    e: Env = env(100.0)
    body = {"model": "plain", "messages": [
        {"role": "system", "content": json.dumps({"rid": "long", "wanted": 5500, "lie": None, "usage": True})},
        {"role": "user", "content": "write a novel"}]}
    await e.service.complete(parse_chat_request(body), ChatContext(request_id="req-long"))
    # `plain` has no max_output_tokens and LiteLLM does not know it: budget.default_max_output_tokens is forced
    assert e.upstream.billed["long"].completion_tokens == 4096


def test_a_corrected_usage_is_counted_in_the_metric() -> None:
    from datetime import UTC, datetime

    from prometheus_client import CollectorRegistry

    from gateway.metrics import Metrics
    from gateway.serving.interfaces import RequestRecord

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for corrected in (True, False, True):
        metrics.observe_request(RequestRecord(request_id="r", started_at=datetime.now(UTC), requested_model="m",
                                              stream=False, usage_corrected=corrected))
    assert registry.get_sample_value("uniroute_usage_corrected_total") == 2


# ------------------------------------------------------------------------ the same mix through a store cut
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def cuttable_env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Any, Store, Cut]]:
    """``env_for(budget)`` as :func:`env`, but the service's store reaches the database through a :class:`Cut`
    (PostgreSQL: a TCP proxy; SQLite: another connection holding the write lock), with short waits as
    deployed for a flaky database (``sqlite_busy_timeout_s``, ``settle_timeout_s``); the reservation keeper
    runs as in ``uniroute serve``. Also yields a direct store (the assertions read through it) and the cut."""
    with database(request.param, tmp_path) as url:
        direct = Store(url)
        direct.upgrade()
        cut = Cut(request.param, url)
        made: list[tuple[RequestLogWriter, ReservationKeeper, Store]] = []

        async def env_for(budget: float) -> Env:
            svc_store = Store(cut.gateway_url, pool_size=10, max_overflow=20, sqlite_busy_timeout_ms=200,
                              connect_timeout_s=1)
            cfg = billing_config(MODELS)
            registry = Registry.from_config(cfg)
            upstream = BillingUpstream(latency_s=(0.05, 0.4))  # answers take a while: a cut finds some in flight
            fw = Forwarder(max_attempts=3, upstream=upstream)
            registry.on_replace(fw.register)
            _raw, row = create_key(direct, "tenant", default_lambda=0.1, budget_usd=budget)
            principal = principal_from_row(row)
            guard = SqlBudgetGuard(svc_store, settle_timeout_s=0.3, metrics=METRICS)
            writer = RequestLogWriter(svc_store, flush_interval_s=0.05, spill_dir=tmp_path / "spill",
                                      holder=guard.holder, period_starts=lambda: period_starts(utcnow()))
            writer.start()
            keeper = ReservationKeeper(svc_store, guard.holder, ttl_s=2.0, guard=guard)
            await keeper.start(writer.adopted_holders)
            made.append((writer, keeper, svc_store))
            service = ChatService(registry, CheapestPolicy(), fw, authenticator=OpenAuthenticator(principal),
                                  budget=guard, sink=writer)
            return Env(service, upstream, registry, svc_store, writer, principal)

        try:
            yield env_for, direct, cut
        finally:
            await asyncio.to_thread(cut.close)
            for writer, keeper, svc_store in made:
                await keeper.aclose()
                await asyncio.to_thread(writer.close, 5.0)
                svc_store.dispose()
            direct.dispose()


METRICS = Metrics(CollectorRegistry())


def _deferred() -> float:
    return float(METRICS.settlements_deferred._value.get())


async def _cut_for_a_while(cut: Cut, rng: random.Random, reserved: Callable[[], float]) -> None:
    """Once a request of the wave holds a reservation (or after 1.5 s), cut the store; give it back a while
    later (the requests of the wave go on). One thread cuts and restores: SQLite's lock is a connection that
    only its own thread may use."""
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1) as one:
        until = loop.time() + 1.5
        while loop.time() < until and await loop.run_in_executor(one, reserved) <= 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(rng.uniform(0.0, 0.1))
        await loop.run_in_executor(one, cut.cut)
        try:
            await asyncio.sleep(rng.uniform(0.4, 1.0))
        finally:
            await loop.run_in_executor(one, cut.restore)


@pytest.mark.parametrize("seed", [3, 4])
async def test_the_cap_and_the_rows_hold_through_a_store_cut(cuttable_env: Any, seed: int) -> None:
    """The random mix above, with the store cut during one random wave (issue 10, point 6): requests that reach
    the store while it is cut get 503; those answered while it is cut are answered anyway and charged and
    logged once it is back; the cap holds and nothing stays held."""
    env_for, direct, cut = cuttable_env
    rng = random.Random(seed)
    budget = 0.1
    e: Env = await env_for(budget)
    answered: list[str] = []
    unavailable = 0
    deferred_before = _deferred()
    cut_wave = rng.randrange(0, 3)  # early: while the budget still admits requests

    def reserved() -> float:
        return _key(direct, e.principal.key_id).reserved_usd
    for wave in range(8):
        rids = [f"req-{seed}-{wave}-{i}" for i in range(CONCURRENCY)]
        payloads = [_request(rng, rid) for rid in rids]
        # staggered starts: the cut finds requests before their reservation, in flight, and settling
        runs = [_run(e, b, m, rid, rng.uniform(0, 0.6)) for (b, m), rid in zip(payloads, rids, strict=True)]
        if wave == cut_wave:
            results = (await asyncio.gather(*runs, _cut_for_a_while(cut, rng, reserved),
                                            return_exceptions=True))[:-1]
        else:
            results = await asyncio.gather(*runs, return_exceptions=True)
        for rid, res in zip(rids, results, strict=True):
            if isinstance(res, StoreUnavailableError):
                unavailable += 1
            elif isinstance(res, BaseException):
                assert isinstance(res, GatewayError) and not isinstance(res, BudgetExceededError), repr(res)
            elif res:
                answered.append(rid)
    deferred = _deferred() - deferred_before
    assert unavailable + deferred >= 1, "the cut touched no request: the test did not test the outage"
    assert answered and len(answered) < 8 * CONCURRENCY

    # once the store is back, everything owed is written (spilled rows retried, unsure reservations dropped)
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        rows = await asyncio.to_thread(_rows, direct)
        key = await asyncio.to_thread(_key, direct, e.principal.key_id)
        if set(answered) <= set(rows) and key.reserved_usd <= 1e-9 and await asyncio.to_thread(_held, direct) == 0:
            break
        assert asyncio.get_running_loop().time() < deadline, (
            f"20 s after the store came back: rows missing {sorted(set(answered) - set(rows))}, "
            f"reserved ${key.reserved_usd}, held {await asyncio.to_thread(_held, direct)}; the log writer's last "
            f"error: {e.writer.last_error}")
        await asyncio.sleep(0.1)
    await _check_the_property(e, direct, budget, answered)
    print(f"seed {seed}: {len(answered)} answered, {unavailable} answered 503, {deferred:g} settlements deferred")
