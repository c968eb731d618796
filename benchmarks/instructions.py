"""Instructions per chat request, counted by valgrind's callgrind: a CPU cost that the machine's load does not move.

Throughput and CPU-time A/Bs on a shared 2-core machine move by ±5-50% between runs of the same code; the
number of instructions the gateway executes for a request does not depend on what else the machine runs.
This script starts:

- the replay upstream (``uniroute replay``, normal speed, ``--stream-chunks 20``), always from this
  repository's code, so both sides of an A/B talk to the same upstream;
- ONE gateway process (``uniroute serve``, one worker) under
  ``valgrind --tool=callgrind --instr-atstart=no``, with ``PYTHONPATH`` = ``--source`` (default: this
  repository), so another checkout (e.g. ``git worktree add --detach ../wt-old 6f55c4d``) is measured
  with the same artifact, upstream, prompts and load. Its config is ``--source``'s shipped ``config.yaml``
  with: the replay models of ``--dataset``, ``model: "auto"`` through UniRoute LearnedMap over the
  static-embedder artifact ``--static-router`` (``max_wait_ms: 0``, a fresh embedding cache), ``auth.mode:
  open`` (``--auth key``: ``keys`` mode and one key with the router's default λ, no rate limit and no budget, or
  ``--key-budget USD`` a month, made with that tree's ``uniroute keys create``), a fresh SQLite store, timeouts raised for valgrind's slowdown
  (``replay_models.timeout_s``, the server's header/body deadlines, ``database.settle_timeout_s``), and the
  wall-clock loops slowed to match (``registry.poll_interval_s: 5``, its maximum;
  ``database.log_flush_interval_s: 2``). An older tree may not load an artifact fitted by newer code (6f55c4d
  refuses this tree's artifact format): fit one with the OLDEST tree's ``uniroute router fit --k K`` and pass it
  to both runs (newer trees load older artifacts).

It then warms the gateway up with ``--warmup`` requests of each kind (instrumentation off: LiteLLM's lazy
imports and first-call caches are not what is measured), and for each phase (``--modes``, ``--repeat``
times, in turn): ``callgrind_control --zero``, ``--instr=on``, ``--n`` requests at ``--concurrency``
(closed loop, one keep-alive connection per worker, a NEW prompt on every request: every request embeds,
ranks and forwards), ``--instr=off``, ``--dump``; the dump's total ``Ir`` (instructions executed, all
threads of the gateway) divided by the requests is the phase's **instructions per request**. Nothing is
subtracted: whatever the process executed while the phase ran counts, including its background loops (the
request-log writer's flushes, the registry poller), which under valgrind's slowdown run more often per
request than at full speed (the slower the machine, the more of them per request). The ``idle`` phase
(``--idle-s`` seconds with no request, instrumentation on) measures that background rate; each phase is also
reported "minus idle" (the idle rate × the phase's wall time taken off), beside the raw count, never instead.

The prompts are the dataset's first ``--prompts``, each made new with a nonce of fixed width; the nonce tag is
fixed per phase, so two runs, on two trees, send byte-identical requests in the same order. Every
response must be a 200 (a complete stream for ``stream: true``); the run fails otherwise.

``--forwarder-only`` measures, instead of the gateway, the gateway's own ``Forwarder`` over ``LiteLLMUpstream`` (as
the config sets it up) calling one model (``--forwarder-model``) with the same prompts, in a process that does
nothing else (:func:`forwarder_driver`): LiteLLM's call and its HTTP client as the gateway makes it. The gateway's
instructions per request minus these are what the gateway spends outside LiteLLM's call (issue 14's bar).

``--gc shipped`` (default) runs the gateway as shipped (a tree's own collector settings: newer trees freeze
the start-up heap and raise the thresholds, docs/PERFORMANCE.md "Stalls"); ``--gc off`` disables CPython's
automatic cyclic collector in the gateway process (``gc.disable()`` before the CLI runs), which takes the
collections, whose timing differs between trees, out of the count: the request path's own instructions.

    python -m benchmarks.instructions --n 100 --json var/instr-new.json
    python -m benchmarks.instructions --source ../wt-old --n 100 --json var/instr-old.json
    python -m benchmarks.instructions --modes plain stream --repeat 2 --gc off
    python -m benchmarks.instructions --forwarder-only --forwarder-model Meta-Llama-3_1-70B-Instruct --repeat 2

Needs ``valgrind`` (``callgrind_control`` comes with it). A phase of 100 requests takes 1-3 minutes (the
gateway runs ~50× slower under callgrind); start-up takes 1-3 minutes more. ``--keep`` keeps the temp folder
with the dumps (read them with ``callgrind_annotate``: which functions the instructions went to).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.loadgen import prompt_bodies, run_load
from benchmarks.overhead import (
    OFFLINE_ENV,
    benchmark_dataset,
    environ,
    free_port,
    machine,
    server,
    stop,
    tail,
    versions,
    write_json,
)

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_ENV = {**OFFLINE_ENV, "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
#: generous timeouts: under callgrind the gateway runs ~50-100× slower than natively
SLOW_TIMEOUT_S = 600.0
MODES = ("plain", "stream")
#: background loops tick by the wall clock, and under callgrind a request takes ~1 s of it: the registry poller at
#: its slowest allowed rate, the request-log writer's flushes a few requests apart (natively: many per flush)
POLL_S = 5.0
LOG_FLUSH_S = 2.0


def gateway_config(source: Path, tmp: Path, dataset: Path, rport: int, gport: int, artifact: Path,
                   auth: str) -> Path:
    """``source``'s shipped config.yaml, pointed at the replay upstream, the artifact and a fresh store."""
    config: dict[str, Any] = yaml.safe_load((source / "config.yaml").read_text(encoding="utf-8"))
    config.setdefault("server", {}).update({"host": "127.0.0.1", "port": gport, "log_level": "warning",
                                            "header_timeout_s": SLOW_TIMEOUT_S, "body_timeout_s": SLOW_TIMEOUT_S})
    config["server"].pop("health_port", None)  # the liveness listener's fixed port: not measured here
    config["database_url"] = f"sqlite:///{tmp / 'gateway.db'}"
    config.setdefault("database", {}).update({"spill_dir": str(tmp / "spill"), "settle_timeout_s": 60.0,
                                              "log_flush_interval_s": LOG_FLUSH_S})
    config.setdefault("registry", {})["poll_interval_s"] = POLL_S
    config["auth"] = {"mode": "open" if auth == "open" else "keys"}
    config.setdefault("router", {}).update({"policy": "uniroute", "variant": "learnedmap",
                                            "artifact": str(artifact.resolve()), "max_wait_ms": 0,
                                            "embed_cache_dir": str(tmp / "embed-cache")})
    config.setdefault("replay_models", {}).update({"dataset": str(dataset.resolve()),
                                                   "api_base": f"http://127.0.0.1:{rport}/v1",
                                                   "timeout_s": SLOW_TIMEOUT_S})
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def make_key(source: Path, config: Path, budget_usd: float | None) -> str:
    """One API key with the router's default λ, no rate limit and ``budget_usd`` a month (None: no budget), made
    with ``source``'s own CLI; returns the secret."""
    lam = (yaml.safe_load(config.read_text(encoding="utf-8")).get("router") or {}).get("default_lambda", 0.1)
    budget = ["--budget", str(budget_usd), "--period", "month"] if budget_usd is not None else []
    out = subprocess.run([sys.executable, "-m", "gateway.cli.main", "keys", "create", "--name", "bench",
                          "--lambda", str(lam), *budget, "--config", str(config)],
                         env=dict(os.environ, PYTHONPATH=str(source)),
                         capture_output=True, text=True, check=True, cwd=source)
    found = re.search(r"sk-ur-[A-Za-z0-9_\-]+", out.stdout + out.stderr)
    if not found:
        raise RuntimeError(f"no key in the output of `uniroute keys create`:\n{out.stdout}\n{out.stderr}")
    return found.group(0)


@contextlib.contextmanager
def callgrind_gateway(source: Path, config: Path, tmp: Path, url: str, gc_mode: str,
                      start_timeout_s: float) -> Iterator[subprocess.Popen[bytes]]:
    """The gateway of ``source`` under ``valgrind --tool=callgrind --instr-atstart=no``, ready."""
    launch = "import runpy, sys; sys.argv = ['uniroute', 'serve', '--config', sys.argv[1]]; "
    if gc_mode == "off":
        launch = "import gc; gc.disable(); " + launch
    launch += "runpy.run_module('gateway.cli.main', run_name='__main__')"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp / 'callgrind.out'}",
           sys.executable, "-c", launch, str(config)]
    log = tmp / "gateway.log"
    env = dict(os.environ, PYTHONPATH=str(source), UNIROUTE_CONFIG=str(config))
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=source)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {proc.returncode}:\n{tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health/readiness", timeout=30.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway was not ready after {start_timeout_s:.0f} s:\n{tail(log)}")
            time.sleep(1.0)
        yield proc
    finally:
        stop(proc, timeout_s=120)


def forwarder_driver(config_path: str, model: str | None = None) -> None:
    """The ``--forwarder-only`` process (run under callgrind): the gateway's own :class:`Forwarder` over
    ``LiteLLMUpstream`` as ``config_path`` configures it, and nothing else. Reads ``MODE N TAG`` lines from stdin,
    makes N calls to ``model`` (default: the first replayed one) (``plain``: ``Forwarder.complete``; ``stream``: ``open_stream`` and
    every chunk) with the prompts the gateway phases send, and answers ``done`` on stdout. The event loop ticks
    every 250 ms meanwhile, so callgrind_control's commands are handled while it waits."""
    import queue
    import threading

    import gateway  # noqa: F401  (offline environment)
    from benchmarks.overhead import benchmark_dataset
    from gateway.config import load_config
    from gateway.serving.forwarding import Forwarder, LiteLLMUpstream
    from gateway.serving.registry import Registry

    config = load_config(config_path)
    registry = Registry.from_config(config)
    forwarder = Forwarder(max_attempts=config.fallback.max_attempts,
                          upstream=LiteLLMUpstream(raw_openai_streams=config.forwarding.raw_openai_streams,
                                                   http_client=config.forwarding.http_client))
    registry.on_replace(forwarder.register)
    entry = registry.get(model) if model else registry.snapshot.entries[0]
    if entry is None:
        raise SystemExit(f"no model {model!r} in the registry")
    _, data = benchmark_dataset(config.replay_models.dataset if config.replay_models else None, 1000,
                                Path(tempfile.mkdtemp()))
    prompts = data.prompts[:1000]
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in sys.stdin:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()

    async def run() -> None:
        while True:
            try:
                line = lines.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.25)
                continue
            mode, n, tag = line.split()
            for i in range(int(n)):
                text = f"{prompts[i % len(prompts)]}\n\n(request {tag}-{i:08x})"
                messages = [{"role": "user", "content": text}]
                if mode == "stream":
                    opened = await forwarder.open_stream([entry], messages, {"stream_options": {"include_usage": True}})
                    async for _ in opened.rest:
                        pass
                else:
                    await forwarder.complete([entry], messages, {})
            print("done", flush=True)

    asyncio.run(run())


@contextlib.contextmanager
def callgrind_forwarder(config: Path, tmp: Path, model: str | None) -> Iterator[subprocess.Popen[str]]:
    """:func:`forwarder_driver` under ``valgrind --tool=callgrind --instr-atstart=no``, this tree's code."""
    launch = ("import sys; from benchmarks.instructions import forwarder_driver; "
              "forwarder_driver(sys.argv[1], sys.argv[2] or None)")
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp / 'callgrind.out'}",
           sys.executable, "-c", launch, str(config), model or ""]
    with open(tmp / "forwarder.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log, cwd=ROOT, text=True)
    try:
        yield proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        stop(proc, timeout_s=120)


def drive(proc: subprocess.Popen[str], mode: str, n: int, tag: str) -> None:
    """One batch of :func:`forwarder_driver`'s calls; waits for its ``done``."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{mode} {n} {tag}\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if line.strip() != "done":
        raise RuntimeError(f"the forwarder driver answered {line!r} (exit {proc.poll()})")


def control(pid: int, *args: str) -> str:
    """``callgrind_control ARGS PID`` (it waits until the process has handled the command)."""
    out = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {out.stdout}{out.stderr}")
    return out.stdout


def dump_total(tmp: Path, before: set[Path]) -> tuple[Path, int]:
    """The newest dump (a file not in ``before``) and its total Ir (its ``totals:`` line)."""
    deadline = time.monotonic() + 120
    while True:
        new = sorted(set(tmp.glob("callgrind.out*")) - before, key=lambda p: p.stat().st_mtime)
        if new:
            path = new[-1]
            text = path.read_text(errors="replace")
            found = re.search(r"^totals:\s+(\d+)", text, re.M)
            if found:
                return path, int(found.group(1))
        if time.monotonic() > deadline:
            raise RuntimeError(f"no callgrind dump with a total appeared in {tmp}")
        time.sleep(0.5)


def measure(pid: int, tmp: Path, name: str, send: Any) -> tuple[int, Path, float]:
    """Zero the counters, instrument while ``send()`` runs, dump: (total Ir, the dump, wall seconds)."""
    before = set(tmp.glob("callgrind.out*"))
    control(pid, "--zero")
    control(pid, "--instr=on")
    t0 = time.perf_counter()
    try:
        send()
    finally:
        wall = time.perf_counter() - t0
        control(pid, "--instr=off")
        control(pid, f"--dump={name}")
    path, total = dump_total(tmp, before)
    return total, path, wall


def load(url: str, bodies: dict[str, list[dict[str, Any]]], mode: str, n: int, tag: str, *, concurrency: int,
         headers: dict[str, str] | None) -> None:
    """``n`` requests of ``bodies[mode]`` (a new prompt each, nonce tag ``tag``); raise on any failure."""
    res = asyncio.run(run_load(f"{url}/v1/chat/completions", bodies[mode], concurrency=concurrency, max_requests=n,
                               max_seconds=10**6, headers=headers, timeout_s=SLOW_TIMEOUT_S, new_prompts=True,
                               check_streams=True, nonce_tag=tag))
    if res.errors or len(res.samples) != n:
        raise RuntimeError(f"{len(res.samples)} requests sent, {res.errors} failed: {res.summary()['status']}")


def phase_tag(i: int) -> str:
    return f"{0xC0DE0000 + i:08x}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=str(ROOT), metavar="DIR",
                    help="the source tree whose gateway is measured (its PYTHONPATH and config.yaml)")
    ap.add_argument("--dataset", default=None, help="routing-benchmark folder (default: data/mmlu_pro_27)")
    ap.add_argument("--static-router", default="var/router-static", metavar="DIR",
                    help="the static-embedder artifact (fitted there with THIS tree's code if missing)")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--n", type=int, default=100, help="requests per phase")
    ap.add_argument("--warmup", type=int, default=40, help="requests of each mode before measuring")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=1, help="measure each mode this often (in turn)")
    ap.add_argument("--idle-s", type=float, default=30.0, help="seconds of the idle phase (0: none)")
    ap.add_argument("--auth", choices=("open", "key"), default="open")
    ap.add_argument("--key-budget", type=float, default=None, metavar="USD",
                    help="with --auth key: the key's monthly budget (default: none), so every request reserves "
                         "and settles")
    ap.add_argument("--gc", choices=("shipped", "off"), default="shipped", dest="gc_mode")
    ap.add_argument("--start-timeout-s", type=float, default=900.0)
    ap.add_argument("--forwarder-only", action="store_true",
                    help="measure the gateway's Forwarder + LiteLLM call alone (this tree), no gateway")
    ap.add_argument("--forwarder-model", default=None, help="the model it calls (default: the first replayed one)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (config, logs, callgrind dumps)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("error: valgrind (with callgrind_control) is not installed", file=sys.stderr)
        return 2
    from benchmarks.overhead import static_router

    source = Path(args.source).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="uniroute-instr-"))
    dataset, data = benchmark_dataset(args.dataset, args.prompts, tmp)
    prompts = data.prompts[: args.prompts]
    artifact = Path(static_router(Path(args.static_router), dataset)["artifact"])
    rport, gport = free_port(), free_port()
    url = f"http://127.0.0.1:{gport}"
    cfg = gateway_config(source, tmp, dataset, rport, gport, artifact, args.auth)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True,
                            text=True).stdout.strip()
    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.instructions " + " ".join(argv if argv is not None else sys.argv[1:]),
        "source": str(source), "source_commit": commit, "artifact": str(artifact), "n": args.n,
        "concurrency": args.concurrency, "auth": args.auth, "key_budget_usd": args.key_budget, "gc": args.gc_mode,
        "machine": machine(),
        "versions": versions(), "phases": [],
    }
    replay = [sys.executable, "-m", "gateway.cli.main", "replay", "--dataset", str(dataset), "--port", str(rport),
              "--stream-chunks", "20"]
    try:
        with environ(**GATEWAY_ENV), contextlib.ExitStack() as stack:
            headers = None
            if args.auth == "key" and not args.forwarder_only:
                headers = {"Authorization": f"Bearer {make_key(source, cfg, args.key_budget)}"}
            stack.enter_context(server(replay, tmp / "replay.log", f"http://127.0.0.1:{rport}/health", None))
            t_start = time.monotonic()
            bodies = {m: prompt_bodies(prompts, "auto", stream=(m == "stream")) for m in MODES}
            send: Callable[[str, int, str], None]
            if args.forwarder_only:
                driver = stack.enter_context(callgrind_forwarder(cfg, tmp, args.forwarder_model))
                pid = driver.pid
                info["forwarder_only"] = {"model": args.forwarder_model}
                send = functools.partial(drive, driver)
            else:
                pid = stack.enter_context(callgrind_gateway(source, cfg, tmp, url, args.gc_mode,
                                                            args.start_timeout_s)).pid
                send = functools.partial(load, url, bodies, concurrency=args.concurrency, headers=headers)
            print(f"{'forwarder' if args.forwarder_only else 'gateway'} ({commit}, {source}) ready under callgrind "
                  f"after {time.monotonic() - t_start:.0f} s", flush=True)
            for i, mode in enumerate(args.modes):  # warm-up, instrumentation off
                send(mode, args.warmup, phase_tag(100 + i))
            runs = [(r, m) for r in range(args.repeat) for m in args.modes]
            for r, mode in runs:
                tag = phase_tag(10 * r + args.modes.index(mode))  # the same prompts in every run of the script
                total, path, wall = measure(pid, tmp, f"{mode}-{r}",
                                            lambda m=mode, t=tag: send(m, args.n, t))
                phase = {"mode": mode, "round": r, "requests": args.n, "ir_total": total,
                         "ir_per_request": total / args.n, "wall_s": round(wall, 1), "dump": path.name}
                info["phases"].append(phase)
                print(f"{mode:6s} round {r}: {total / args.n / 1e6:9.3f} M instructions per request "
                      f"({total:,} over {args.n} requests, {wall:.0f} s wall)", flush=True)
            idle_rate = 0.0
            if args.idle_s > 0:
                total, path, wall = measure(pid, tmp, "idle", lambda: time.sleep(args.idle_s))
                idle_rate = total / wall
                info["idle"] = {"seconds": round(wall, 1), "ir_total": total, "ir_per_s": idle_rate}
                print(f"idle: {idle_rate / 1e6:.3f} M instructions per second with no request "
                      f"(background loops; phases ran {[p['wall_s'] for p in info['phases']]} s)", flush=True)
            for p in info["phases"]:  # reported beside the raw count, never instead of it
                p["ir_per_request_minus_idle"] = (p["ir_total"] - idle_rate * p["wall_s"]) / p["requests"]
            for mode in args.modes:
                summary = {}
                for key in ("ir_per_request", "ir_per_request_minus_idle"):
                    xs = [p[key] for p in info["phases"] if p["mode"] == mode]
                    mean = sum(xs) / len(xs)
                    summary[key] = {"mean": mean, "min": min(xs), "max": max(xs),
                                    "spread": (max(xs) - min(xs)) / mean if mean else 0.0}
                info.setdefault("summary", {})[mode] = summary
                raw, net = summary["ir_per_request"], summary["ir_per_request_minus_idle"]
                print(f"{mode}: {raw['mean'] / 1e6:.3f} M instructions/request (mean of {args.repeat}, spread "
                      f"(max-min)/mean {100 * raw['spread']:.2f}%); minus the idle rate x wall: "
                      f"{net['mean'] / 1e6:.3f} M (spread {100 * net['spread']:.2f}%)", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    info["machine"]["loadavg_end"] = list(os.getloadavg())
    write_json(args.json, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
