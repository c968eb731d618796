"""How ``make test`` spreads the tests over pytest-xdist workers (``-n N --dist loadgroup``); a pytest plugin
registered by tests/conftest.py.

- The tests of a module that uses a module- (or class-) scoped fixture, a server the module starts once,
  run on one worker, so that the server is started once (all the module's tests: some check what the
  others left behind); so do the tests that use the session's
  ``shared_router_artifact`` (one worker fits it, the others would only wait for that fit). An explicit
  ``xdist_group`` mark still wins. The other tests are handed out one by one.
- The longest work units (a group, or a test on its own) come first in the collection, so that the longest
  do not start last while the other workers are idle (``--no-loadscope-reorder`` keeps that order): a unit
  weighs the durations its tests took in the last run that ran them (setup + call + teardown, kept in
  pytest's cache, ``.pytest_cache``, under :data:`DURATIONS_KEY`); a test never timed weighs
  :data:`SLOW_DEFAULT_S` when it is marked ``slow`` and :data:`DEFAULT_S` otherwise, so that on a fresh
  checkout the ``slow`` tests still come first. Under xdist the controller reads the cache once and hands
  the durations to every worker (all must collect in the same order) and records them when the run ends.

xdist's own ``loadgroup`` reads the groups from a suffix it appends to each test id in the workers, which
pytest 9.2 no longer lets it change (``Node.nodeid`` is derived from ``Node._id``): every test would be a
group of its own. So the workers write the groups they computed to a file named by the controller, and
the controller's scheduler (``loadgroup``'s, with the scope of a test read from that file) reads it
once every worker has collected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

GROUPS_KEY = "uniroute_groups_file"
SHARED_FIXTURE_GROUPS = ("shared_router_artifact",)
#: pytest cache key of ``{test id: seconds}``, what each test took when it last ran
DURATIONS_KEY = "uniroute/durations"
#: the durations handed to the workers (``workerinput``)
WORKER_DURATIONS_KEY = "uniroute_durations"
#: the weight of a test never timed: a ``slow`` one, any other
SLOW_DEFAULT_S = 60.0
DEFAULT_S = 0.5


def group_of(item: pytest.Item) -> str | None:
    """The group ``item`` runs in, None for a test handed out on its own."""
    mark = item.get_closest_marker("xdist_group")
    if mark is not None:
        return "group:" + str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    names = getattr(item, "fixturenames", ())
    for fixture in SHARED_FIXTURE_GROUPS:
        if fixture in names:
            return "fixture:" + fixture
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.values() if info is not None else ()
    if any(d.scope in ("module", "class", "package") for fixturedefs in defs for d in fixturedefs):
        return "module:" + item.nodeid.split("::")[0]
    return None


class Placement:
    """The plugin: groups and order in every process; in the controller, the scheduler reading the groups."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.folder: Path | None = None
        workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
        self.groups_file = Path(workerinput[GROUPS_KEY]) if workerinput and GROUPS_KEY in workerinput else None
        self.worker = workerinput is not None
        if workerinput is not None:  # the controller's reading of the cache (None: it could not read one)
            self.known: dict[str, float] = dict(workerinput.get(WORKER_DURATIONS_KEY) or {})
        else:
            self.known = _cached_durations(config)
        self.timed: dict[str, float] = {}  # test id -> seconds in this run (controller or single process)

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        groups = {item.nodeid: group_of(item) for item in items}
        # a module that starts a shared server may also check what its other tests left behind (test_fuzz
        # counts the requests its property test sent): all its tests run on that worker
        shared = {g for g in groups.values() if g is not None and g.startswith("module:")}
        for item in items:
            module = "module:" + item.nodeid.split("::")[0]
            if groups[item.nodeid] is None and module in shared:
                groups[item.nodeid] = module
        weight: dict[str, float] = {}
        for item in items:
            unit = groups[item.nodeid] or item.nodeid
            default = SLOW_DEFAULT_S if item.get_closest_marker("slow") else DEFAULT_S
            weight[unit] = weight.get(unit, 0.0) + self.known.get(item.nodeid, default)
        # the heaviest units first; stable: the order within a unit (and between equal weights) is kept
        items.sort(key=lambda i: -weight[groups[i.nodeid] or i.nodeid])
        if self.groups_file is not None:  # a worker: every worker writes the same map; the controller reads it
            tmp = self.groups_file.with_name(f"{self.groups_file.name}.{os.getpid()}")
            tmp.write_text(json.dumps({k: v for k, v in groups.items() if v is not None}))
            os.replace(tmp, self.groups_file)

    # -- controller (only called where xdist is loaded: see register()) --------------------------------

    def pytest_configure_node(self, node: Any) -> None:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="uniroute-xdist-"))
        node.workerinput[GROUPS_KEY] = str(self.folder / "groups.json")
        node.workerinput[WORKER_DURATIONS_KEY] = self.known

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        if config.getvalue("dist") != "loadgroup":
            return None
        from xdist.scheduler import LoadGroupScheduling

        placement = self

        class FileGroupScheduling(LoadGroupScheduling):
            _groups: dict[str, str] | None = None

            def _split_scope(self, nodeid: str) -> str:
                if self._groups is None:  # first called once every worker has collected (and written)
                    assert placement.folder is not None
                    self._groups = json.loads((placement.folder / "groups.json").read_text())
                return self._groups.get(nodeid, nodeid)

        return FileGroupScheduling(config, log)

    def pytest_unconfigure(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- durations (the controller, or a run without xdist) --------------------------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.worker:  # under xdist the controller sees every worker's reports
            self.timed[report.nodeid] = self.timed.get(report.nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self) -> None:
        cache = getattr(self.config, "cache", None)
        if self.worker or cache is None or not self.timed:
            return
        known = cache.get(DURATIONS_KEY, {})
        known = known if isinstance(known, dict) else {}
        known.update({k: round(v, 2) for k, v in self.timed.items()})
        cache.set(DURATIONS_KEY, known)


def _cached_durations(config: pytest.Config) -> dict[str, float]:
    cache = getattr(config, "cache", None)
    known = cache.get(DURATIONS_KEY, {}) if cache is not None else {}
    if not isinstance(known, dict):
        return {}
    return {k: float(v) for k, v in known.items() if isinstance(k, str) and isinstance(v, (int, float))}


def register(config: pytest.Config) -> None:
    plugin = Placement(config)
    if not config.pluginmanager.hasplugin("xdist"):  # its hooks are unknown without it: keep the ordering
        config.pluginmanager.register(_OrderOnly(plugin), "uniroute-placement")
        return
    config.pluginmanager.register(plugin, "uniroute-placement")


class _OrderOnly:
    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.placement.pytest_collection_modifyitems(items)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.placement.pytest_runtest_logreport(report)

    def pytest_sessionfinish(self) -> None:
        self.placement.pytest_sessionfinish()
