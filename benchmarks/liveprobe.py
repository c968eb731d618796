"""A liveliness probe in a process of its own, as a kubelet or a load balancer probes.

``GET url`` every ``--every`` seconds on one keep-alive connection (blocking ``http.client``, reconnecting
after an error) until SIGTERM, then prints ``{"latencies_ms": [...], "failures": N}`` on stdout. A probe
run inside the load generator's own event loop also measures that loop's lag: at concurrency 256 the load
generator is busy, and its probe waits for it as much as for the server. Here the probe's process sleeps
between probes and is woken by the kernel when the answer arrives, so the latency is the server's.

    with liveliness_probe("http://127.0.0.1:8000/health/liveliness") as probe:
        ...  # the load
    probe.latencies_ms, probe.failures
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class ProbeResult:
    latencies_ms: list[float] = field(default_factory=list)
    failures: int = 0


def probe(url: str, every_s: float, stop: threading.Event, timeout_s: float = 10.0) -> ProbeResult:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    out = ProbeResult()
    conn: http.client.HTTPConnection | None = None
    while not stop.is_set():
        start = time.perf_counter()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
            conn.request("GET", parts.path or "/")
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                out.latencies_ms.append((time.perf_counter() - start) * 1000.0)
            else:
                out.failures += 1
        except (OSError, http.client.HTTPException):
            out.failures += 1
            if conn is not None:
                conn.close()
            conn = None
        stop.wait(every_s)
    if conn is not None:
        conn.close()
    return out


@contextlib.contextmanager
def liveliness_probe(url: str, every_s: float = 0.05) -> Iterator[ProbeResult]:
    """Probe ``url`` from a child process while the ``with`` block runs; the result is filled in at its end."""
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.liveprobe", url, "--every", str(every_s)],
                            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    result = ProbeResult()
    try:
        yield result
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        if proc.returncode == 0 and out:
            data = json.loads(out)
            result.latencies_ms, result.failures = data["latencies_ms"], data["failures"]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("--every", type=float, default=0.05, help="seconds between probes (default 0.05)")
    args = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    result = probe(args.url, args.every, stop)
    json.dump({"latencies_ms": result.latencies_ms, "failures": result.failures}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
