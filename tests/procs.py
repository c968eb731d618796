"""Helpers for tests that run real servers (the replay upstream, the gateway, the fake upstream) on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from tests import zygote

ROOT = Path(__file__).resolve().parent.parent


def python(args: Sequence[str], *, cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None,
           timeout: float | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` to the end, its output captured as text: ``subprocess.run([sys.executable, *args],
    capture_output=True, text=True, ...)``, forked by this process's zygote (tests/zygote.py) for ``-m MODULE``."""
    return zygote.run(args, cwd=cwd, env=env, timeout=timeout, check=check, base_env=BASE_ENV)


def popen(args: Sequence[str], *, cwd: str | os.PathLike[str] = ROOT, env: dict[str, str] | None = None,
          stdout: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """``subprocess.Popen([sys.executable, *args], ...)`` with stdout and stderr to ``stdout`` (None: this
    process's), forked by this process's zygote (tests/zygote.py) for ``-m MODULE``."""
    return zygote.popen(args, cwd=cwd, env=server_env() if env is None else env, stdout=stdout, base_env=BASE_ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect_without_waiting(port: int, n: int) -> list[socket.socket]:
    """``n`` non-blocking connections to ``port`` on loopback, started and not waited for (the kernel completes
    the handshakes it can, and the connections wait in the listening socket's accept queue); the caller closes them."""
    clients = []
    for _ in range(n):
        client = socket.socket()
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            client.connect(("127.0.0.1", port))
        clients.append(client)
    return clients


def server_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_OFFLINE_MODE="true", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


#: the environment of the servers as the test process started (its zygote's: tests/zygote.py)
BASE_ENV = server_env()


@dataclass
class ServerSpec:
    """A server to start: ``args`` (a Python module command line) is up when ``ready_url`` answers 200."""

    args: Sequence[str]
    ready_url: str
    env: dict[str, str] | None = None
    timeout_s: float = 60.0
    #: where its output goes (kept after the test, for a failure's report); None: a temporary file
    log: Path | None = None


@contextlib.contextmanager
def running(args: Sequence[str], ready_url: str, *, env: dict[str, str] | None = None,
            timeout_s: float = 60.0, log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``args`` (a Python module command line), wait until ``ready_url`` answers 200, stop it after;
    ``log``: the file its output goes to (default: a temporary one)."""
    with running_all(ServerSpec(args, ready_url, env, timeout_s, log)) as procs:
        yield procs[0]


@contextlib.contextmanager
def running_all(*servers: ServerSpec) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start all ``servers`` at once (their start-ups, seconds each, overlap), wait until each is ready,
    stop them all after (in reverse order). A server that exits or is not ready in time fails with its log."""
    with contextlib.ExitStack() as stack:
        started = []
        for server in servers:
            log = stack.enter_context(_log_file(server.log))
            proc = popen(server.args, env=server.env or None, stdout=log)
            stack.callback(_stop, proc)
            started.append((server, proc, log, time.monotonic() + server.timeout_s))
        # one client for all the polls: httpx.get() builds a client (and its TLS context) per call, ~30 ms
        # of CPU, taken at 10 polls a second from the servers starting on the same cores
        with httpx.Client(timeout=1.0) as client:
            for server, proc, log, deadline in started:
                _wait_ready(client, server, proc, log, deadline)
        yield [proc for _, proc, _, _ in started]


def _log_file(path: Path | None) -> IO[bytes]:
    """A server's output file: ``path`` (kept), or a temporary file."""
    return open(path, "w+b") if path is not None else tempfile.TemporaryFile()  # the caller's ExitStack closes it


def _wait_ready(client: httpx.Client, server: ServerSpec, proc: subprocess.Popen[bytes], log: IO[bytes],
                deadline: float) -> None:
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(server.args)} exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if client.get(server.ready_url).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.ready_url} ({' '.join(server.args)}) not ready after {server.timeout_s} s; "
                               f"its output so far:\n{_tail(log)}")
        time.sleep(0.1)


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def gateway_server(config: Path, *extra: str, env: dict[str, str] | None = None,
                   timeout_s: float = 60.0) -> ServerSpec:
    """``uniroute serve --config CONFIG`` on the port the config names (or ``--port`` in ``extra``)."""
    import yaml

    port = next((extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "--port"), None)
    if port is None:
        port = str(yaml.safe_load(config.read_text())["server"]["port"])
    return ServerSpec(["-m", "gateway.cli.main", "serve", "--config", str(config), *extra],
                      f"http://127.0.0.1:{port}/health/readiness", env, timeout_s)


def replay_server(dataset: Path, *extra: str) -> tuple[ServerSpec, str]:
    """``uniroute replay`` on a free port, to start with :func:`running_all`, and its ``/v1`` base URL."""
    port = free_port()
    args = ["-m", "gateway.cli.main", "replay", "--dataset", str(dataset), "--port", str(port), *extra]
    return ServerSpec(args, f"http://127.0.0.1:{port}/health"), f"http://127.0.0.1:{port}/v1"


@contextlib.contextmanager
def fake_upstream() -> Iterator[str]:
    """The tests' tiny failing/echoing upstream (tests/fake_upstream.py); yields its ``/v1`` base URL."""
    port = free_port()
    with running(["-m", "uvicorn", "tests.fake_upstream:app", "--host", "127.0.0.1", "--port", str(port),
                  "--log-level", "warning", "--timeout-graceful-shutdown", "1"], f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}/v1"


@contextlib.contextmanager
def replay_upstream(dataset: Path, *extra: str) -> Iterator[str]:
    """``uniroute replay`` on a free port; yields its ``/v1`` base URL."""
    server, base = replay_server(dataset, *extra)
    with running_all(server):
        yield base
