"""Gateway overhead: direct to the replay upstream vs through the gateway.

Starts the replay upstream (``uniroute replay``) and the gateway (``uniroute serve``, a
generated config whose registry is the replayed dataset's models) as real servers on
loopback, then drives each with :mod:`benchmarks.loadgen`:

- ``direct``         → the replay upstream, model = the model ``auto`` picks;
- ``gateway``        → the gateway, that same model by name;
- ``gateway-auto``   → the gateway, ``model: "auto"`` (routing policy included).

All three end up at the same upstream model, so the differences are the gateway's own cost
(parsing, routing, LiteLLM, response shaping, an extra loopback hop). Each cell
(streaming or not × concurrency) runs ``--repeat`` rounds that cycle through the targets, so
slow drift of the shared machine hits every target alike. Latency = request written → body
complete; for streams TTFT = request written → first non-empty content delta. The CPU time
each server process spent per request (from /proc) is reported too: unlike latency it hardly
moves when other processes share the machine.

CPU layout (default ``split``): the load generator is pinned to CPU 0, both servers to CPU 1
(``taskset``), so the load generator never steals the servers' core; ``--cpu-layout none``
leaves scheduling to the OS.

    python -m benchmarks.overhead --json var/overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.loadgen import LoadResult, install_uvloop, prompt_bodies, run_load

if TYPE_CHECKING:
    from routing.dataset import BenchmarkDataset

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("direct", "gateway", "gateway-auto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def benchmark_dataset(dataset_arg: str | None, n: int, tmp: Path) -> tuple[Path, BenchmarkDataset]:
    """The dataset to replay: ``--dataset``, else the default one (``$UNIROUTE_DATASET`` or the repository's
    ``data/mmlu_pro_27``), else a synthetic one (≥ ``n`` prompts) in ``tmp``."""
    from routing.dataset import default_dataset_path, load_dataset
    from routing.synthetic import make_synthetic_dataset

    dataset = Path(dataset_arg) if dataset_arg else default_dataset_path()
    if dataset is None or not dataset.is_dir():
        dataset = make_synthetic_dataset(tmp / "synthetic", n_prompts=max(n, 200))
    return dataset, load_dataset(dataset, with_responses=False)


def static_router(out: Path, dataset: Path) -> dict[str, Any]:
    """Router settings for learned routing with the static embedder and no batching wait (``max_wait_ms: 0``).

    Fits the artifact into ``out`` (``uniroute router fit --embedder static``: distils the static
    embedding on first use, ~1.5 min, then embeds the dataset in seconds) unless ``out`` holds one.
    """
    from routing.artifact import ARTIFACT_FILE

    out = out.resolve()
    if not (out / ARTIFACT_FILE).is_file():
        print(f"fitting a static-embedder router artifact into {out} …", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "gateway.cli.main", "router", "fit", "--dataset", str(dataset),
                        "--out", str(out), "--embedder", "static"], check=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL)
    return {"policy": "uniroute", "variant": "learnedmap", "artifact": str(out), "max_wait_ms": 0}


def metric_samples(base: str) -> list[Any]:
    """Every sample of the server's ``/metrics`` (prometheus_client ``Sample`` tuples)."""
    r = httpx.get(base + "/metrics", timeout=10)
    r.raise_for_status()
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def scrape(base: str) -> dict[str, float]:
    """``/metrics`` as sample name → value summed over label sets."""
    out: dict[str, float] = {}
    for s in metric_samples(base):
        out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def prompt_embeddings(base: str) -> dict[str, int]:
    """The gateway's ``uniroute_prompt_embeddings_total`` by source (memory / disk / computed)."""
    return {s.labels["source"]: int(s.value) for s in metric_samples(base)
            if s.name == "uniroute_prompt_embeddings_total"}


#: the environment the benchmarks' servers run in: offline (local cost map, no downloads), LiteLLM quiet
OFFLINE_ENV: dict[str, str] = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true",
                               "HF_HUB_OFFLINE": "1", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set (inherited by the servers started meanwhile), restored after."""
    backup = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(backup)


def write_json(path: str | None, data: dict[str, Any]) -> None:
    """Write a run's results to ``path`` (if given), creating its folder."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2), encoding="utf-8")


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url}: not ready after {timeout_s:.0f} s:\n{tail(log)}")


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    """Terminate ``proc``; kill it if it has not exited after ``timeout_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def server(cmd: list[str], log: Path, ready_url: str, cpus: str | None) -> Iterator[subprocess.Popen[bytes]]:
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_ready(ready_url, proc, log)
        yield proc
    finally:
        stop(proc, timeout_s=15)


@contextlib.contextmanager
def replay_on_cpu1(dataset_arg: str | None, tmp: Path, *extra: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """The replay upstream of one process's call benchmarks: ``dataset_arg`` or the repository's dataset (a
    generated one when neither is there), served by ``uniroute replay`` pinned to CPU 1 while this process
    runs on CPU 0 (on a machine with two cores or more). Yields the upstream's ``/v1`` URL, the dataset's
    models and its first 200 prompts."""
    from routing.dataset import default_dataset_path, load_dataset
    from routing.synthetic import make_synthetic_dataset

    dataset = Path(dataset_arg) if dataset_arg else default_dataset_path()
    if dataset is None or not dataset.is_dir():
        dataset = make_synthetic_dataset(tmp / "synthetic", n_prompts=200)
    data = load_dataset(dataset, with_responses=False)
    split = (os.cpu_count() or 1) >= 2
    port = free_port()
    cmd = [sys.executable, "-m", "gateway.cli.main", "replay", "--dataset", str(dataset), "--port", str(port), *extra]
    with server(cmd, tmp / "replay.log", f"http://127.0.0.1:{port}/health", "1" if split else None):
        if split:
            os.sched_setaffinity(0, {0})
        yield f"http://127.0.0.1:{port}/v1", list(data.models), list(data.prompts[:200])


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("uvicorn", "starlette", "litellm", "openai", "httpx", "orjson", "uvloop", "httptools", "pydantic"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[pkg] = importlib.metadata.version(pkg)
    with contextlib.suppress(Exception):
        out["uniroute_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                capture_output=True, text=True, check=True).stdout.strip()
    return out


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg())}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(result: LoadResult, stream: bool) -> dict[str, float]:
    return result.percentiles("ttft" if stream else "latency", (50, 99))


def merge(results: Sequence[LoadResult]) -> LoadResult:
    merged = LoadResult(url=results[0].url, stream=results[0].stream, concurrency=results[0].concurrency,
                        wall_s=sum(r.wall_s for r in results))
    for r in results:
        merged.samples.extend(r.samples)
    return merged


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| mode | concurrency | target | requests | errors | p50 ms | p99 ms | overhead p50 ms "
            "| overhead p99 ms | req/s | gateway CPU ms/req | upstream CPU ms/req |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        metric = "TTFT" if r["stream"] else "latency"
        ov50 = "" if r["target"] == "direct" else f"{r['overhead_p50_ms']:+.2f}"
        ov99 = "" if r["target"] == "direct" else f"{r['overhead_p99_ms']:+.2f}"
        lines.append(
            f"| {'stream' if r['stream'] else 'non-stream'} ({metric}) | {r['concurrency']} | {r['target']} "
            f"| {r['requests']} | {r['errors']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {ov50} | {ov99} "
            f"| {r['throughput_rps']:.0f} | {r['gateway_cpu_ms_per_req']:.2f} | {r['upstream_cpu_ms_per_req']:.2f} |"
        )
    return "\n".join(lines)


async def measure(
    urls: dict[str, str],
    models: dict[str, str],
    prompts: Sequence[str],
    *,
    concurrencies: Sequence[int],
    modes: Sequence[bool],
    requests: int,
    seconds: float,
    warmup: int,
    repeat: int,
    headers: dict[str, str],
    pids: dict[str, int],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for stream in modes:
        for conc in concurrencies:
            bodies = {t: prompt_bodies(prompts, models[t], stream=stream) for t in TARGETS}
            for t in TARGETS:  # warm every path (connections, caches, LiteLLM clients)
                await run_load(urls[t], bodies[t], concurrency=conc, max_requests=warmup, max_seconds=10,
                               headers=headers)
            runs: dict[str, list[LoadResult]] = {t: [] for t in TARGETS}
            cpu: dict[str, dict[str, float]] = {t: dict.fromkeys(pids, 0.0) for t in TARGETS}
            for _ in range(repeat):
                for t in TARGETS:
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    runs[t].append(await run_load(urls[t], bodies[t], concurrency=conc, max_requests=requests,
                                                  max_seconds=seconds, headers=headers))
                    for name, pid in pids.items():
                        cpu[t][name] += cpu_seconds(pid) - before[name]
            merged = {t: merge(runs[t]) for t in TARGETS}
            base = pct(merged["direct"], stream)
            for t in TARGETS:
                res = merged[t]
                p = pct(res, stream)
                summary = res.summary()
                rows.append({
                    "stream": stream, "concurrency": conc, "target": t, "model": models[t],
                    "requests": summary["requests"], "errors": summary["errors"], "status": summary["status"],
                    "p50_ms": p["p50"], "p99_ms": p["p99"],
                    "overhead_p50_ms": p["p50"] - base["p50"], "overhead_p99_ms": p["p99"] - base["p99"],
                    "throughput_rps": summary["throughput_rps"],
                    "gateway_cpu_ms_per_req": 1000.0 * cpu[t]["gateway"] / max(1, summary["requests"]),
                    "upstream_cpu_ms_per_req": 1000.0 * cpu[t]["replay"] / max(1, summary["requests"]),
                    "latency_ms": summary["latency_ms"], "ttft_ms": summary.get("ttft_ms"),
                })
                print(f"  {'stream' if stream else 'plain '} c={conc:<3} {t:<13} n={summary['requests']:<6} "
                      f"err={summary['errors']:<3} p50={p['p50']:.2f} ms p99={p['p99']:.2f} ms "
                      f"rps={summary['throughput_rps']:.0f} "
                      f"gw_cpu={rows[-1]['gateway_cpu_ms_per_req']:.2f} ms/req", file=sys.stderr, flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=None,
                    help="routing benchmark folder (default: $UNIROUTE_DATASET or the repository's data/mmlu_pro_27; "
                         "a synthetic one when neither exists)")
    ap.add_argument("--prompts", type=int, default=1000, help="distinct dataset prompts to cycle through")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--modes", choices=["plain", "stream"], nargs="+", default=["plain", "stream"])
    ap.add_argument("--requests", type=int, default=1500, help="per run (a run also stops after --seconds)")
    ap.add_argument("--seconds", type=float, default=6.0, help="per run")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3, help="rounds per cell, cycling through the targets")
    ap.add_argument("--upstream-latency-ms", type=float, default=0.0, help="added by the replay upstream")
    ap.add_argument("--cpu-layout", choices=["split", "none"], default="split")
    ap.add_argument("--api-key", default=None, help="sent as a Bearer token to the gateway")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (config, logs)")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args(argv)

    import gateway  # noqa: F401  (offline environment for anything importing litellm)

    tmp = Path(tempfile.mkdtemp(prefix="uniroute-overhead-"))
    dataset, data = benchmark_dataset(args.dataset, args.prompts, tmp)
    prompts = data.prompts[: args.prompts]

    split = args.cpu_layout == "split" and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    server_cpus = "1" if split else None
    layout = ("load generator pinned to CPU 0; replay upstream and gateway pinned to CPU 1 (taskset)"
              if split else "no pinning (OS scheduler)")

    rport, gport = free_port(), free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": gport, "log_level": "warning", "access_log": False},
        "database_url": f"sqlite:///{tmp / 'bench.db'}",
        "auth": {"mode": "open"},  # the default is now `keys`; this benchmark measures forwarding
        "router": {"policy": "cheapest"},
        "replay_models": {"dataset": str(dataset.resolve()), "api_base": f"http://127.0.0.1:{rport}/v1"},
    }
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    replay_cmd = [sys.executable, "-m", "gateway.cli.main", "replay", "--dataset", str(dataset), "--port", str(rport)]
    if args.upstream_latency_ms:
        replay_cmd += ["--latency-ms", f"*={args.upstream_latency_ms:g}"]
    gateway_cmd = [sys.executable, "-m", "gateway.cli.main", "serve", "--config", str(cfg_path),
                   "--host", "127.0.0.1", "--port", str(gport)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.overhead " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "versions": versions(), "cpu_layout": layout,
        "dataset": str(dataset), "n_prompts": len(prompts), "upstream_latency_ms": args.upstream_latency_ms,
        "requests_per_run": args.requests, "seconds_per_run": args.seconds, "repeat": args.repeat,
        "warmup": args.warmup,
    }
    print(f"overhead: dataset {dataset} ({len(prompts)} prompts); {layout}; temp {tmp}", file=sys.stderr)
    try:
        with server(replay_cmd, tmp / "replay.log", f"http://127.0.0.1:{rport}/health", server_cpus) as rproc, \
             server(gateway_cmd, tmp / "gateway.log", f"http://127.0.0.1:{gport}/health/readiness",
                    server_cpus) as gproc:
            gw = f"http://127.0.0.1:{gport}/v1/chat/completions"
            probe = httpx.post(gw, json={"model": "auto", "messages": [{"role": "user", "content": prompts[0]}]},
                               headers=headers, timeout=30)
            probe.raise_for_status()
            chosen = probe.json()["model"]
            info["auto_model"] = chosen
            urls = {"direct": f"http://127.0.0.1:{rport}/v1/chat/completions", "gateway": gw, "gateway-auto": gw}
            models = {"direct": chosen, "gateway": chosen, "gateway-auto": "auto"}
            if split:
                os.sched_setaffinity(0, {0})
            install_uvloop()
            rows = asyncio.run(measure(
                urls, models, prompts, concurrencies=args.concurrency,
                modes=[m == "stream" for m in args.modes], requests=args.requests, seconds=args.seconds,
                warmup=args.warmup, repeat=args.repeat, headers=headers,
                pids={"replay": rproc.pid, "gateway": gproc.pid},
            ))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    info["machine"]["loadavg_end"] = list(os.getloadavg())
    table = markdown(rows)
    print(table)
    print(f"\n{info['date_utc']}; {info['machine']['cpus']} CPUs ({info['machine']['cpu_model']}); {layout}; "
          f"auto -> {info['auto_model']}; load average {info['machine']['loadavg_start']} -> "
          f"{info['machine']['loadavg_end']}")
    write_json(args.json, {**info, "results": rows, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
