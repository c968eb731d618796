"""Never silent: a pytest plugin (registered by tests/conftest.py) for the long stretches of a test run.

``pytest -q`` prints a dot per test, so a test or fixture that runs for a long time (a router fit, the
first embedding or distillation on a machine, server start-ups on a loaded machine) leaves the terminal
silent. This plugin

- writes ``[  30 s] still running <test> (<fixture or phase>)`` every :data:`HEARTBEAT_S` seconds
  while one test (its setup, call or teardown) runs, from a background thread, to the terminal itself
  (a copy of stdout taken before pytest captures it);
- lets the fixtures in :data:`SHOW_PROGRESS` print their own progress (tqdm bars on stderr) to the
  terminal instead of into pytest's capture.

Under pytest-xdist (``-n N``, as ``make test`` runs) each worker runs its own heartbeat, prefixed with the
worker's id: a worker's stdout is xdist's channel (pointed at /dev/null), its stderr the controller's, so
the worker writes to a copy of its stderr. The controller, which runs no test, runs none.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator

import pytest

HEARTBEAT_S = 30.0

#: fixtures whose own progress output (the router fit's and the embedder's tqdm bars) reaches the
#: terminal: the first run on a machine distils or embeds for minutes
SHOW_PROGRESS = frozenset({"shared_router_artifact"})


class NeverSilent:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.fd: int | None = None
        worker: dict[str, object] | None = getattr(config, "workerinput", None)
        self.prefix = f"[{worker['workerid']}] " if worker else ""
        distributing = worker is None and getattr(config.option, "dist", "no") != "no"
        if not config.option.collectonly and not distributing:
            try:  # called from pytest_configure: capture is suspended, so this is the terminal
                self.fd = os.dup((sys.stderr if worker else sys.stdout).fileno())
            except (AttributeError, OSError, ValueError):  # no real stdout (e.g. pytest run in process)
                self.fd = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.test: str | None = None
        self.phase = ""
        self.fixtures: list[str] = []
        self.since = 0.0
        self.thread: threading.Thread | None = None
        if self.fd is not None:
            self.thread = threading.Thread(target=self._beat, name="pytest-heartbeat", daemon=True)
            self.thread.start()

    def _at(self, test: str | None, phase: str) -> None:
        with self.lock:
            if test != self.test:
                self.since = time.monotonic()
            self.test, self.phase = test, phase

    def _beat(self) -> None:
        assert self.fd is not None
        last: str | None = None
        due = HEARTBEAT_S
        while not self.stop.wait(1.0):
            with self.lock:
                test, phase, fixtures, since = self.test, self.phase, list(self.fixtures), self.since
            if test != last:
                last, due = test, HEARTBEAT_S
            elapsed = time.monotonic() - since
            if test is None or elapsed < due:
                continue
            due += HEARTBEAT_S
            what = f"fixture {' > '.join(fixtures)}" if fixtures else phase
            try:
                os.write(self.fd, f"\n{self.prefix}[{elapsed:4.0f} s] still running {test} ({what})\n".encode())
            except OSError:
                return

    # -- hooks ---------------------------------------------------------------------------------------

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._at(nodeid, "setup")

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        self._at(None, "")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        self._at(item.nodeid, "call")
        try:
            return (yield)
        finally:
            self._at(item.nodeid, "teardown")

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef: pytest.FixtureDef[object]) -> Iterator[None]:
        with self.lock:
            self.fixtures.append(fixturedef.argname)
        capman = self.config.pluginmanager.getplugin("capturemanager")
        try:
            if fixturedef.argname not in SHOW_PROGRESS or capman is None:
                return (yield)
            with capman.global_and_fixture_disabled():
                return (yield)
        finally:
            with self.lock:
                self.fixtures.pop()

    def pytest_unconfigure(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=2)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
