"""A budget is a hard cap, end to end (issue 10, rows 1 and 3): `uniroute serve` (real uvicorn, SQLite) → LiteLLM
→ tests/fake_upstream.py, driven by the official OpenAI SDK.

- 40 concurrent requests, each with 200 KB of ``tools`` and ``max_tokens: 1``, on a key whose budget affords two
  honest requests: the provider (``-bill``) bills the tools as prompt tokens; the key's spend never exceeds its
  budget by more than one request's true cost (the landed gateway admitted all 40: $666 on a $0.05 budget).
- A stream from a provider that sends no usage chunk (``-nousage``) is charged by counting what was relayed
  (the landed gateway charged $0).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import sqlalchemy as sa
import yaml

from gateway.access.auth import create_key
from gateway.store.engine import Store
from tests.procs import ServerSpec, free_port, gateway_server, running_all, server_env

PRICE_IN, PRICE_OUT = 1.0, 4.0  # USD per 1M tokens


@dataclass
class Stack:
    base: str
    db_url: str
    keys: dict[str, str]


def _tools(total_bytes: int) -> list[dict[str, Any]]:
    rng = random.Random(3)
    words = ["city", "forecast", "temperature", "humidity", "wind", "pressure", "tomorrow", "region", "units"]
    tools: list[dict[str, Any]] = []
    while len(json.dumps(tools)) < total_bytes:
        desc = " ".join(rng.choice(words) for _ in range(300))
        tools.append({"type": "function", "function": {"name": f"tool_{len(tools)}", "description": desc,
                                                       "parameters": {"type": "object", "properties": {
                                                           "q": {"type": "string", "description": desc}}}}})
    return tools


TOOLS = _tools(200_000)
MESSAGES = [{"role": "user", "content": "what is the weather?"}]
#: what the provider bills for one of those requests (tests/fake_upstream.py, ``-bill``)
TRUE_COST = ((len(json.dumps(MESSAGES)) + len(json.dumps(TOOLS))) // 4 * PRICE_IN + 1 * PRICE_OUT) / 1e6
BUDGET = 2 * TRUE_COST  # affords two honest requests


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root: Path = tmp_path_factory.mktemp("cap")
    up_port, port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"

    def model(name: str) -> dict[str, Any]:
        return {"name": name, "router_cost": 1.0, "input_cost_per_1m": PRICE_IN, "output_cost_per_1m": PRICE_OUT,
                "litellm_params": {"model": f"openai/{name}", "api_base": upstream, "api_key": "t"}}

    db_url = f"sqlite:///{root / 'gw.db'}"
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "auth": {"mode": "keys"},
        "database_url": db_url,
        "database": {"spill_dir": str(root / "spill"), "log_flush_interval_s": 0.1},
        "limits": {"max_tools": 1000},  # 200 KB of tools is accepted: the budget, not a limit, must stop them
        "router": {"policy": "cheapest"},
        "fallback": {"max_attempts": 1, "cooldown_failures": 0},
        "models": [model("tools-bill"), model("talk-nousage")],
    }))
    store = Store(db_url)
    store.upgrade()
    keys = {"capped": create_key(store, "capped", default_lambda=0.1, budget_usd=BUDGET)[0],
            "streamer": create_key(store, "streamer", default_lambda=0.1, budget_usd=10.0)[0]}
    store.dispose()
    fake = ServerSpec(["-m", "uvicorn", "tests.fake_upstream:app", "--host", "127.0.0.1", "--port", str(up_port),
                       "--log-level", "warning"], f"http://127.0.0.1:{up_port}/health")
    with running_all(fake, gateway_server(cfg, env=server_env())):
        yield Stack(f"http://127.0.0.1:{port}/v1", db_url, keys)


def _query(stack: Stack, sql: str, **params: Any) -> Any:
    engine = sa.create_engine(stack.db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql), params).first()
    finally:
        engine.dispose()


def test_40_concurrent_requests_with_200kb_of_tools_stay_within_the_budget(stack: Stack) -> None:
    assert len(json.dumps(TOOLS)) >= 200_000

    async def one(client: openai.AsyncOpenAI) -> int | str:
        try:
            await client.chat.completions.create(model="tools-bill", messages=MESSAGES,  # type: ignore[arg-type]
                                                 tools=TOOLS, max_tokens=1)  # type: ignore[arg-type]
            return 200
        except openai.RateLimitError as exc:
            body: Any = exc.body
            assert body["code"] == "budget_exceeded", body
            return str(body["message"])

    async def all_at_once() -> list[int | str]:
        async with openai.AsyncOpenAI(base_url=stack.base, api_key=stack.keys["capped"], max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(40)))

    results = asyncio.run(all_at_once())
    served = [r for r in results if r == 200]
    refusals = [r for r in results if isinstance(r, str)]
    assert 1 <= len(served) <= 2 and len(served) + len(refusals) == 40, results
    assert "remains" in refusals[0] and "lower max_tokens" in refusals[0], refusals[0]
    row = _query(stack, "SELECT spend_usd, reserved_usd FROM api_keys WHERE name = 'capped'")
    spend, reserved = row
    assert spend <= BUDGET + TRUE_COST + 1e-9, (spend, BUDGET, TRUE_COST)
    assert spend == pytest.approx(len(served) * TRUE_COST, rel=1e-6)  # each was charged what the provider billed
    assert reserved == pytest.approx(0.0, abs=1e-9)


def test_a_stream_without_a_usage_chunk_is_charged_what_was_relayed(stack: Stack) -> None:
    rid = f"nousage-{time.time_ns()}"
    text = "one two three four five six seven eight nine ten " * 5
    with openai.OpenAI(base_url=stack.base, api_key=stack.keys["streamer"], max_retries=0) as client:
        stream = client.chat.completions.create(model="talk-nousage", stream=True, extra_headers={
            "x-uniroute-request-id": rid}, messages=[{"role": "user", "content": text}])
        relayed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert relayed.startswith("echo: one two")
    deadline = time.monotonic() + 10
    row = None
    while row is None and time.monotonic() < deadline:
        row = _query(stack, "SELECT cost_usd, prompt_tokens, completion_tokens, status_code FROM requests "
                            "WHERE client_request_id = :r", r=rid)
        time.sleep(0.1)
    assert row is not None, "the stream has no row"
    cost, prompt_tokens, completion_tokens, status = row
    assert status == 200 and prompt_tokens > 0 and completion_tokens >= 50  # ~one token per word relayed
    assert cost == pytest.approx((prompt_tokens * PRICE_IN + completion_tokens * PRICE_OUT) / 1e6) and cost > 0
    spend, reserved = _query(stack, "SELECT spend_usd, reserved_usd FROM api_keys WHERE name = 'streamer'")
    assert spend == pytest.approx(cost) and reserved == pytest.approx(0.0, abs=1e-9)
