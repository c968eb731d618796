"""Soak: minutes of closed-loop load through a real ``uniroute serve`` (issue 6, the soak bar).

Starts on loopback the replay upstream (``uniroute replay --stream-chunks 20``) and the gateway
(``uniroute serve``, one uvicorn worker, ``auth.mode: open``, learned routing: ``router.policy:
uniroute`` with the static-embedder artifact of ``--static-router DIR``, fitted there if missing, or
the router settings of ``--router-yaml``; the gateway refuses to start otherwise, no placeholder),
its request log in SQLite in the temp folder or in ``--database-url``. Then
:mod:`benchmarks.loadgen` sends ``model: "auto"`` requests for ``--seconds`` at ``--concurrency``
(streaming by default, ``--mode plain`` or ``mixed``), cycling through dataset prompts (their
embeddings cached) or, with ``--new-prompts``, a new prompt on every request (the gateway gets an
empty embedding cache folder of its own).

While it runs, the gateway's resident memory (``VmRSS`` from ``/proc``) is sampled every
``--rss-every`` seconds. At the end it waits for the request-log writer to flush and reports:

- requests sent, completed and errors (any non-200, any response without a final chunk, any
  stream not ending with ``data: [DONE]``; :func:`benchmarks.loadgen.run_load` ``check_streams``);
- rows the run added to the ``requests`` table and the run's increase of the Prometheus request
  counter (``litellm_proxy_total_requests_metric_total``, all label sets) and of the routing
  decisions counter, each against the requests sent;
- RSS at the end of the warm-up (``--warmup-s``), the maximum after it and at the end;
- per ``--interval`` seconds: completed requests, errors, req/s, latency and TTFT p50/p99, RSS;
- one verdict line per bar (:func:`verdict`): memory flat within 10% after the warm-up, zero
  errors and no crash, no lost log rows.

CPU layout (``split``, default): load generator on CPU 0, upstream and gateway on CPU 1.
The counts are a before/after delta over the whole ``requests`` table: give ``--database-url`` a
database nothing else writes to during the run.

    python -m benchmarks.soak --json var/soak.json --md var/soak.md      # 5 minutes, c = 64, streaming
    python -m benchmarks.soak --seconds 60 --warmup-s 20                 # a short validation run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.loadgen import LoadResult, Sample, install_uvloop, prompt_bodies, run_load
from benchmarks.overhead import (
    benchmark_dataset,
    cpu_seconds,
    environ,
    free_port,
    machine,
    prompt_embeddings,
    scrape,
    server,
    static_router,
    versions,
    write_json,
)
from benchmarks.vs_litellm_proxy import PROXY_ENV, start_gateway

ROOT = Path(__file__).resolve().parent.parent
REQUESTS = "litellm_proxy_total_requests_metric_total"
DECISIONS = "uniroute_routing_decisions_total"
LOG_DROPPED = "uniroute_request_log_dropped_total"
LOG_REJECTED = "uniroute_request_log_rejected_total"
MB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (``VmRSS``), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _pcts(values: Sequence[float]) -> tuple[float | None, float | None]:
    """p50 and p99 in ms of values in seconds (None without values)."""
    if not values:
        return None, None
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def intervals(samples: Sequence[Sample], t0: float, width_s: float,
              rss: Sequence[tuple[float, int]] = ()) -> list[dict[str, Any]]:
    """Per ``width_s`` window (by completion time since ``t0``): requests, errors, req/s, p50/p99, last RSS.

    Latency and TTFT percentiles are over the window's successful requests; the last window may be
    shorter (it ends with the last completion) and its req/s uses its own length.
    """
    if not samples:
        return []
    ends = [s.end_s - t0 for s in samples]
    n = int(max(ends) // width_s) + 1
    buckets: list[list[Sample]] = [[] for _ in range(n)]
    for s, e in zip(samples, ends, strict=True):
        buckets[min(n - 1, max(0, int(e // width_s)))].append(s)
    out: list[dict[str, Any]] = []
    for k, bucket in enumerate(buckets):
        start = k * width_s
        length = min(width_s, max(ends) - start) if k == n - 1 else width_s
        ok = [s for s in bucket if 200 <= s.status < 300 and s.error is None]
        p50, p99 = _pcts([s.latency_s for s in ok])
        t50, t99 = _pcts([s.ttft_s for s in ok if s.ttft_s is not None])
        inside = [r for t, r in rss if start <= t < start + width_s]
        out.append({"t_start_s": start, "t_end_s": start + length, "completed": len(ok),
                    "errors": len(bucket) - len(ok), "rps": len(ok) / length if length > 0 else 0.0,
                    "latency_p50_ms": p50, "latency_p99_ms": p99, "ttft_p50_ms": t50, "ttft_p99_ms": t99,
                    "rss_mb": inside[-1] / MB if inside else None})
    return out


def memory_after_warmup(rss: Sequence[tuple[float, int]], warmup_s: float) -> dict[str, float] | None:
    """RSS (MB) at the first sample at or after ``warmup_s``, the maximum from then on, and the last; None if none."""
    after = [r for t, r in rss if t >= warmup_s]
    if not after:
        return None
    return {"warm_mb": after[0] / MB, "max_mb": max(after) / MB, "end_mb": after[-1] / MB,
            "growth": max(after) / after[0] - 1.0 if after[0] else float("inf")}


def verdict(*, rss: Sequence[tuple[float, int]], warmup_s: float, sent: int, ok: int, crashed: bool,
            rows: int, counted: float, tolerance: float = 0.10) -> list[dict[str, Any]]:
    """One line per soak bar: ``{"bar", "measured", "met"}`` (``met`` None: not measurable in this run)."""
    lines: list[dict[str, Any]] = []
    mem = memory_after_warmup(rss, warmup_s)
    bar = f"memory flat (within {tolerance:.0%} after the {warmup_s:g} s warm-up)"
    if mem is None:
        lines.append({"bar": bar, "measured": f"no RSS sample after {warmup_s:g} s (run too short)", "met": None})
    else:
        lines.append({"bar": bar, "met": mem["max_mb"] <= mem["warm_mb"] * (1.0 + tolerance),
                      "measured": f"RSS {mem['warm_mb']:.1f} MB at warm-up, max {mem['max_mb']:.1f} MB after it "
                                  f"({mem['growth']:+.1%}), {mem['end_mb']:.1f} MB at the end"})
    errors = sent - ok
    lines.append({"bar": "zero errors, no crash", "met": errors == 0 and not crashed and sent > 0,
                  "measured": f"{errors} errors in {sent} requests; gateway {'DIED' if crashed else 'alive'}"})
    lines.append({"bar": "no lost log rows (rows = Prometheus count = requests sent)",
                  "met": rows == sent and counted == sent,
                  "measured": f"{rows} rows logged, Prometheus counted {counted:g}, {sent} requests sent"})
    return lines


def count_rows(database_url: str) -> int:
    from gateway.store.engine import create_engine_for

    engine = create_engine_for(database_url)
    try:
        with engine.connect() as c:
            return int(c.exec_driver_sql("SELECT count(*) FROM requests").scalar_one())
    finally:
        engine.dispose()


def wait_for_rows(database_url: str, target: int, timeout_s: float) -> tuple[int, float]:
    """Poll the ``requests`` table until it holds ``target`` rows (or ``timeout_s``): (rows, seconds waited)."""
    t0 = time.monotonic()
    rows = count_rows(database_url)
    while rows < target and time.monotonic() - t0 < timeout_s:
        time.sleep(0.5)
        rows = count_rows(database_url)
    return rows, time.monotonic() - t0


async def drive(url: str, bodies: Sequence[dict[str, Any]], *, pid: int, seconds: float, concurrency: int,
                new_prompts: bool, rss_every_s: float) -> tuple[LoadResult, list[tuple[float, int]], float]:
    """The load, with the gateway's RSS sampled alongside: (result, [(seconds since start, RSS bytes)], t0)."""
    rss: list[tuple[float, int]] = []
    done = asyncio.Event()
    t0 = time.perf_counter()

    async def sampler() -> None:
        while not done.is_set():
            rss.append((time.perf_counter() - t0, rss_bytes(pid)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), rss_every_s)
        rss.append((time.perf_counter() - t0, rss_bytes(pid)))

    task = asyncio.create_task(sampler())
    try:
        result = await run_load(url, bodies, concurrency=concurrency, max_requests=10**12, max_seconds=seconds,
                                new_prompts=new_prompts, check_streams=True)
    finally:
        done.set()
        await task
    return result, rss, t0


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def markdown(report: dict[str, Any]) -> str:
    s, mem = report["summary"], report.get("memory") or {}
    lines = [
        "| requests sent | completed | errors | logged rows | Prometheus count | routing decisions | req/s "
        "| gateway CPU ms/req | RSS warm-up / max after / end (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {s['sent']} | {s['completed']} | {s['errors']} | {s['rows']} | {s['counted']:g} | {s['decisions']:g} "
        f"| {s['rps']:.1f} | {s['gateway_cpu_ms_per_req']:.2f} "
        f"| {mem.get('warm_mb', 0):.1f} / {mem.get('max_mb', 0):.1f} / {mem.get('end_mb', 0):.1f} |",
        "",
        "| t (s) | completed | errors | req/s | latency p50 ms | latency p99 ms | TTFT p50 ms | TTFT p99 ms "
        "| gateway RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in report["intervals"]:
        lines.append(f"| {w['t_start_s']:.0f}–{w['t_end_s']:.0f} | {w['completed']} | {w['errors']} | {w['rps']:.1f} "
                     f"| {_ms(w['latency_p50_ms'])} | {_ms(w['latency_p99_ms'])} | {_ms(w['ttft_p50_ms'])} "
                     f"| {_ms(w['ttft_p99_ms'])} | {_ms(w['rss_mb'])} |")
    lines += ["", "| bar | measured | met? |", "|---|---|---|"]
    for v in report["verdict"]:
        met = {True: "**yes**", False: "**no**", None: "not measured"}[v["met"]]
        lines.append(f"| {v['bar']} | {v['measured']} | {met} |")
    return "\n".join(lines)


def soak_bodies(prompts: Sequence[str], mode: str) -> list[dict[str, Any]]:
    """Request bodies for ``model: "auto"``: all streaming, all plain, or alternating (``mixed``)."""
    if mode != "mixed":
        return prompt_bodies(prompts, "auto", stream=mode == "stream")
    if len(prompts) > 1:
        prompts = prompts[: len(prompts) // 2 * 2]  # an even count: the alternation survives the rotation
    streams, plain = prompt_bodies(prompts, "auto", stream=True), prompt_bodies(prompts, "auto", stream=False)
    return [streams[i] if i % 2 == 0 else plain[i] for i in range(len(prompts))]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0, help="length of the load")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--mode", choices=["stream", "plain", "mixed"], default="stream")
    ap.add_argument("--stream-chunks", type=int, default=20, help="content chunks per streamed answer")
    ap.add_argument("--dataset", default=None, help="routing benchmark folder (default: $UNIROUTE_DATASET or "
                                                    "the repository's data/mmlu_pro_27; a synthetic one when absent)")
    ap.add_argument("--prompts", type=int, default=1000, help="distinct dataset prompts to cycle through")
    ap.add_argument("--new-prompts", action="store_true", help="a unique suffix on every prompt (no cache hit)")
    ap.add_argument("--static-router", default="var/router-static", metavar="DIR",
                    help="static-embedder artifact (fitted here if missing); ignored with --router-yaml")
    ap.add_argument("--router-yaml", default=None, help="the gateway's router section (policy uniroute), e.g. a "
                                                        "MiniLM artifact")
    ap.add_argument("--database-url", default=None, help="request log database (default: SQLite in the temp "
                                                         "folder); nothing else may write to it during the run")
    ap.add_argument("--warmup-s", type=float, default=60.0, help="memory is compared from here on")
    ap.add_argument("--rss-every", type=float, default=5.0, help="RSS sampling period, seconds")
    ap.add_argument("--interval", type=float, default=30.0, help="reporting window, seconds")
    ap.add_argument("--tolerance", type=float, default=0.10, help="allowed RSS growth after the warm-up")
    ap.add_argument("--flush-timeout", type=float, default=60.0, help="how long to wait for the log rows")
    ap.add_argument("--cpu-layout", choices=["split", "none"], default="split")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (configs, logs, database)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None, help="write the markdown tables here")
    args = ap.parse_args(argv)

    import gateway  # noqa: F401  (offline environment for anything importing litellm)

    tmp = Path(tempfile.mkdtemp(prefix="uniroute-soak-"))
    dataset, data = benchmark_dataset(args.dataset, args.prompts, tmp)
    prompts = data.prompts[: args.prompts]
    if args.router_yaml:
        router: dict[str, Any] = yaml.safe_load(Path(args.router_yaml).read_text(encoding="utf-8")) or {}
    else:
        router = static_router(Path(args.static_router), dataset)
    router.pop("policy", None)
    embed_cache = tmp / "embed-cache"
    if args.new_prompts:
        router["embed_cache_dir"] = str(embed_cache)
    database_url = args.database_url or f"sqlite:///{tmp / 'soak.db'}"

    split = args.cpu_layout == "split" and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    cpus = "1" if split else None
    layout = ("load generator pinned to CPU 0; replay upstream and gateway pinned to CPU 1 (taskset)"
              if split else "no pinning (OS scheduler)")
    rport, gport = free_port(), free_port()
    replay_cmd = [sys.executable, "-m", "gateway.cli.main", "replay", "--dataset", str(dataset), "--port", str(rport),
                  "--stream-chunks", str(args.stream_chunks)]
    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "versions": versions(), "cpu_layout": layout, "dataset": str(dataset),
        "n_prompts": len(prompts), "seconds": args.seconds, "concurrency": args.concurrency, "mode": args.mode,
        "stream_chunks": args.stream_chunks, "new_prompts": args.new_prompts,
        "router": {k: v for k, v in router.items() if k != "embed_cache_dir"},
        "database": database_url.split(":", 1)[0], "warmup_s": args.warmup_s, "interval_s": args.interval,
    }
    print(f"soak: {args.seconds:g} s at c={args.concurrency} ({args.mode}{', new prompts' if args.new_prompts else ''}); "
          f"dataset {dataset}; {layout}; temp {tmp}", file=sys.stderr)
    try:
        with environ(**PROXY_ENV), contextlib.ExitStack() as stack:
            stack.enter_context(server(replay_cmd, tmp / "replay.log", f"http://127.0.0.1:{rport}/health", cpus))
            gproc, _, _ = start_gateway(stack, tmp, dataset, rport, gport, router, cpus, fallback=False,
                                        database_url=database_url)
            base = f"http://127.0.0.1:{gport}"
            rows_before, metrics_before = count_rows(database_url), scrape(base)
            embeds_before = prompt_embeddings(base)
            cpu_before = cpu_seconds(gproc.pid)
            if split:
                os.sched_setaffinity(0, {0})
            install_uvloop()
            result, rss, t0 = asyncio.run(drive(
                base + "/v1/chat/completions", soak_bodies(prompts, args.mode), pid=gproc.pid, seconds=args.seconds,
                concurrency=args.concurrency, new_prompts=args.new_prompts, rss_every_s=args.rss_every))
            cpu = cpu_seconds(gproc.pid) - cpu_before
            crashed = gproc.poll() is not None
            sent = len(result.samples)
            rows, waited = wait_for_rows(database_url, rows_before + sent, args.flush_timeout)
            metrics = scrape(base) if not crashed else {}
            if not crashed:  # where this run's prompt embeddings came from (memory / disk / computed)
                after = prompt_embeddings(base)
                info["gateway_prompt_embeddings"] = {k: v - embeds_before.get(k, 0) for k, v in after.items()}
            info["rows_wait_s"] = round(waited, 2)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    info["machine"]["loadavg_end"] = list(os.getloadavg())

    def delta(name: str) -> float:  # 0 when the gateway died (nothing to scrape)
        return metrics.get(name, 0.0) - metrics_before.get(name, 0.0) if metrics else 0.0

    summary = result.summary()
    report: dict[str, Any] = {**info, "summary": {
        "sent": sent, "completed": summary["ok"], "errors": summary["errors"], "status": summary["status"],
        "rows": rows - rows_before, "counted": delta(REQUESTS), "decisions": delta(DECISIONS),
        "log_dropped": delta(LOG_DROPPED), "log_rejected": delta(LOG_REJECTED), "crashed": crashed,
        "rps": summary["throughput_rps"], "latency_ms": summary["latency_ms"], "ttft_ms": summary.get("ttft_ms"),
        "gateway_cpu_ms_per_req": 1000.0 * cpu / max(1, sent),
    }}
    report["memory"] = memory_after_warmup(rss, args.warmup_s)
    report["rss_mb"] = [(round(t, 2), round(r / MB, 2)) for t, r in rss]
    report["intervals"] = intervals(result.samples, t0, args.interval, rss)
    report["verdict"] = verdict(rss=rss, warmup_s=args.warmup_s, sent=sent, ok=summary["ok"], crashed=crashed,
                                rows=report["summary"]["rows"], counted=report["summary"]["counted"],
                                tolerance=args.tolerance)
    table = markdown(report)
    print(table)
    print(f"\n{info['date_utc']}; {info['machine']['cpus']} CPUs ({info['machine']['cpu_model']}); {layout}; "
          f"router {info['router']}; log rows flushed {waited:.1f} s after the load; load average "
          f"{info['machine']['loadavg_start']} -> {info['machine']['loadavg_end']}")
    write_json(args.json, {**report, "table": table})
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table + "\n", encoding="utf-8")
    return 0 if all(v["met"] is not False for v in report["verdict"]) else 1


if __name__ == "__main__":
    sys.exit(main())
