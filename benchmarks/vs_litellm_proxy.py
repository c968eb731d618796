"""The UniRoute gateway against the LiteLLM proxy, side by side in one run (issue 6, part 6).

Three targets, the same upstream, the same load tool (:mod:`benchmarks.loadgen`):

- ``direct``         → the replay upstream itself (``uniroute replay --stream-chunks 20``);
- ``uniroute``       → the gateway (``uniroute serve``, one uvicorn worker), ``model: "auto"``;
- ``litellm-proxy``  → the LiteLLM proxy (``litellm --num_workers 1``, default router, no database),
  from its own virtual environment (``bash benchmarks/setup_litellm_proxy.sh``), with a
  ``model_list`` of the same replayed models at the same upstream; it is asked for the model
  ``auto`` picks (the proxy has no ``auto``).

Routing: the gateway is started with ``router.policy: uniroute`` (plus ``--static-router DIR``:
the static-embedder artifact in DIR, fitted there first if missing, with ``max_wait_ms: 0``; plus
``--router-yaml``, if given) and, when that build or artifact is not available, with the
placeholder ``cheapest`` policy; the policy actually served is printed and recorded (``policy``),
never assumed.

Prompts: by default the 1,000 dataset prompts in rotation (after the warm-up every one is in the
gateway's embedding caches). ``--new-prompts``: every request's prompt is the dataset prompt plus a
unique suffix (:func:`benchmarks.loadgen.new_prompt_requests`), so the gateway embeds every prompt
(in-memory LRU and disk cache both miss; the gateway gets a fresh, empty ``router.embed_cache_dir``
in the temp folder). Where every routed prompt's embedding came from is read from the gateway's
``uniroute_prompt_embeddings_total{source=memory|disk|computed}`` and reported
(``gateway_prompt_embeddings``; with ``--new-prompts`` every one must be ``computed``).

Each cell (streaming or not × concurrency 1/16/64) warms every target up, then runs
``--repeat`` rounds cycling through the targets (each run: ``--requests`` or ``--seconds``,
whichever first). Reported: p50/p99 latency (TTFT for streams), errors, throughput, CPU
ms/request of each server process (from /proc), and whether a server died. "Maximum
throughput" is the highest req/s over the concurrencies measured.

CPU layout (``split``, default): load generator on CPU 0, upstream + gateway + proxy on CPU 1
(only one of the two servers is driven at a time). With ``--workers 2`` the gateway's workers are
not pinned (they need both cores; the load generator stays on CPU 0 and shares it).

Issue 14's points: ``--workers 2`` runs the gateway with ``server.workers: 2`` (CPU is summed over its
worker processes), ``--database-url`` puts its request log in PostgreSQL, ``--targets`` runs only some
targets (e.g. ``direct uniroute`` for the two-worker point), and a concurrency above the gateway's
``server.max_in_flight`` (``--max-in-flight``, default the shipped default) is an overload point: its
503s with ``Retry-After`` are reported apart from other errors (``shed``), the latency percentiles are
those of the admitted (200) requests, and ``GET /health/liveliness`` is probed every 50 ms during every
gateway run, each probe from a process of its own (:mod:`benchmarks.liveprobe`), on the gateway's liveness
port (``server.health_port``, answered by a thread: ``live p99 / max``) and on its main port (``main-port
live``, answered by the event loop); the probes, 40/s, are in the gateway's CPU but not in its request count. A client refused with ``Retry-After`` waits that long before its
next request, as the OpenAI SDK does (``--ignore-retry-after``: it retries at once).

    bash benchmarks/setup_litellm_proxy.sh
    python -m benchmarks.vs_litellm_proxy --json var/vs_litellm_proxy.json
    # the default config, new prompts, plus the overload point (issue 14)
    python -m benchmarks.vs_litellm_proxy --static-router var/router-static --new-prompts --concurrency 1 16 64 256
    # two workers against one, PostgreSQL request log (createdb first)
    python -m benchmarks.vs_litellm_proxy --static-router var/router-static --new-prompts --targets direct uniroute \
        --workers 2 --database-url postgresql+psycopg://postgres@127.0.0.1:5432/uniroute_bench
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from benchmarks.liveprobe import liveliness_probe
from benchmarks.loadgen import LoadResult, install_uvloop, prompt_bodies, run_load
from benchmarks.overhead import (
    OFFLINE_ENV,
    benchmark_dataset,
    cpu_seconds,
    environ,
    free_port,
    machine,
    merge,
    pct,
    prompt_embeddings,
    server,
    static_router,
    tail,
    versions,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent
PROXY_VENV = ROOT / "benchmarks" / ".venv-litellm-proxy"
TARGETS = ("direct", "uniroute", "litellm-proxy")
PROXY_ENV = {**OFFLINE_ENV, "DISABLE_ADMIN_UI": "True"}  # the LiteLLM proxy's admin UI is not benchmarked


def proxy_version(venv: Path) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def gateway_config(tmp: Path, dataset: Path, rport: int, gport: int, router: dict[str, Any],
                   database_url: str | None = None, server: dict[str, Any] | None = None) -> Path:
    """A gateway config (one worker unless ``server`` says otherwise): the replayed dataset's models, ``router``,
    a SQLite log in ``tmp`` by default."""
    config = {
        "server": {"host": "127.0.0.1", "port": gport, "log_level": "warning", "access_log": False, **(server or {})},
        "database_url": database_url or f"sqlite:///{tmp / 'bench.db'}",
        # like the proxy's single master key, no per-key budgets or limits: open mode
        "auth": {"mode": "open"},
        "router": router,
        "replay_models": {"dataset": str(dataset.resolve()), "api_base": f"http://127.0.0.1:{rport}/v1"},
    }
    path = tmp / f"gateway-{router.get('policy', 'x')}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def proxy_config(tmp: Path, models: Sequence[str], rport: int) -> Path:
    config = {
        "model_list": [{"model_name": m, "litellm_params": {"model": f"openai/{m}",
                                                            "api_base": f"http://127.0.0.1:{rport}/v1",
                                                            "api_key": "replay"}} for m in models],
        "litellm_settings": {"telemetry": False, "set_verbose": False},
    }
    path = tmp / "litellm-proxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | c | target | requests | errors | shed (503 + Retry-After) | p50 ms | p99 ms | added p50 ms "
             "| added p99 ms | req/s | server CPU ms/req | machine CPU ms/req | live p99 / max ms "
             "| main-port live p99 / max ms |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        add50 = "" if r["target"] == "direct" else f"{r['added_p50_ms']:+.2f}"
        add99 = "" if r["target"] == "direct" else f"{r['added_p99_ms']:+.2f}"
        dead = " (server died)" if r.get("crashed") else ""
        live, main = (f"{r[k + '_p99_ms']:.1f} / {r[k + '_max_ms']:.1f}" if r.get(k + "_p99_ms") is not None else ""
                      for k in ("live", "main_live"))
        lines.append(
            f"| {'stream TTFT' if r['stream'] else 'non-stream'} | {r['concurrency']} | {r['target']}{dead} "
            f"| {r['requests']} | {r['errors'] - r.get('shed', 0)} | {r.get('shed', 0)} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {add50} | {add99} | {r['throughput_rps']:.0f} | {r['server_cpu_ms_per_req']:.2f} "
            f"| {r.get('machine_cpu_ms_per_req', float('nan')):.2f} "
            f"| {live} | {main} |")
    return "\n".join(lines)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its child processes (uvicorn's workers), from /proc."""
    total = cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            total += cpu_seconds(int(stat.parent.name))
    return total


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (every core, every process: /proc/stat's user, nice, system,
    irq and softirq; not idle, iowait, nor the time the hypervisor gave to other guests)."""
    user, nice, system, _idle, _iowait, irq, softirq = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def maxima(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | max req/s non-streaming | max streams/s (20 chunks) | errors (all cells) |",
             "|---|---:|---:|---:|"]
    for t in sorted({r["target"] for r in rows}, key=TARGETS.index):
        mine = [r for r in rows if r["target"] == t]
        plain = max((r["throughput_rps"] for r in mine if not r["stream"]), default=0.0)
        stream = max((r["throughput_rps"] for r in mine if r["stream"]), default=0.0)
        lines.append(f"| {t} | {plain:.0f} | {stream:.0f} | {sum(r['errors'] - r.get('shed', 0) for r in mine)} |")
    return "\n".join(lines)


async def measure(
    urls: dict[str, str],
    models: dict[str, str],
    prompts: Sequence[str],
    procs: dict[str, subprocess.Popen[bytes]],
    headers: dict[str, dict[str, str]],
    *,
    concurrencies: Sequence[int],
    modes: Sequence[bool],
    requests: int,
    seconds: float,
    warmup: int,
    repeat: int,
    new_prompts: bool = False,
    sent: dict[str, int] | None = None,
    targets: Sequence[str] = TARGETS,
    live_urls: dict[str, dict[str, str]] | None = None,
    honor_retry_after: bool = True,
) -> list[dict[str, Any]]:
    """Run every cell; ``sent`` (if given) counts the requests sent to each target, warm-ups included;
    ``live_urls``: target → {label: a liveliness URL} probed every 50 ms during its runs (label ``live``: the
    row's ``live_*`` fields; another label ``x``: its ``x_*`` fields)."""
    rows: list[dict[str, Any]] = []
    live_urls = live_urls or {}
    sent = {} if sent is None else sent
    server_of = {"direct": "replay", "uniroute": "uniroute", "litellm-proxy": "litellm-proxy"}
    for stream in modes:
        for conc in concurrencies:
            bodies = {t: prompt_bodies(prompts, models[t], stream=stream) for t in targets}
            for t in targets:
                if procs[server_of[t]].poll() is None:
                    warm = await run_load(urls[t], bodies[t], concurrency=conc, max_requests=warmup, max_seconds=10,
                                          headers=headers[t], new_prompts=new_prompts,
                                          honor_retry_after=honor_retry_after)
                    sent[t] = sent.get(t, 0) + len(warm.samples)
            runs: dict[str, list[LoadResult]] = {t: [] for t in targets}
            cpu, busy = dict.fromkeys(targets, 0.0), dict.fromkeys(targets, 0.0)
            live: dict[tuple[str, str], list[float]] = {(t, k): [] for t in targets for k in live_urls.get(t, {})}
            live_failed = dict.fromkeys(live, 0)
            for _ in range(repeat):
                for t in targets:
                    pid = procs[server_of[t]].pid
                    before, machine_before = tree_cpu_seconds(pid), machine_busy_seconds()
                    with contextlib.ExitStack() as probing:
                        probes = {k: probing.enter_context(liveliness_probe(u)) for k, u in live_urls.get(t, {}).items()}
                        runs[t].append(await run_load(urls[t], bodies[t], concurrency=conc, max_requests=requests,
                                                      max_seconds=seconds, headers=headers[t],
                                                      new_prompts=new_prompts, honor_retry_after=honor_retry_after))
                    for k, probe in probes.items():
                        live[t, k] += probe.latencies_ms
                        live_failed[t, k] += probe.failures
                    cpu[t] += tree_cpu_seconds(pid) - before
                    busy[t] += machine_busy_seconds() - machine_before
                    sent[t] = sent.get(t, 0) + len(runs[t][-1].samples)
            merged = {t: merge(runs[t]) for t in targets}
            nan = {"p50": float("nan"), "p99": float("nan")}
            base = pct(merged["direct"], stream) if "direct" in merged else nan
            for t in targets:
                p = pct(merged[t], stream)
                s = merged[t].summary()
                crashed = procs[server_of[t]].poll() is not None
                rows.append({
                    "stream": stream, "concurrency": conc, "target": t, "model": models[t],
                    "requests": s["requests"], "errors": s["errors"], "status": s["status"],
                    "p50_ms": p["p50"], "p99_ms": p["p99"],
                    "added_p50_ms": p["p50"] - base["p50"], "added_p99_ms": p["p99"] - base["p99"],
                    "throughput_rps": s["throughput_rps"], "crashed": crashed,
                    "server_cpu_ms_per_req": 1000.0 * cpu[t] / max(1, s["requests"]),
                    # everything the run cost the machine: the server, the load generator, the upstream, the
                    # probes, the database (a bound for more workers: the cores / this is the most req/s possible)
                    "machine_cpu_ms_per_req": 1000.0 * busy[t] / max(1, s["requests"]),
                    "shed": merged[t].shed,
                    **{f: v for k in live_urls.get(t, {}) for f, v in {
                        f"{k}_p99_ms": float(np.percentile(live[t, k], 99)) if live[t, k] else None,
                        f"{k}_max_ms": float(max(live[t, k])) if live[t, k] else None,
                        f"{k}_probes": len(live[t, k]) + live_failed[t, k], f"{k}_failed": live_failed[t, k]}.items()},
                })
                print(f"  {'stream' if stream else 'plain '} c={conc:<3} {t:<14} n={s['requests']:<6} "
                      f"err={s['errors']:<4} shed={merged[t].shed:<5} p50={p['p50']:.2f} p99={p['p99']:.2f} ms rps={s['throughput_rps']:.0f} "
                      f"cpu={rows[-1]['server_cpu_ms_per_req']:.2f} ms/req{' DIED' if crashed else ''}",
                      file=sys.stderr, flush=True)
    return rows


def start_gateway(stack: contextlib.ExitStack, tmp: Path, dataset: Path, rport: int, gport: int,
                  router_extra: dict[str, Any], cpus: str | None, *, fallback: bool = True,
                  database_url: str | None = None,
                  server_extra: dict[str, Any] | None = None) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start the gateway: learned routing if it starts, else (``fallback``) the placeholder policy, with the reason."""
    reason = ""
    routers = [{"policy": "uniroute", **router_extra}] + ([{"policy": "cheapest"}] if fallback else [])
    for router in routers:
        cfg = gateway_config(tmp, dataset, rport, gport, router, database_url, server_extra)
        cmd = [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(cfg), "--host", "127.0.0.1",
               "--port", str(gport)]
        log = tmp / f"gateway-{router['policy']}.log"
        try:
            proc = stack.enter_context(server(cmd, log, f"http://127.0.0.1:{gport}/health/readiness", cpus))
        except RuntimeError:
            lines = tail(log, 40).splitlines()
            reason = next((ln.strip() for ln in reversed(lines) if "policy" in ln), None) or \
                (lines[-1].strip() if lines else "did not start")
            print(f"gateway with router.policy={router['policy']} did not start: {reason}", file=sys.stderr)
            continue
        return proc, router["policy"], reason
    last = routers[-1]["policy"]
    raise RuntimeError(f"the gateway did not start (router.policy={last}):\n{tail(tmp / f'gateway-{last}.log')}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.vs_litellm_proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=None, help="routing benchmark folder (default: $UNIROUTE_DATASET or "
                                                    "the repository's data/mmlu_pro_27; a synthetic one when absent)")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--modes", choices=["plain", "stream"], nargs="+", default=["plain", "stream"])
    ap.add_argument("--stream-chunks", type=int, default=20, help="content chunks per streamed answer")
    ap.add_argument("--requests", type=int, default=1500, help="per run (a run also stops after --seconds)")
    ap.add_argument("--seconds", type=float, default=6.0, help="per run")
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--repeat", type=int, default=2, help="rounds per cell, cycling through the targets")
    ap.add_argument("--static-router", default=None, metavar="DIR",
                    help="route with the static-embedder artifact in DIR (fitted there from the dataset if missing: "
                         "`uniroute router fit --embedder static`), max_wait_ms 0")
    ap.add_argument("--router-yaml", default=None, help="YAML mapping merged into the gateway's router section "
                                                        "(e.g. the UniRoute artifact path)")
    ap.add_argument("--new-prompts", action="store_true",
                    help="a unique suffix on every prompt: the gateway embeds every request's prompt (no cache hit)")
    ap.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS),
                    help="which targets to drive (the added-latency columns need direct)")
    ap.add_argument("--workers", type=int, default=1, help="the gateway's server.workers (2: the two-worker point)")
    ap.add_argument("--max-in-flight", type=int, default=None,
                    help="the gateway's server.max_in_flight (default: the shipped default)")
    ap.add_argument("--database-url", default=None, help="the gateway's request log (default: SQLite in the temp "
                                                         "folder), e.g. a fresh PostgreSQL database")
    ap.add_argument("--ignore-retry-after", action="store_true",
                    help="a client refused with Retry-After (503 overloaded, 429) retries at once instead of waiting "
                         "as the OpenAI SDK does")
    ap.add_argument("--proxy-venv", default=str(PROXY_VENV))
    ap.add_argument("--cpu-layout", choices=["split", "none"], default="split")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (configs, server logs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import gateway  # noqa: F401  (offline environment for anything importing litellm)

    venv = Path(args.proxy_venv)
    targets = [t for t in TARGETS if t in args.targets]
    if "litellm-proxy" in targets and not (venv / "bin" / "litellm").exists():
        ap.error(f"no LiteLLM proxy at {venv}; run: bash benchmarks/setup_litellm_proxy.sh")
    tmp = Path(tempfile.mkdtemp(prefix="uniroute-vs-litellm-"))
    dataset, data = benchmark_dataset(args.dataset, args.prompts, tmp)
    prompts = data.prompts[: args.prompts]
    router_extra: dict[str, Any] = static_router(Path(args.static_router), dataset) if args.static_router else {}
    if args.router_yaml:
        router_extra.update(yaml.safe_load(Path(args.router_yaml).read_text(encoding="utf-8")) or {})
    router_extra.pop("policy", None)
    embed_cache = tmp / "embed-cache"
    if args.new_prompts:
        router_extra["embed_cache_dir"] = str(embed_cache)

    split = args.cpu_layout == "split" and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    cpus = "1" if split else None
    layout = ("load generator pinned to CPU 0; replay upstream, UniRoute gateway and LiteLLM proxy pinned to "
              "CPU 1 (taskset; one server driven at a time)" if split else "no pinning (OS scheduler)")
    server_extra: dict[str, Any] = {"workers": args.workers}
    if args.max_in_flight is not None:
        server_extra["max_in_flight"] = args.max_in_flight
    gateway_cpus = cpus if args.workers == 1 else None
    if split and args.workers > 1:
        layout += f"; except the gateway's {args.workers} workers: not pinned (both cores)"
    rport, gport, pport, hport = free_port(), free_port(), free_port(), free_port()
    server_extra["health_port"] = hport  # the liveness listener (a thread; gateway/http/liveness.py)
    replay_cmd = [sys.executable, "-m", "gateway.cli.main", "replay", "--dataset", str(dataset), "--port", str(rport),
                  "--stream-chunks", str(args.stream_chunks)]
    proxy_cmd = [str(venv / "bin" / "litellm"), "--config", str(proxy_config(tmp, data.models, rport)),
                 "--host", "127.0.0.1", "--port", str(pport), "--num_workers", "1"]
    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.vs_litellm_proxy " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "versions": {**versions(), "litellm_proxy": proxy_version(venv) if "litellm-proxy" in targets else "not run"},
        "cpu_layout": layout, "dataset": str(dataset), "n_prompts": len(prompts),
        "stream_chunks": args.stream_chunks, "requests_per_run": args.requests, "seconds_per_run": args.seconds,
        "repeat": args.repeat, "warmup": args.warmup, "new_prompts": args.new_prompts,
        "router": {k: v for k, v in router_extra.items() if k != "embed_cache_dir"},
        "targets": targets, "gateway_server": server_extra, "honor_retry_after": not args.ignore_retry_after, "database": "postgresql" if args.database_url and
        args.database_url.startswith("postgres") else "sqlite",
    }
    print(f"vs_litellm_proxy: dataset {dataset}; {layout}; temp {tmp}", file=sys.stderr)
    master_key = "sk-bench-" + secrets.token_hex(16)  # the proxy refuses to start without one
    try:
        # the environment is inherited by the proxy (and harmless for the others)
        with environ(**PROXY_ENV, LITELLM_MASTER_KEY=master_key), contextlib.ExitStack() as stack:
            rproc = stack.enter_context(server(replay_cmd, tmp / "replay.log", f"http://127.0.0.1:{rport}/health",
                                               cpus))
            pproc = stack.enter_context(server(proxy_cmd, tmp / "litellm-proxy.log",
                                               f"http://127.0.0.1:{pport}/health/liveliness", cpus)) \
                if "litellm-proxy" in targets else rproc  # (not driven)
            gproc, policy, reason = start_gateway(stack, tmp, dataset, rport, gport, router_extra, gateway_cpus,
                                                  database_url=args.database_url, server_extra=server_extra)
            info["policy"] = policy
            if policy != "uniroute":
                info["policy_note"] = f"learned routing unavailable, placeholder policy served: {reason}"
            gw = f"http://127.0.0.1:{gport}/v1/chat/completions"
            probe = httpx.post(gw, json={"model": "auto", "messages": [{"role": "user", "content": prompts[0]}]},
                               timeout=60)
            probe.raise_for_status()
            chosen = str(probe.json()["model"])
            info["auto_model"] = chosen
            urls = {"direct": f"http://127.0.0.1:{rport}/v1/chat/completions", "uniroute": gw,
                    "litellm-proxy": f"http://127.0.0.1:{pport}/v1/chat/completions"}
            models = {"direct": chosen, "uniroute": "auto", "litellm-proxy": chosen}
            if split:
                os.sched_setaffinity(0, {0})
            install_uvloop()
            sent: dict[str, int] = {}
            rows = asyncio.run(measure(
                urls, models, prompts, {"replay": rproc, "uniroute": gproc, "litellm-proxy": pproc},
                {"direct": {}, "uniroute": {}, "litellm-proxy": {"Authorization": f"Bearer {master_key}"}},
                concurrencies=args.concurrency, modes=[m == "stream" for m in args.modes],
                requests=args.requests, seconds=args.seconds, warmup=args.warmup, repeat=args.repeat,
                new_prompts=args.new_prompts, sent=sent, targets=targets,
                live_urls={"uniroute": {"live": f"http://127.0.0.1:{hport}/health/liveliness",
                                        "main_live": f"http://127.0.0.1:{gport}/health/liveliness"}},
                honor_retry_after=not args.ignore_retry_after))
            if gproc.poll() is None:
                info["gateway_prompt_embeddings"] = prompt_embeddings(f"http://127.0.0.1:{gport}")
        info["requests_sent"] = sent
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    info["machine"]["loadavg_end"] = list(os.getloadavg())
    table, best = markdown(rows), maxima(rows)
    emb = info.get("gateway_prompt_embeddings", {})
    fresh = (f"prompt embeddings {emb.get('computed', 0)} computed, {emb.get('memory', 0)} from memory, "
             f"{emb.get('disk', 0)} from disk for {sent.get('uniroute', 0)} gateway requests (+ probe); ")
    print(table)
    print()
    print(best)
    print(f"\n{info['date_utc']}; {info['machine']['cpus']} CPUs ({info['machine']['cpu_model']}); {layout}; "
          f"policy {info['policy']}{' (' + info.get('policy_note', '') + ')' if info.get('policy_note') else ''}; "
          f"auto -> {chosen}; LiteLLM proxy {info['versions']['litellm_proxy']}; {fresh}load average "
          f"{info['machine']['loadavg_start']} -> {info['machine']['loadavg_end']}")
    write_json(args.json, {**info, "results": rows, "table": table, "maxima": best})
    return 0


if __name__ == "__main__":
    sys.exit(main())
