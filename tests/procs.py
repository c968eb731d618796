"""Helpers for tests that run real servers (the replay upstream, the gateway, the fake upstream) on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_OFFLINE_MODE="true", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


@contextlib.contextmanager
def running(args: Sequence[str], ready_url: str, *, env: dict[str, str] | None = None,
            timeout_s: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``args`` (a Python module command line), wait until ``ready_url`` answers 200, stop it after."""
    import tempfile

    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env or server_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    out = log.read().decode(errors="replace")
                    raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}:\n{out[-3000:]}")
                try:
                    if httpx.get(ready_url, timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ready_url} not ready after {timeout_s} s")
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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
    port = free_port()
    with running(["-m", "gateway.cli.main", "replay", "--dataset", str(dataset), "--port", str(port), *extra],
                 f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}/v1"
