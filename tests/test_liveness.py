"""The liveness listener (`server.health_port`, gateway/http/liveness.py): a thread answers the probe
at once while the event loop is blocked, says `stalled` once it has been blocked `stall_s`, and a client
that holds connections open cannot take it away from the prober (real sockets, a real event loop).
That both workers of `server.workers: 2` share the port is checked in tests/test_workers_pg.py."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.http.liveness import PATH, LivenessListener


@contextlib.asynccontextmanager
async def _listening(host: str = "127.0.0.1", **kw: Any) -> AsyncIterator[LivenessListener]:
    listener = LivenessListener(host, 0, **kw)
    listener.start(asyncio.get_running_loop())
    try:
        yield listener
    finally:
        await asyncio.to_thread(listener.close)


def _get(port: int, path: str = PATH) -> tuple[int, dict[str, Any], float]:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        return resp.status, body, time.perf_counter() - start
    finally:
        conn.close()


def test_it_answers_at_once_while_the_loop_is_blocked_and_says_when_it_stalls() -> None:
    async def main() -> tuple[list[tuple[float, int, str, float]], tuple[int, dict[str, Any], float]]:
        async with _listening(stall_s=0.5) as listener:
            status, body, _ = await asyncio.to_thread(_get, listener.port)
            assert (status, body["status"]) == (200, "ok"), body
            probes: list[tuple[float, int, str, float]] = []
            t0 = time.monotonic()

            def probe_during_block() -> None:
                while time.monotonic() - t0 < 1.4:
                    status, body, took = _get(listener.port)
                    probes.append((time.monotonic() - t0, status, body["status"], took))
                    time.sleep(0.1)

            prober = threading.Thread(target=probe_during_block)
            prober.start()
            time.sleep(1.5)  # a blocking call on the event loop (a bug), 1.5 s
            prober.join()
            await asyncio.sleep(0.3)  # the loop turns again: its heartbeat is stamped
            after = await asyncio.to_thread(_get, listener.port)
            return probes, after

    probes, after = asyncio.run(main())
    assert len(probes) >= 8, probes
    # answered while the loop was blocked, each within 0.25 s (on the main port a probe would wait the whole 1.5 s)
    assert max(took for *_, took in probes) < 0.25, probes
    assert all(s == 200 and b == "ok" for at, s, b, _ in probes if at < 0.2), probes
    assert all(s == 503 and b == "stalled" for at, s, b, _ in probes if at > 0.8), probes
    assert after[0] == 200 and after[1]["status"] == "ok", after


def test_a_client_holding_connections_cannot_starve_the_probe() -> None:
    async def main() -> None:
        async with _listening(timeout_s=1.0, max_connections=2) as listener:
            idle = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(2)]
            await asyncio.sleep(0.2)
            extra = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
            start = time.perf_counter()
            assert extra.recv(1) == b""  # the listener is full: this one is closed at once, not queued
            assert time.perf_counter() - start < 0.5
            extra.close()
            # the idle connections are closed after timeout_s; the probe gets its answer again
            deadline = time.monotonic() + 5
            while True:
                try:
                    status, body, _ = await asyncio.to_thread(_get, listener.port)
                    break
                except (ConnectionError, http.client.RemoteDisconnected):
                    assert time.monotonic() < deadline, "the idle connections were never closed"
                    await asyncio.sleep(0.2)
            assert (status, body["status"]) == (200, "ok")
            for s in idle:
                assert s.recv(1) == b""  # closed by the listener for saying nothing
                s.close()

    asyncio.run(main())


def test_other_paths_are_refused_with_what_is_served() -> None:
    async def main() -> None:
        async with _listening() as listener:
            status, body, _ = await asyncio.to_thread(_get, listener.port, "/v1/models")
        assert status == 404 and PATH in body["error"]["message"], body

    asyncio.run(main())


def test_it_listens_on_an_ipv6_host_too() -> None:
    async def main() -> None:
        async with _listening("::1") as listener:
            conn = http.client.HTTPConnection("::1", listener.port, timeout=10)
            conn.request("GET", PATH)
            assert conn.getresponse().status == 200
            conn.close()

    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    asyncio.run(main())


def test_the_benchmarks_probe_process_counts_answers_and_failures() -> None:
    """benchmarks/liveprobe.py (the probe the benchmarks run in a process of its own) against this listener:
    it records the answers' latencies, and counts a port that refuses as failures (no timing assertions)."""
    from benchmarks.liveprobe import liveliness_probe
    from tests.procs import free_port

    async def main() -> None:
        async with _listening() as listener:
            with liveliness_probe(f"http://127.0.0.1:{listener.port}{PATH}", every_s=0.02) as ok:
                await asyncio.sleep(2.0)
        with liveliness_probe(f"http://127.0.0.1:{free_port()}{PATH}", every_s=0.02) as refused:
            await asyncio.sleep(2.0)
        assert len(ok.latencies_ms) >= 5 and ok.failures == 0, (len(ok.latencies_ms), ok.failures)
        assert refused.latencies_ms == [] and refused.failures >= 1, refused

    asyncio.run(main())
