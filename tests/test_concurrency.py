"""200 concurrent streaming requests through a REAL ``uniroute serve`` (issue 6, item 4).

Every stream completes with the recorded answer; afterwards each one is a row of the ``requests`` table (the
background writer is polled, bounded) and the Prometheus request counter scraped from ``/metrics`` equals the
logged rows. Runs in ``auth.mode: keys`` with a key from ``uniroute keys create`` (SQLite store).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
import sqlalchemy as sa
import yaml
from prometheus_client.parser import text_string_to_metric_families

from routing.dataset import BenchmarkDataset, load_dataset
from tests.gateway_setup import make_dataset, replay_args, write_config
from tests.procs import ROOT, free_port, gateway_server, python, replay_server, running_all, server_env

N = 200
COUNTER = "litellm_proxy_total_requests_metric"  # ..._metric_total on the wire
SCRAPE = "scrape-token-for-the-load-test"  # UNIROUTE_METRICS_TOKEN: /metrics needs it in keys mode


@dataclass
class Stack:
    base: str  # http://127.0.0.1:PORT
    key: str
    db_url: str
    data: BenchmarkDataset


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("conc")
    dataset = make_dataset(root)
    replay, replay_base = replay_server(dataset, *replay_args())
    port = free_port()
    cfg = write_config(root, dataset, replay_base, port=port, log_level="warning")
    data = yaml.safe_load(cfg.read_text())
    db_url = f"sqlite:///{root / 'gateway.store.tables'}"
    # 200 streams open at once in one worker: above the default server.max_in_flight (tests/test_overload_e2e.py)
    data["server"]["max_in_flight"] = 256
    data.update(auth={"mode": "keys"}, database_url=db_url,
                database={"spill_dir": str(root / "spill"), "log_flush_interval_s": 0.2})
    cfg.write_text(yaml.safe_dump(data))
    with running_all(replay, gateway_server(cfg, env=server_env(UNIROUTE_METRICS_TOKEN=SCRAPE))):  # both start at once
        out = python(
            ["-m", "gateway.cli.main", "keys", "create", "--name", "load", "--lambda", "0.2",
             "--config", str(cfg)],
            cwd=ROOT, env=server_env(), check=True, timeout=60)
        yield Stack(f"http://127.0.0.1:{port}", out.stdout.strip().splitlines()[-1], db_url,
                    load_dataset(dataset))


def _counted(base: str, *, present: bool = True) -> float:
    """Sum of the Prometheus request counter over all its label sets (no series yet: 0 unless ``present``)."""
    r = httpx.get(base + "/metrics", timeout=10, headers={"authorization": f"Bearer {SCRAPE}"})  # keys mode
    r.raise_for_status()
    text = r.text
    assert not present or COUNTER + "_total" in text, text[:2000]
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == COUNTER
               for s in fam.samples if s.name == COUNTER + "_total")


def _rows(db_url: str, ids: list[str]) -> int:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as c:
            q = sa.text("SELECT request_id FROM requests")
            return len({r[0] for r in c.execute(q)} & set(ids))
    finally:
        engine.dispose()


def _all_rows(db_url: str) -> int:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as c:
            return int(c.execute(sa.text("SELECT count(*) FROM requests")).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.alone  # timeouts under load: make test runs it after the parallel run (it failed beside it)
async def test_200_concurrent_streams_complete_logged_and_counted(stack: Stack) -> None:
    before_rows = _all_rows(stack.db_url)
    before_count = _counted(stack.base, present=False)
    models = ["auto", "small-general", "large-general"]
    # the SDK's default pool allows 1000 connections, so all N streams are open at once
    async with openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key=stack.key, max_retries=0,
                                  timeout=60) as client:
        start = asyncio.Event()

        spans: list[tuple[float, float]] = []  # (headers received, stream finished) per request

        async def one(i: int) -> tuple[str, str, str]:
            await start.wait()
            prompt = stack.data.prompts[i % len(stack.data.prompts)]
            raw = await client.chat.completions.with_raw_response.create(
                model=models[i % 3], messages=[{"role": "user", "content": prompt}], stream=True,
                stream_options={"include_usage": True})
            rid = raw.headers["x-uniroute-request-id"]
            opened = time.monotonic()
            stream = raw.parse()
            text, served = "", ""
            async for chunk in stream:
                served = chunk.model or served
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
            spans.append((opened, time.monotonic()))
            return rid, served, text

        tasks = [asyncio.create_task(one(i)) for i in range(N)]
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        start.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=75)
        elapsed = time.monotonic() - t0

    assert len(results) == N
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    assert peak >= N // 4, f"at most {peak} streams were open at once: the server serialised them"
    ids = [rid for rid, _, _ in results]
    assert len(set(ids)) == N, "request ids are not unique"
    for i, (_, served, text) in enumerate(results):
        p = i % len(stack.data.prompts)
        expect_model = "small-general" if models[i % 3] == "auto" else models[i % 3]
        assert served == expect_model
        assert text == f"The answer is ({stack.data.responses[p][stack.data.models.index(served)]}).", i

    deadline = time.monotonic() + 20  # the request log is written by a background batch writer
    logged = _rows(stack.db_url, ids)
    while logged < N and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        logged = _rows(stack.db_url, ids)
    assert logged == N, f"{N - logged} of {N} streams missing from the requests table after 20 s"
    rows = _all_rows(stack.db_url) - before_rows
    counted = _counted(stack.base) - before_count
    assert rows == N  # nothing else was logged meanwhile
    assert counted == rows, f"Prometheus counted {counted} requests, the requests table has {rows} new rows"
    print(f"{N} streams in {elapsed:.2f} s, at most {peak} open at once")
