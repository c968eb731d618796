"""Where the gateway's CPU goes per routed request (issue 14, point 3): a sampling profile over a load run.

Starts the replay upstream and the gateway as :mod:`benchmarks.stalls` does (the demo's setup: one
worker, open mode, ``model: "auto"`` through UniRoute LearnedMap with the static-embedder artifact,
``max_wait_ms: 0``, the SQLite request log with its journal), drives it with a new prompt on every request
(:mod:`benchmarks.loadgen`) and records the gateway with ``py-spy record --gil --format raw`` for the whole
run: each sample is the stack of the thread holding the GIL (the event loop's or a worker thread's), so a
thread waiting for the GIL is not counted as busy (``--all-threads`` samples every non-idle thread). Each sampled stack is attributed to ONE stage, by its innermost
frame that belongs to a stage (:data:`STAGES`, checked leaf to root), so LiteLLM's own calls into pydantic,
httpx or aiohttp count as forwarding, and a pydantic validation under the request parser counts as parsing.
A stage's share of the samples times the gateway's CPU time (from ``/proc``) over the run, divided by the
requests answered, is its CPU milliseconds per request.

    python -m benchmarks.cpu_breakdown --seconds 60 --concurrency 16 --json var/cpu.json
    python -m benchmarks.cpu_breakdown --seconds 60 --concurrency 16 --stream
    python -m benchmarks.cpu_breakdown --from-raw var/profile.txt --cpu-ms-per-req 5.1   # classify a saved profile

Needs ``py-spy`` (a dev dependency; root, or ``ptrace`` permission over the gateway process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.loadgen import install_uvloop, prompt_bodies, run_load
from benchmarks.overhead import (
    OFFLINE_ENV,
    benchmark_dataset,
    cpu_seconds,
    environ,
    free_port,
    machine,
    server,
    static_router,
    versions,
    write_json,
)
from benchmarks.stalls import gateway_config, py_spy

#: (stage, regular expression over one frame ``function (file:line)``). A stack is attributed to the stage of its
#: innermost frame that matches one of these; only a stack none of them matches falls to :data:`GENERIC`.
STAGES: list[tuple[str, str]] = [
    ("metrics", r"gateway/metrics\.py|prometheus_client/"),
    ("logging (request log, journal)", r"gateway/store/requestlog\.py|gateway/store/journal\.py|"
                                       r"MetricsSink|sqlalchemy/|sqlite3|psycopg"),
    ("embedding", r"routing/batcher\.py|routing/embedder\.py|model2vec/|tokenizers/|gateway/serving/router\.py"),
    ("ranking", r"routing/(artifact|decision|clusters|policy|estimators|profiles)\.py"),
    ("forwarding (LiteLLM and its HTTP client)", r"litellm/|openai/|aiohttp/|httpx/|httpcore/|"
                                                  r"gateway/serving/(forwarding|bounded|cooldown)\.py"),
    ("auth, rate limit, budget", r"gateway/access/|authenticate \(gateway/serving/service\.py|"
                                 r"resolve_lambda \(gateway/serving/service\.py"),
    ("parse and validate", r"gateway/http/bodies\.py|gateway/protocol\.py|parse_json|_parse \(gateway/http/chat"),
    ("shaping (response JSON / SSE)", r"gateway/http/(chat|responses)\.py|extension \(gateway/serving/service"),
    ("chat service (other)", r"gateway/serving/service\.py|gateway/serving/registry\.py"),
    ("registry poller, background jobs", r"gateway/serving/registry_sync\.py|gateway/access/reservations\.py|"
                                         r"profiling/"),
]
#: the stages of what is left: the HTTP server (uvicorn, Starlette, the middleware, writing the response), the
#: event loop itself (uvloop's C code: no Python frame below the loop's ``run``)
GENERIC: list[tuple[str, str]] = [
    ("HTTP server, ASGI, middleware", r"uvicorn/protocols|starlette/|httptools|gateway/http/(middleware|server)\.py"),
    ("event loop, other", r"."),
]
#: a thread waiting (a pool worker on its queue, a writer on its event): not CPU, though py-spy sampled it
IDLE = re.compile(r"^(_worker \(concurrent/futures/thread\.py|(Event|Condition)\.wait \(threading\.py|"
                  r"TMonitor\.run|_wait_for_tstate_lock)")
IDLE_STAGE = "idle (waiting threads; left out)"
_SPECIFIC = [(name, re.compile(rx)) for name, rx in STAGES]
_GENERIC = [(name, re.compile(rx)) for name, rx in GENERIC]
OTHER = "other"
#: the stages outside LiteLLM's own call (the 0.5 ms bar of issue 14 is over these)
OUTSIDE_LITELLM = [name for name, _ in STAGES + GENERIC if not name.startswith("forwarding")]


def stage_of(frames: Sequence[str]) -> str:
    """The stage of one stack (root first): the stage of its innermost frame that matches a specific stage, else
    of its innermost frame that matches a generic one; a waiting thread is :data:`IDLE_STAGE`."""
    if frames and IDLE.search(frames[-1]):
        return IDLE_STAGE
    for rules in (_SPECIFIC, _GENERIC):
        for frame in reversed(frames):
            for name, rx in rules:
                if rx.search(frame):
                    return name
    return OTHER


def parse_raw(lines: Iterable[str]) -> Counter[str]:
    """``py-spy record --format raw`` (``frame;frame;... count`` per line) → samples per stage."""
    out: Counter[str] = Counter()
    for line in lines:
        line = line.rstrip("\n")
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        out[stage_of(stack.split(";"))] += int(count)
    return out


def breakdown(samples: Counter[str], cpu_ms_per_req: float) -> list[dict[str, Any]]:
    """Each stage's share of the busy samples (idle ones left out) and its CPU ms per request."""
    total = sum(n for stage, n in samples.items() if stage != IDLE_STAGE) or 1
    names = [name for name, _ in STAGES + GENERIC] + [OTHER]
    return [{"stage": n, "samples": samples.get(n, 0), "share": samples.get(n, 0) / total,
             "cpu_ms_per_req": cpu_ms_per_req * samples.get(n, 0) / total} for n in names]


def markdown(rows: list[dict[str, Any]], cpu_ms_per_req: float) -> str:
    lines = ["| stage | samples | share | CPU ms / request |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['samples']} | {100 * r['share']:.1f}% | {r['cpu_ms_per_req']:.3f} |")
    outside = sum(r["cpu_ms_per_req"] for r in rows if r["stage"] in OUTSIDE_LITELLM or r["stage"] == OTHER)
    lines.append(f"| **all (busy samples)** | {sum(r['samples'] for r in rows)} | 100% | **{cpu_ms_per_req:.3f}** |")
    lines.append(f"| outside LiteLLM's call (all but forwarding) |  |  | **{outside:.3f}** |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_breakdown", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--stream", action="store_true", help="streaming requests (20 chunks)")
    ap.add_argument("--static-router", default="var/router-static", metavar="DIR")
    ap.add_argument("--server", action="append", default=[], metavar="KEY=VALUE", help="extra server: settings")
    ap.add_argument("--all-threads", action="store_true",
                    help="sample every busy thread, not only the GIL holder (counts native code that releases the "
                         "GIL, e.g. SQLite, but also threads waiting to get it back)")
    ap.add_argument("--profile-out", default=None, help="keep the raw py-spy profile here")
    ap.add_argument("--from-raw", default=None, help="classify this saved raw profile instead of running")
    ap.add_argument("--cpu-ms-per-req", type=float, default=None, help="with --from-raw: the measured CPU per request")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.from_raw:
        samples = parse_raw(Path(args.from_raw).read_text(encoding="utf-8").splitlines())
        cpu = args.cpu_ms_per_req if args.cpu_ms_per_req is not None else 0.0
        rows = breakdown(samples, cpu)
        print(markdown(rows, cpu))
        write_json(args.json, {"from_raw": args.from_raw, "rows": rows})
        return 0
    import yaml

    import gateway  # noqa: F401  (offline environment)

    tmp = Path(tempfile.mkdtemp(prefix="uniroute-cpu-"))
    try:
        dataset, data = benchmark_dataset(args.dataset, args.prompts, tmp)
        prompts = data.prompts[: args.prompts]
        router = static_router(Path(args.static_router), dataset)
        router["embed_cache_dir"] = str(tmp / "embed-cache")
        extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.server)}
        rport, gport = free_port(), free_port()
        db_url = f"sqlite:///{tmp / 'cpu.db'}"
        cfg = gateway_config(tmp, dataset, rport, gport, router, db_url, extra)
        replay = [sys.executable, "-m", "gateway.cli.main", "replay", "--dataset", str(dataset), "--port",
                  str(rport), "--stream-chunks", "20"]
        gw = [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(cfg)]
        url = f"http://127.0.0.1:{gport}"
        raw = Path(args.profile_out) if args.profile_out else tmp / "profile.txt"
        info: dict[str, Any] = {
            "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m benchmarks.cpu_breakdown " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(), "versions": versions(), "stream": args.stream, "concurrency": args.concurrency,
        }
        with environ(**OFFLINE_ENV), contextlib.ExitStack() as stack:
            stack.enter_context(server(replay, tmp / "replay.log", f"http://127.0.0.1:{rport}/health", None))
            gproc = stack.enter_context(server(gw, tmp / "gateway.log", f"{url}/health/readiness", None))
            install_uvloop()
            bodies = prompt_bodies(prompts, "auto", stream=args.stream)
            asyncio.run(run_load(f"{url}/v1/chat/completions", bodies, concurrency=4, max_requests=300,
                                 max_seconds=30, new_prompts=True))  # LiteLLM's first-call imports: not measured
            cpu0 = cpu_seconds(gproc.pid)
            t0 = time.monotonic()
            with py_spy(gproc.pid, raw, args.seconds, gil=not args.all_threads):
                res = asyncio.run(run_load(f"{url}/v1/chat/completions", bodies, concurrency=args.concurrency,
                                           max_requests=10**9, max_seconds=args.seconds, new_prompts=True))
            wall = time.monotonic() - t0
            cpu = cpu_seconds(gproc.pid) - cpu0
        ok = len(res.ok)
        cpu_ms = 1000.0 * cpu / max(1, ok)
        samples = parse_raw(raw.read_text(encoding="utf-8").splitlines()) if raw.exists() else Counter()
        rows = breakdown(samples, cpu_ms)
        table = markdown(rows, cpu_ms)
        print(table)
        print(f"\n{ok} requests ({res.errors} errors) in {wall:.0f} s at c={args.concurrency}, "
              f"{'streaming' if args.stream else 'non-streaming'}; gateway CPU {cpu:.1f} s = {cpu_ms:.2f} ms/request; "
              f"{sum(samples.values())} samples; load average {os.getloadavg()}")
        info.update(requests=ok, errors=res.errors, gateway_cpu_s=cpu, cpu_ms_per_req=cpu_ms, rows=rows, table=table)
        info["machine"]["loadavg_end"] = list(os.getloadavg())
        write_json(args.json, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
