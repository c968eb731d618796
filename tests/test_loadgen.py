"""benchmarks.loadgen against a real replay server: it parses what it measures (no timing assertions)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.loadgen import prompt_bodies, run_load
from routing.dataset import load_dataset
from routing.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    ds = make_synthetic_dataset(tmp_path_factory.mktemp("loadgen") / "syn", n_prompts=20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "replay", "--dataset", str(ds), "--port",
                             str(port), "--fail", "bio-expert=429"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{base}/health", timeout=0.5).status_code == 200:
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
