"""How ``make test`` spreads the tests over pytest-xdist workers (``-n N --dist loadgroup``); a pytest plugin
registered by tests/conftest.py.

- The tests of a module that uses a module- (or class-) scoped fixture, a server the module starts once,
  run on one worker, so that the server is started once (all the module's tests: some check what the
  others left behind); so do the tests that use the session's
  ``shared_router_artifact`` (one worker fits it, the others would only wait for that fit). An explicit
  ``xdist_group`` mark still wins. The other tests are handed out one by one.
- ``slow`` tests (and their groups) come first in the collection, so that the longest do not start last
  while the other workers are idle (``--no-loadscope-reorder`` keeps that order).

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
        slow = {groups[i.nodeid] or i.nodeid for i in items if i.get_closest_marker("slow")}
        items.sort(key=lambda i: (groups[i.nodeid] or i.nodeid) not in slow)  # stable: the order within is kept
        if self.groups_file is not None:  # a worker: every worker writes the same map; the controller reads it
            tmp = self.groups_file.with_name(f"{self.groups_file.name}.{os.getpid()}")
            tmp.write_text(json.dumps({k: v for k, v in groups.items() if v is not None}))
            os.replace(tmp, self.groups_file)

    # -- controller (only called where xdist is loaded: see register()) --------------------------------

    def pytest_configure_node(self, node: Any) -> None:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="uniroute-xdist-"))
        node.workerinput[GROUPS_KEY] = str(self.folder / "groups.json")

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
