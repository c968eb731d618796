"""Added latency per request, from the gateway's own request log: finds stalls (issue 14, point 2).

Starts the replay upstream and the gateway as the demo runs them (``uniroute serve``, one worker, open
mode, ``model: "auto"`` routed by UniRoute LearnedMap with the static-embedder artifact and
``max_wait_ms: 0``, the SQLite request log with its journal), then sends ``model: "auto"`` requests with a
**new prompt on every request** (:func:`benchmarks.loadgen.new_prompt_requests`) at each concurrency for
``--seconds``. Afterwards it reads every row of the run from the request log and reports the **added
latency** = ``latency_ms − upstream_latency_ms`` (the time the request spent in the gateway outside the
successful upstream call: parsing, auth, embedding, ranking, LiteLLM's own work, shaping, logging) as
p50 / p99 / p99.9 / max, the number of requests above 50 and 200 ms, and the worst ones with the time
they started, so that stalls show as runs of outliers. The client-side latency is reported beside it, and so is the latency of ``GET /health/liveliness`` probed
every 50 ms during the run: a stall of the gateway's event loop (a long garbage collection, a blocking
call) delays every request in flight whatever it was doing, including the time the log attributes to the
upstream call, and shows as a slow probe.

``--py-spy FILE``: also records the gateway with ``py-spy record --format raw`` for the whole run (the
same folded-stack format as :mod:`benchmarks.cpu_breakdown` reads).

    python -m benchmarks.stalls --seconds 120 --concurrency 1 16 --json var/stalls.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

from benchmarks.liveprobe import liveliness_probe
from benchmarks.loadgen import install_uvloop, prompt_bodies, run_load
from benchmarks.overhead import (
    OFFLINE_ENV,
    benchmark_dataset,
    cpu_seconds,
    environ,
    free_port,
    machine,
    prompt_embeddings,
    server,
    static_router,
    versions,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent


def gateway_config(tmp: Path, dataset: Path, rport: int, gport: int, router: dict[str, Any],
                   database_url: str | None, extra_server: dict[str, Any]) -> Path:
    import yaml

    config = {
        "server": {"host": "127.0.0.1", "port": gport, "log_level": "warning", **extra_server},
        "database_url": database_url or f"sqlite:///{tmp / 'stalls.db'}",
        "database": {"spill_dir": str(tmp / "spill")},
        "auth": {"mode": "open"},
        "router": router,
        "replay_models": {"dataset": str(dataset.resolve()), "api_base": f"http://127.0.0.1:{rport}/v1"},
    }
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def rows_since(database_url: str, since: dt.datetime) -> list[tuple[dt.datetime, float, float | None, int]]:
    """(started_at, latency_ms, upstream_latency_ms, status_code) of every request row started after ``since``."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            q = sa.text("SELECT started_at, latency_ms, upstream_latency_ms, status_code FROM requests "
                        "WHERE started_at >= :t ORDER BY started_at")
            out = []
            for started, lat, up, status in conn.execute(q, {"t": since.replace(tzinfo=None)}):
                if isinstance(started, str):
                    started = dt.datetime.fromisoformat(started)
                out.append((started, float(lat or 0.0), None if up is None else float(up), int(status)))
            return out
    finally:
        engine.dispose()


def added_latency(rows: Sequence[tuple[dt.datetime, float, float | None, int]]) -> dict[str, Any]:
    """Percentiles of latency − upstream latency over the successful rows, the outliers and the worst ones."""
    ok = [(t, lat, up) for t, lat, up, status in rows if status == 200 and up is not None]
    if not ok:
        return {"rows": len(rows), "ok": 0}
    added = np.asarray([lat - up for _, lat, up in ok])
    order = np.argsort(added)[::-1][:10]
    t0 = ok[0][0]
    return {
        "rows": len(rows), "ok": len(ok),
        "p50_ms": float(np.percentile(added, 50)), "p99_ms": float(np.percentile(added, 99)),
        "p999_ms": float(np.percentile(added, 99.9)), "max_ms": float(added.max()),
        "over_50ms": int((added > 50).sum()), "over_200ms": int((added > 200).sum()),
        "worst": [{"t_s": round((ok[i][0] - t0).total_seconds(), 3), "added_ms": round(float(added[i]), 2),
                   "upstream_ms": round(float(ok[i][2]), 2)} for i in order],
    }


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None, seconds: float, gil: bool = False) -> Iterator[None]:
    """``py-spy record`` of ``pid`` for ``seconds`` into ``out`` (raw folded stacks), when ``out`` is given;
    ``gil``: only the thread holding the GIL is sampled (a thread waiting for it is not counted as busy)."""
    if out is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds) + 1), "--rate", "200",
                             "--format", "raw", "--output", str(out), "--nonblocking", *(["--gil"] if gil else [])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield
    finally:
        try:
            proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()


async def load_and_probe(url: str, bodies: list[dict[str, Any]], conc: int, seconds: float) -> tuple[Any, list[float]]:
    """The load, with the main port's ``GET /health/liveliness`` probed every 50 ms from a process of its own
    (:mod:`benchmarks.liveprobe`): it waits for the gateway's event loop, so a stall shows in it."""
    with liveliness_probe(url + "/health/liveliness") as probe:
        res = await run_load(f"{url}/v1/chat/completions", bodies, concurrency=conc, max_requests=10**9,
                             max_seconds=seconds, new_prompts=True)
    return res, probe.latencies_ms


def _pcts(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"n": len(values), "p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)),
            "p999_ms": float(np.percentile(arr, 99.9)), "max_ms": float(arr.max()),
            "over_50ms": int((arr > 50).sum())}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stalls", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=120.0, help="per concurrency")
    ap.add_argument("--stream", action="store_true", help="streaming requests (20 chunks)")
    ap.add_argument("--static-router", default="var/router-static", metavar="DIR",
                    help="the static-embedder artifact (fitted there if missing)")
    ap.add_argument("--database-url", default=None, help="default: a fresh SQLite file in the temp folder")
    ap.add_argument("--server", action="append", default=[], metavar="KEY=VALUE",
                    help="extra server: settings of the gateway (YAML values), e.g. max_in_flight=64")
    ap.add_argument("--py-spy", default=None, metavar="FILE", help="record the gateway with py-spy (raw format)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import yaml

    import gateway  # noqa: F401  (offline environment)

    tmp = Path(tempfile.mkdtemp(prefix="uniroute-stalls-"))
    dataset, data = benchmark_dataset(args.dataset, args.prompts, tmp)
    prompts = data.prompts[: args.prompts]
    router = static_router(Path(args.static_router), dataset)
    router["embed_cache_dir"] = str(tmp / "embed-cache")  # every prompt is new anyway; keep them out of ~/.cache
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.server)}
    rport, gport = free_port(), free_port()
    db_url = args.database_url or f"sqlite:///{tmp / 'stalls.db'}"
    cfg = gateway_config(tmp, dataset, rport, gport, router, db_url, extra)
    replay = [sys.executable, "-m", "gateway.cli.main", "replay", "--dataset", str(dataset), "--port", str(rport),
              "--stream-chunks", "20"]
    gw = [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(cfg)]
    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.stalls " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "versions": versions(), "stream": args.stream, "server": extra, "runs": [],
    }
    url = f"http://127.0.0.1:{gport}"
    try:
        with environ(**OFFLINE_ENV), contextlib.ExitStack() as stack:
            stack.enter_context(server(replay, tmp / "replay.log", f"http://127.0.0.1:{rport}/health", None))
            gproc = stack.enter_context(server(gw, tmp / "gateway.log", f"{url}/health/readiness", None))
            install_uvloop()
            bodies = prompt_bodies(prompts, "auto", stream=args.stream)
            # warm-up: LiteLLM's first call imports its provider code; not what this measures
            asyncio.run(run_load(f"{url}/v1/chat/completions", bodies, concurrency=4, max_requests=200,
                                 max_seconds=30, new_prompts=True))
            for conc in args.concurrency:
                since = dt.datetime.now(dt.UTC)
                spy = Path(args.py_spy).with_suffix(f".c{conc}.txt") if args.py_spy else None
                cpu0 = cpu_seconds(gproc.pid)
                with py_spy(gproc.pid, spy, args.seconds):
                    res, probes = asyncio.run(load_and_probe(url, bodies, conc, args.seconds))
                cpu = cpu_seconds(gproc.pid) - cpu0
                sent = len(res.samples)
                deadline = time.monotonic() + 30
                while len(rows := rows_since(db_url, since)) < sent and time.monotonic() < deadline:
                    time.sleep(0.5)
                summary = res.summary()
                run = {"concurrency": conc, "sent": sent, "errors": summary["errors"],
                       "client_latency_ms": summary["latency_ms"], "throughput_rps": summary["throughput_rps"],
                       "gateway_cpu_ms_per_req": 1000.0 * cpu / max(1, sent),
                       "added": added_latency(rows), "liveliness": _pcts(probes),
                       "client_pcts": _pcts([x.latency_s * 1000.0 for x in res.ok]),
                       "py_spy": str(spy) if spy else None}
                info["runs"].append(run)
                a = run["added"]
                print(f"c={conc}: {sent} requests, {run['errors']} errors, {run['throughput_rps']:.0f} req/s; added "
                      f"latency p50 {a.get('p50_ms', float('nan')):.2f} p99 {a.get('p99_ms', float('nan')):.2f} "
                      f"p99.9 {a.get('p999_ms', float('nan')):.2f} max {a.get('max_ms', float('nan')):.2f} ms; "
                      f">50 ms: {a.get('over_50ms')}, >200 ms: {a.get('over_200ms')}; worst {a.get('worst', [])[:5]}",
                      flush=True)
                lv, cl = run["liveliness"], run["client_pcts"]
                print(f"     client latency p50 {cl.get('p50_ms', 0):.2f} p99 {cl.get('p99_ms', 0):.2f} p99.9 "
                      f"{cl.get('p999_ms', 0):.2f} max {cl.get('max_ms', 0):.2f} ms; liveliness probe ({lv.get('n')}) "
                      f"p50 {lv.get('p50_ms', 0):.2f} p99 {lv.get('p99_ms', 0):.2f} p99.9 {lv.get('p999_ms', 0):.2f} "
                      f"max {lv.get('max_ms', 0):.2f} ms, >50 ms: {lv.get('over_50ms')}", flush=True)
            info["gateway_prompt_embeddings"] = prompt_embeddings(url)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)
    info["machine"]["loadavg_end"] = list(os.getloadavg())
    write_json(args.json, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
