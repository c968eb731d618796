"""The adversarial budget property of tests/test_budget_cap.py through a killed process (issue 10, point 6).

Real things: ``uniroute serve`` (a subprocess) on SQLite or PostgreSQL, LiteLLM calling a billing provider over
HTTP (the in-memory ``BillingUpstream`` of test_budget_cap served by uvicorn in this process, so what it billed
survives the gateway), clients over HTTP. The same random mix (200 KB of tools, no ``max_tokens``, streams
without usage, lying usage, ``auto`` falling back from a failing cheap model to a dear one, disconnects); in the
first wave (after the first) where a request holds a reservation, the gateway is killed with ``-9`` a moment
later (its log writer flushes only every 120 s: the answered rows are in its journal only), then started again
with the same spill dir, and the waves go on.

The property, once the restarted gateway has replayed the journal: the key's spend stays within its budget plus
one request's true cost per request in flight; every request the client saw answered (a full answer, or a stream
it left in a wave that ended before the kill) has its row, charged within twice its true cost; spend is the sum
of the rows; no reservation stays held (the dead process's are released at the restart, long before
``database.reservation_ttl_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.access.auth import create_key
from gateway.serving.registry import Registry
from gateway.store import reservations as reservations_sql
from gateway.store.engine import Store
from gateway.store.tables import ApiKey, RequestRow
from tests.fake_upstream import ProviderError
from tests.procs import free_port, running, server_env
from tests.storeutil import database
from tests.test_budget_cap import CONCURRENCY, MODELS, BillingUpstream, _request, billing_config

BUDGET = 0.1
WAVES = 8


class BillingServer:
    """:class:`BillingUpstream` over HTTP (OpenAI chat completions), in a thread of this process."""

    def __init__(self) -> None:
        self.billing = BillingUpstream(latency_s=(0.1, 0.6))  # answers take a while: a kill finds some in flight
        self.port = free_port()
        app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                Route("/health", lambda _r: JSONResponse({"ok": True}))])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def chat(self, request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        name = str(body["model"]).removeprefix("unknown-")
        spec = next(m for m in MODELS if m["name"] == name)
        entry: Any = SimpleNamespace(name=name, max_output_tokens=spec.get("max_output_tokens"))
        params = {k: v for k, v in body.items() if k != "messages"}
        try:
            if not body.get("stream"):
                answer = await self.billing.complete(entry, body["messages"], params)
                return JSONResponse(answer.model_dump(exclude_none=True))
            chunks = await self.billing.stream(entry, body["messages"], params)
        except ProviderError as exc:
            return JSONResponse({"error": {"message": exc.message, "type": "server_error"}},
                                status_code=exc.status_code)

        async def sse() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json(exclude_none=True)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    def __enter__(self) -> BillingServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the billing upstream did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _config(root: Path, url: str, upstream: str, port: int, **database: Any) -> Path:
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "auth": {"mode": "keys"},
        "database_url": url,
        "database": {"spill_dir": str(root / "spill"), "reservation_ttl_s": 3600, **database},
        "limits": {"max_tools": 1000},
        "router": {"policy": "cheapest"},
        "fallback": {"max_attempts": 3, "cooldown_failures": 0},  # `auto` tries cheap-500 first, every time
        "models": [{**m, "litellm_params": {"model": f"openai/unknown-{m['name']}", "api_base": upstream,
                                            "api_key": "t"}} for m in MODELS],
    }))
    return path


@contextlib.contextmanager
def _serve(cfg: Path, port: int) -> Iterator[Any]:
    with running(["-m", "gateway.cli.main", "serve", "--config", str(cfg), "--port", str(port)],
                 f"http://127.0.0.1:{port}/health/readiness", env=server_env(), timeout_s=120) as proc:
        yield proc


async def _send(client: httpx.AsyncClient, body: dict[str, Any], mode: str, after_s: float) -> tuple[str, str | None]:
    """One request: (outcome, the gateway's request id). Outcomes: ``answered`` (the whole answer),
    ``left`` (a stream the client left after two events), ``refused`` (429 budget_exceeded), ``failed``
    (anything else: the gateway was killed, a 503, a provider error)."""
    await asyncio.sleep(after_s)
    if mode != "complete":
        body = {**body, "stream": True}
    try:
        if mode == "complete":
            r = await client.post("/chat/completions", json=body)
            rid = r.headers.get("x-uniroute-request-id")
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "budget_exceeded", r.text
                return "refused", rid
            if r.status_code == 200:
                assert "uniroute" in r.json()
                return "answered", rid
            assert r.status_code in (502, 503, 504), (r.status_code, r.text)
            return "failed", rid
        async with client.stream("POST", "/chat/completions", json=body) as r:
            rid = r.headers.get("x-uniroute-request-id")
            if r.status_code == 429:
                return "refused", rid
            if r.status_code != 200:
                assert r.status_code in (502, 503, 504), r.status_code
                return "failed", rid
            events = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "answered", rid
                assert '"error"' not in line[:40], line
                events += 1
                if mode == "disconnect" and events >= 2:
                    return "left", rid
            return "failed", rid  # cut off: the gateway died mid-stream
    except httpx.TransportError:
        return "failed", None


def _state(store: Store, key_name: str) -> tuple[ApiKey, dict[str, RequestRow], int]:
    with store.sessions() as s:
        key = s.scalar(sa.select(ApiKey).where(ApiKey.name == key_name))
        rows = {r.request_id: r for r in s.scalars(sa.select(RequestRow))}
    assert key is not None
    return key, rows, len(reservations_sql.held(store))


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_the_cap_and_the_rows_hold_through_kill_9(kind: str, tmp_path: Path) -> None:
    rng = random.Random(5)
    registry = Registry.from_config(billing_config(MODELS))
    with database(kind, tmp_path) as url, BillingServer() as up:
        direct = Store(url)
        direct.upgrade()
        raw = create_key(direct, "tenant", default_lambda=0.1, budget_usd=BUDGET)[0]
        port = free_port()
        kill_wave = -1
        mine: dict[str, str] = {}  # my request tag (the provider bills by it) -> the gateway's request id
        counted: list[str] = []  # tags of the requests whose row must exist
        killed_in_flight = 0
        outcomes: dict[str, int] = {}

        async def wave(w: int, proc: Any | None) -> bool:
            """One wave of random requests; with ``proc``, kill it -9 once a request of the wave holds a
            reservation (it is with the provider), a moment later. True if it was killed."""
            nonlocal killed_in_flight
            tags = [f"req-{w}-{i}" for i in range(CONCURRENCY)]
            payloads = [_request(rng, tag) for tag in tags]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1", timeout=60,
                                         headers={"authorization": f"Bearer {raw}"}) as client:
                sends = [_send(client, b, m, rng.uniform(0, 0.4)) for b, m in payloads]

                done = asyncio.Event()

                async def kill() -> bool:
                    assert proc is not None
                    while not await asyncio.to_thread(reservations_sql.held, direct):
                        if done.is_set():
                            return False  # every request of the wave was refused or done before one was seen
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(rng.uniform(0.0, 0.05))
                    proc.send_signal(signal.SIGKILL)
                    return True

                killer = asyncio.create_task(kill()) if proc is not None else None
                results = await asyncio.gather(*sends)
                done.set()
                killed = killer is not None and await killer
            for tag, (outcome, rid) in zip(tags, results, strict=True):
                if rid is not None:
                    mine[tag] = rid
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome == "answered" or (outcome == "left" and proc is None):
                    counted.append(tag)
                if killed and outcome == "failed":
                    killed_in_flight += 1
            return killed

        cfg = _config(tmp_path, url, up.base, port, log_flush_interval_s=120.0, log_batch_size=100_000)
        with _serve(cfg, port) as proc:
            asyncio.run(wave(0, None))
            for w in range(1, WAVES - 1):  # the first wave in which a request holds a reservation is killed
                time.sleep(0.5)  # the streams the clients left are logged (journaled) before a kill
                if asyncio.run(wave(w, proc)):
                    kill_wave = w
                    break
            assert kill_wave > 0, f"no request held a reservation in any wave to kill in: {outcomes}"
            proc.wait(10)
            assert proc.returncode == -signal.SIGKILL
        key, rows, held = _state(direct, "tenant")
        missing_before = [t for t in counted if mine[t] not in rows]
        assert missing_before, "every counted row was written before the kill: the journal was not tested"
        assert held, "no reservation was held at the kill: their release at the restart was not tested"

        cfg = _config(tmp_path, url, up.base, port)
        with _serve(cfg, port):
            for w in range(kill_wave + 1, WAVES):
                asyncio.run(wave(w, None))
            deadline = time.monotonic() + 30
            while True:
                key, rows, held = _state(direct, "tenant")
                missing = [t for t in counted if mine[t] not in rows]
                if not missing and not held and key.reserved_usd <= 1e-9:
                    break
                assert time.monotonic() < deadline, (f"30 s after the restart: rows missing {missing}, "
                                                     f"{held} reservations held, reserved ${key.reserved_usd}")
                time.sleep(0.2)
        direct.dispose()

    true = {tag: b.usd(registry) for tag, b in up.billing.billed.items()}
    one = max(true.values())
    assert counted and len(counted) < WAVES * CONCURRENCY
    assert key.spend_usd <= BUDGET + CONCURRENCY * one + 1e-9, (key.spend_usd, BUDGET, one)
    for tag in counted:
        row = rows[mine[tag]]
        assert row.cost_usd is not None and 0 < row.cost_usd <= 2 * true[tag] + 1e-6, (tag, row.cost_usd, true[tag])
    assert all((r.cost_usd or 0.0) >= 0 for r in rows.values())
    assert key.spend_usd == pytest.approx(sum(r.cost_usd or 0.0 for r in rows.values()), rel=1e-6, abs=1e-9)
    print(f"{kind}: kill in wave {kill_wave}; {len(counted)} answered, {len(missing_before)} of them only in the "
          f"journal at the kill, {killed_in_flight} cut off by it; spend ${key.spend_usd:.4f} of ${BUDGET}; {outcomes}")
