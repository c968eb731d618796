"""benchmarks.loadgen against a real replay server: it parses what it measures (no timing assertions)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.loadgen import build_request, new_prompt_requests, prompt_bodies, run_load, with_nonce_mark
from routing.dataset import load_dataset
from routing.synthetic import make_synthetic_dataset
from tests.procs import popen

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    ds = make_synthetic_dataset(tmp_path_factory.mktemp("loadgen") / "syn", n_prompts=20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(os.devnull, "wb") as quiet:
        proc = popen(["-m", "gateway.cli.main", "replay", "--dataset", str(ds), "--port", str(port), "--fail",
                      "bio-expert=429"], cwd=os.getcwd(), env=env, stdout=quiet)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=0.5) as client:  # one client: httpx.get() costs ~30 ms of CPU per call
            for _ in range(300):
                try:
                    if client.get(f"{base}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.05)
            else:
                raise RuntimeError("replay server did not start")
        yield f"{base}/v1/chat/completions", ds
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("stream", [False, True])
async def test_counts_requests_and_measures(replay: tuple[str, Path], stream: bool) -> None:
    url, ds = replay
    bodies = prompt_bodies(load_dataset(ds).prompts, "small-general", stream=stream)
    result = await run_load(url, bodies, concurrency=4, max_requests=40, max_seconds=30)
    summary = result.summary()
    assert summary["requests"] == 40 and summary["ok"] == 40 and summary["errors"] == 0
    assert all(s.latency_s > 0 for s in result.samples)
    if stream:  # chunked SSE parsed to the end, TTFT found and not after the end
        assert all(s.ttft_s is not None and 0 < s.ttft_s <= s.latency_s for s in result.samples)
        assert summary["ttft_ms"]["p50"] > 0
    else:
        assert all(s.ttft_s is None for s in result.samples)


async def test_time_bound_and_error_statuses(replay: tuple[str, Path]) -> None:
    url, _ = replay
    bodies = prompt_bodies(["hi"], "bio-expert", stream=False)
    t0 = time.perf_counter()
    result = await run_load(url, bodies, concurrency=2, max_requests=10**9, max_seconds=0.5)
    assert time.perf_counter() - t0 < 5
    assert result.samples and result.errors == len(result.samples)
    assert set(result.summary()["status"]) == {"429"}


async def test_connection_errors_are_counted() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])  # nothing listens here once the socket closes
    result = await run_load(f"http://127.0.0.1:{port}/v1/chat/completions", [{"model": "m"}],
                            concurrency=1, max_requests=3, max_seconds=5)
    assert len(result.samples) == 3 and result.errors == 3
    assert all(s.status == 0 and s.error for s in result.samples)


def test_new_prompt_requests_are_unique_and_well_formed() -> None:
    bodies = prompt_bodies(["What is 2+2?", "Name a colour."], "m", stream=True)
    raws = [build_request("127.0.0.1", 80, "/v1/chat/completions", with_nonce_mark(b)) for b in bodies]
    request_at = new_prompt_requests(raws, tag="0badcafe")
    seen = set()
    for i in range(6):
        head, _, payload = request_at(i).partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.startswith(b"Content-Length"))
        assert length == len(payload)
        body = json.loads(payload)
        text = body["messages"][-1]["content"]
        assert text.startswith(["What is 2+2?", "Name a colour."][i % 2])
        assert text.endswith(f"(request 0badcafe-{i:08x})")
        assert body["stream"] is True and body["model"] == "m"
        seen.add(text)
    assert len(seen) == 6
    assert bodies[0]["messages"][-1]["content"] == "What is 2+2?"  # the input bodies are untouched
    with pytest.raises(ValueError, match="nonce mark"):
        new_prompt_requests([build_request("h", 1, "/", bodies[0])])


async def test_new_prompts_and_checked_streams_against_replay(replay: tuple[str, Path]) -> None:
    url, ds = replay
    for stream in (False, True):
        bodies = prompt_bodies(load_dataset(ds).prompts[:3], "small-general", stream=stream)
        result = await run_load(url, bodies, concurrency=2, max_requests=12, max_seconds=30, new_prompts=True,
                                check_streams=True)
        assert len(result.samples) == 12 and result.errors == 0, result.summary()
        assert all(s.end_s > 0 for s in result.samples)


async def _recording_server(seen: list[bytes]) -> tuple[asyncio.AbstractServer, int]:
    """A raw keep-alive HTTP server that records every request's body and answers a one-choice 200."""
    answer = b'{"choices":[{"message":{"content":"x"},"finish_reason":"stop"}]}'

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # the client closed the connection
                break
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            seen.append(await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % len(answer) + answer)
            await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, int(srv.sockets[0].getsockname()[1])


async def test_a_fixed_nonce_tag_sends_the_same_requests_in_every_run() -> None:
    bodies = prompt_bodies(["What is 2+2?", "Name a colour."], "m", stream=False)
    runs: list[list[bytes]] = []
    for tag in ("c0de0001", "c0de0001", None, None):
        seen: list[bytes] = []
        srv, port = await _recording_server(seen)
        async with srv:
            result = await run_load(f"http://127.0.0.1:{port}/v1/chat/completions", bodies, max_requests=5,
                                    max_seconds=30, new_prompts=True, nonce_tag=tag)
        assert result.errors == 0, result.summary()
        runs.append(seen)
    assert runs[0] == runs[1] and len(set(runs[0])) == 5  # the same 5 new prompts, in the same order
    assert all(b"c0de0001-" in body for body in runs[0])
    assert runs[2] != runs[3]  # without a tag each run draws its own
    assert len(runs[2]) == len(runs[3]) == 5


async def _serve_once(body: bytes) -> tuple[asyncio.AbstractServer, int]:
    """A raw HTTP server answering every request with a chunked 200 whose body is ``body``."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, int(srv.sockets[0].getsockname()[1])


@pytest.mark.parametrize(("events", "ok"), [
    (b'data: {"choices":[{"delta":{"content":"x"},"finish_reason":null}]}\n\n'
     b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n', True),
    (b'data: {"choices":[{"delta":{"content":"x"},"finish_reason":null}]}\n\ndata: [DONE]\n\n', False),  # no final
    (b'data: {"choices":[{"delta":{},"finish_reason": "stop"}]}\n\n', False),  # no [DONE]
])
async def test_check_streams_flags_incomplete_streams(events: bytes, ok: bool) -> None:
    srv, port = await _serve_once(events)
    async with srv:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = prompt_bodies(["hi"], "m", stream=True)
        checked = await run_load(url, body, max_requests=2, max_seconds=10, check_streams=True)
        unchecked = await run_load(url, body, max_requests=2, max_seconds=10)
    assert unchecked.errors == 0
    assert checked.errors == (0 if ok else 2)
    if not ok:
        assert set(checked.summary()["status"]) == {"200:incomplete"}
