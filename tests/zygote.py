"""A pre-imported fork server ("zygote") for the Python servers the tests start (tests/procs.py).

A ``uniroute serve`` costs 5-6 s of CPU to start, most of it importing (``import litellm`` alone takes
~4.5 s), and the tests start well over a hundred servers on two cores. So each test process (each
pytest-xdist worker) starts, the first time it needs a server, one zygote: ``python -m tests.zygote``
with the tests' standard server environment, which imports :data:`PRELOAD` once and then waits. A server
start asks it to fork: the child sets the requested environment, working folder and command line,
points its stdin at /dev/null and its stdout/stderr at the test's log, and runs the module as
``python -m MODULE ARGS`` would (``runpy``), so the process exits as that command would (its exit code,
``atexit`` handlers, non-daemon threads joined). It is a real, separate process serving over loopback,
with its own pid: only the import cost is shared.

The test gets a :class:`ZygoteProcess`, a :class:`subprocess.Popen` whose ``pid``, ``poll``, ``wait``,
``returncode``, ``terminate``, ``kill`` and ``send_signal`` work as for a child of its own (the zygote
is the parent: it reaps the child when asked, so a pid is not reused before its exit status was read;
the signals go straight to the pid), so tests that kill -9 a gateway and start it again keep working.

Where the zygote cannot stand in for ``python -m ...``, :func:`popen` starts a plain subprocess:
- ``UNIROUTE_TEST_ZYGOTE=0`` in the environment (every server is then a plain subprocess);
- a command line that is not ``-m MODULE ...``;
- an environment that differs from the zygote's in a variable read when the interpreter starts or when
  :data:`PRELOAD` is imported (:data:`IMPORT_TIME_ENV`: ``PYTHON*``, ``LITELLM_*``,
  ``PROMETHEUS_MULTIPROC_DIR``, ``HOME``, ...): those would keep the zygote's value in a fork;
- the zygote could not start, or has a thread after its imports (forking a threaded process is unsafe).

What a fork shares with its zygote and a fresh interpreter would not: the hash seed (``PYTHONHASHSEED``
is the zygote's; ``random`` is reseeded at fork), and the objects :data:`PRELOAD` built at import (frozen
with ``gc.freeze()`` before forking, so the children's collections do not touch, and copy, them).
torch is never pre-imported. A server with ``workers: 2`` spawns its uvicorn workers as fresh
interpreters (multiprocessing's spawn), as it would anyway.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent

#: the switch: ``UNIROUTE_TEST_ZYGOTE=0`` starts every test server as a plain subprocess
SWITCH_ENV = "UNIROUTE_TEST_ZYGOTE"
#: what the zygote imports before it forks: what a gateway, a replay upstream or the fake upstream imports
#: to start (litellm is most of it), nothing that depends on the environment at import but
#: :data:`IMPORT_TIME_ENV`. prometheus_client reads PROMETHEUS_MULTIPROC_DIR at import: it is in there.
PRELOAD = (
    "litellm",
    "litellm.llms.litellm_proxy.chat.transformation",
    "litellm.llms.openai_like.dynamic_config",
    "litellm.llms.edenai.chat.transformation",
    "litellm.llms.fal_ai.image_generation",
    "httpcore2",
    "h2.connection",
    "anyio.streams.tls",
    "gateway.app",
    "gateway.cli.main",
    "gateway.cli.serve",
    "gateway.tasks",
    "gateway.telemetry",
    "profiling.reprofile",
    "profiling.schedule",
    "profiling.followup",
    "profiling.runner",
    "routing.artifact",
    "routing.figures",
    "replay.cli",
    "sqlalchemy.orm",
    "sqlalchemy.dialects.sqlite.pysqlite",
    "sqlalchemy.dialects.postgresql.psycopg",
    "alembic.command",
    "alembic.config",
    "sqlite3",
    "alembic.autogenerate",
    "alembic.runtime.migration",
    "alembic.ddl.sqlite",
    "alembic.ddl.postgresql",
    "mako.template",
    "truststore",
    "uvicorn",
    "uvicorn.main",
    "uvicorn.lifespan.on",
    "uvicorn.loops.uvloop",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.websockets.auto",
    "tests.fake_upstream",
)
#: and every module of these packages (what the app's lifespan imports as it builds the gateway)
PRELOAD_PACKAGES = ("gateway.access", "gateway.http", "gateway.serving", "gateway.store")
#: prefixes (or names) of the environment variables read at interpreter start or at the import of
#: :data:`PRELOAD`: a request whose environment differs from the zygote's in one runs as a plain subprocess.
#: Not torch's (``TORCHINDUCTOR_CACHE_DIR``, ``KMP_*``, which importing torch sets in the test process): torch is
#: not preloaded, a child that needs it imports it and reads them then.
IMPORT_TIME_ENV = ("PYTHON", "LITELLM", "PROMETHEUS", "HF_", "HUGGINGFACE", "TRANSFORMERS", "TOKENIZERS",
                   "OTEL", "OMP_", "MKL_", "OPENBLAS", "HOME", "XDG_", "TMPDIR", "TEMP", "TMP", "LANG", "LC_",
                   "TZ", "SSL_", "REQUESTS_CA_BUNDLE", "AIOHTTP", "UVICORN", "LD_")

_HEADER = struct.Struct("!I")


def _send(sock: socket.socket, message: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    payload = _HEADER.pack(len(data)) + data
    sent = socket.send_fds(sock, [payload], list(fds)) if fds else sock.send(payload)
    if sent < len(payload):
        sock.sendall(payload[sent:])


def _recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors that came with it; (None, []) at the end of the stream."""
    data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 3)
    if not data:
        return None, fds
    while len(data) < _HEADER.size:
        more = sock.recv(65536)
        if not more:
            return None, fds
        data += more
    (size,) = _HEADER.unpack_from(data)
    while len(data) < _HEADER.size + size:
        more = sock.recv(65536)
        if not more:
            return None, fds
        data += more
    return json.loads(data[_HEADER.size:_HEADER.size + size]), fds


# -- the zygote (python -m tests.zygote FD) --------------------------------------------------------------


def _preload() -> str | None:
    """Import :data:`PRELOAD`; why forking is unsafe after it (None: it is safe)."""
    import importlib
    import pkgutil

    for name in PRELOAD:
        importlib.import_module(name)
    for package in PRELOAD_PACKAGES:
        path = importlib.import_module(package).__path__
        for info in pkgutil.iter_modules(path, package + "."):
            if not info.ispkg:  # not gateway.store.migrations: Alembic loads its scripts by path
                importlib.import_module(info.name)
    if "torch" in sys.modules:
        return "torch was imported"
    if threading.active_count() > 1:
        return f"threads after the imports: {threading.enumerate()}"
    gc.collect()
    gc.freeze()
    return None


def _serve(sock: socket.socket) -> tuple[str, str] | None:
    """Answer requests until the test process goes away (returns None), or, in a forked child, return
    the (module, working folder) to run."""
    reaped: dict[int, int] = {}
    children: set[int] = set()
    while True:
        message, fds = _recv(sock)
        if message is None:
            for pid in children - set(reaped):  # the test process is gone: so are its servers
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            return None
        op = message["op"]
        if op == "spawn":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                sock.close()
                return _become(message, fds)
            for fd in fds:
                os.close(fd)
            children.add(pid)
            _send(sock, {"pid": pid})
        elif op == "wait":
            pid = int(message["pid"])
            if pid not in reaped:
                code = _wait(pid, message.get("timeout"))
                if code is not None:
                    reaped[pid] = code
            _send(sock, {"returncode": reaped.get(pid)})
        else:
            _send(sock, {"error": f"unknown op {op!r}"})


def _wait(pid: int, timeout: float | None) -> int | None:
    """The exit code of child ``pid`` once it exits within ``timeout`` seconds, else None."""
    got, status = os.waitpid(pid, os.WNOHANG)
    if got == 0 and timeout != 0:
        pidfd = os.pidfd_open(pid)
        try:
            select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        got, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if got else None


def _become(message: Mapping[str, Any], fds: Sequence[int]) -> tuple[str, str]:
    """In the forked child: the stdio, environment, folder and command line of ``python -m MODULE ...``."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    cwd = str(message["cwd"])
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(message["env"])
    argv = list(message["argv"])  # ["-m", MODULE, *args]
    module = argv[1]
    sys.argv = ["-m", *argv[2:]]  # as the interpreter leaves it for runpy with ``-m``
    sys.path[0] = cwd  # ``-m`` puts the working folder first
    # preloaded: it runs anew as __main__ (a package's __main__ does; the package itself stays imported)
    loaded = sys.modules.get(module)
    sys.modules.pop(f"{module}.__main__" if hasattr(loaded, "__path__") else module, None)
    _name(" ".join([module.rsplit(".", 1)[-1], *argv[2:3]]))
    return module, cwd


def _name(name: str) -> None:
    """The process's name in ``ps`` and /proc/PID/comm (its command line stays the zygote's)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _zygote_main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    unsafe = _preload()
    _send(sock, {"ready": unsafe is None, "why": unsafe})
    if unsafe is not None:
        return
    job = _serve(sock)
    if job is None:
        return
    import runpy
    import types

    module, _cwd = job
    sys.modules["__main__"] = types.ModuleType("__main__")  # its own namespace, not the zygote's
    runpy._run_module_as_main(module)  # type: ignore[attr-defined]  # what ``python -m MODULE`` calls


# -- the test process's side --------------------------------------------------------------------------


class ZygoteProcess(subprocess.Popen[bytes]):
    """A child of the zygote, handled as a :class:`subprocess.Popen` of the test process's own."""

    def __init__(self, zygote: Zygote, pid: int, args: Sequence[str]) -> None:  # no Popen.__init__: no spawn
        self._zygote = zygote
        self.args = list(args)
        self.pid = pid
        self.returncode: int | None = None  # type: ignore[assignment]
        self.stdin = self.stdout = self.stderr = None
        self._child_created = False  # Popen.__del__ has nothing to reap

    def poll(self) -> int | None:
        return self._status(0)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            code = self._status(0.5 if left is None else min(left, 0.5))
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)

    def _status(self, timeout: float) -> int | None:
        if self.returncode is None:
            self.returncode = self._zygote.wait(self.pid, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped: the pid is still this child's
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __exit__(self, *exc: object) -> None:
        self.wait()

    def __del__(self) -> None:
        pass


class Zygote:
    """The test process's handle on its zygote (started by :func:`get`)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._lock = threading.Lock()
        self._sock = ours
        import tempfile

        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote", str(theirs.fileno())], cwd=ROOT,
                                         env=self.env, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT)
        hello, _ = _recv(self._sock)
        if not hello or not hello.get("ready"):
            self._log.seek(0)
            why = hello.get("why") if hello else self._log.read().decode(errors="replace")[-2000:]
            self.close()
            raise RuntimeError(f"the test zygote cannot fork servers: {why}")

    def usable_for(self, args: Sequence[str], env: Mapping[str, str]) -> bool:
        if len(args) < 2 or args[0] != "-m":
            return False
        keys = set(env) | set(self.env)
        return _path(env) == _path(self.env) and not any(
            env.get(k) != self.env.get(k) for k in keys if k.startswith(IMPORT_TIME_ENV) and k != "PYTHONPATH")

    def spawn(self, args: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike[str],
              stdout: IO[bytes] | None, stderr: IO[bytes] | None = None) -> ZygoteProcess:
        """Fork ``python ARGS``; its stdout goes to ``stdout`` (None: this process's stdout and stderr,
        as a subprocess inherits them), its stderr to ``stderr`` (None: to ``stdout``)."""
        out = 1 if stdout is None else stdout.fileno()
        err = (2 if stdout is None else out) if stderr is None else stderr.fileno()
        with open(os.devnull, "rb") as stdin, self._lock:
            _send(self._sock, {"op": "spawn", "argv": list(args), "env": dict(env), "cwd": str(cwd)},
                  [stdin.fileno(), out, err])
            answer, _ = _recv(self._sock)
        if not answer or "pid" not in answer:
            raise RuntimeError(f"the test zygote did not fork: {answer}")
        return ZygoteProcess(self, int(answer["pid"]), [sys.executable, *args])

    def wait(self, pid: int, timeout: float) -> int | None:
        with self._lock:
            _send(self._sock, {"op": "wait", "pid": pid, "timeout": timeout})
            answer, _ = _recv(self._sock)
        if answer is None:
            raise RuntimeError("the test zygote is gone")
        code = answer.get("returncode")
        return None if code is None else int(code)

    def close(self) -> None:
        self._sock.close()  # the zygote kills what it still runs and exits
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _path(env: Mapping[str, str]) -> list[str]:
    """The folders ``PYTHONPATH`` puts on ``sys.path``, in order, once each."""
    seen: dict[str, None] = {}
    for part in env.get("PYTHONPATH", "").split(os.pathsep):
        if part:
            seen.setdefault(os.path.abspath(part))
    return list(seen)


_zygote: Zygote | None = None
_failed: str | None = None
_pid = os.getpid()


def get(env: Mapping[str, str]) -> Zygote | None:
    """This process's zygote (started with ``env`` on first call), or None where it is off or failed."""
    global _zygote, _failed, _pid
    if os.environ.get(SWITCH_ENV, "1") == "0" or _failed is not None:
        return None
    if _pid != os.getpid():  # a fork of the test process: not its zygote
        _zygote, _pid = None, os.getpid()
    if _zygote is None:
        try:
            _zygote = Zygote(env)
        except (OSError, RuntimeError) as exc:
            _failed = str(exc)
            import warnings

            warnings.warn(f"tests/zygote.py: {exc}; the test servers start as plain subprocesses", stacklevel=2)
            return None
        import atexit

        atexit.register(_zygote.close)
    return _zygote


def popen(args: Sequence[str], *, cwd: str | os.PathLike[str], env: Mapping[str, str], stdout: IO[bytes] | None,
          base_env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """``python ARGS`` (``-m MODULE ...``) with stdout and stderr to ``stdout`` (None: this process's):
    forked by the zygote (started with ``base_env``) where it can stand in, else a plain subprocess."""
    zygote = get(base_env)
    if zygote is not None and zygote.usable_for(args, env):
        return zygote.spawn(args, env, cwd, stdout)
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=dict(env), stdout=stdout,
                            stderr=None if stdout is None else subprocess.STDOUT)


def run(args: Sequence[str], *, cwd: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
        timeout: float | None = None, check: bool = False,
        base_env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([sys.executable, *ARGS], capture_output=True, text=True, ...)``, forked by the
    zygote (started with ``base_env``) where it can stand in for ``python -m MODULE ...``."""
    cwd = os.getcwd() if cwd is None else cwd
    env = dict(os.environ) if env is None else env
    zygote = get(base_env)
    if zygote is None or not zygote.usable_for(args, env):
        return subprocess.run([sys.executable, *args], cwd=cwd, env=dict(env), capture_output=True, text=True,
                              timeout=timeout, check=check)
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = zygote.spawn(args, env, cwd, out, err)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(proc.args, code, _text(out.read()), _text(err.read()))
    if check:
        done.check_returncode()
    return done


def _text(data: bytes) -> str:
    """What ``text=True`` makes of a child's output (the locale's encoding, universal newlines)."""
    import io
    import locale

    return io.TextIOWrapper(io.BytesIO(data), encoding=locale.getpreferredencoding(False)).read()


if __name__ == "__main__":
    _zygote_main(int(sys.argv[1]))
