"""The package's layers, checked from its imports (read with ``ast``, nothing is imported).

Every ``import`` counts, at module level or inside a function (a lazy import is still a
dependency); only imports under ``if TYPE_CHECKING:`` are left out. Two rules:

- no import circle between modules, nor between packages (the layers below);
- each layer imports only what the table ``ALLOWED`` lets it, so the direction of the
  layers is written down once: handlers → request path / access → store → core.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("gateway", "routing", "profiling", "replay", "simulation")
GATEWAY_LAYERS = ("http", "serving", "access", "store", "cli")

#: layer -> the layers it may import (besides itself). "gateway" is the top-level modules of the
#: package (config, errors, protocol, metrics, tasks, spec): the core every layer may use.
ALLOWED: dict[str, set[str]] = {
    "gateway": set(),
    "gateway.store": {"gateway", "gateway.serving.interfaces", "gateway.serving.registry"},
    "gateway.serving": {"gateway", "routing"},
    "gateway.access": {"gateway", "gateway.store", "gateway.serving.interfaces"},
    "gateway.http": {"gateway", "gateway.serving", "gateway.access", "gateway.store"},
    "gateway.cli": {"gateway", "gateway.store", "gateway.access", "gateway.serving", "gateway.app"},
    "gateway.app": {"gateway", "gateway.http", "gateway.serving", "gateway.access", "gateway.store", "routing",
                    "profiling"},
    "routing": set(),
    # profiling reaches models through the forwarder only: never the chat service (nor http/ or app.py)
    "profiling": {"gateway", "gateway.store", "gateway.serving.forwarding", "gateway.serving.registry", "routing"},
    "replay": {"gateway", "routing"},
    # `uniroute simulate` composes the request path as app.py does (minus HTTP) with the replay upstream in process
    "simulation": {"gateway", "gateway.serving", "gateway.access", "gateway.store", "routing", "replay"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for root in ROOTS:
        for path in (REPO / root).rglob("*.py"):
            if "versions" in path.relative_to(REPO).parts:
                continue  # Alembic revisions import only alembic and sqlalchemy
            out[_module_name(path)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                yield full if full in MODULES else node.module


@functools.cache  # parsed when a test first needs it, not when each pytest worker collects the module
def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for name in _imports(path):
            target = _resolve(name)
            if target is not None and target != mod:
                graph[mod].add(target)
    return graph


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "gateway":
        return parts[0]
    if len(parts) >= 2 and parts[1] in GATEWAY_LAYERS:
        return f"gateway.{parts[1]}"
    if len(parts) >= 2 and parts[1] == "app":
        return "gateway.app"
    return "gateway"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found




def test_the_checker_sees_the_package() -> None:
    assert {"gateway.app", "gateway.serving.service", "gateway.store.engine", "routing.policy"} <= set(MODULES)
    assert "gateway.serving.interfaces" in _graph()["gateway.serving.service"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_between_modules() -> None:
    assert _cycles(_graph()) == []


def test_no_import_circle_between_layers() -> None:
    layers: dict[str, set[str]] = {}
    for mod, targets in _graph().items():
        for t in targets:
            if layer_of(mod) != layer_of(t):
                layers.setdefault(layer_of(mod), set()).add(layer_of(t))
    assert _cycles(layers) == []


def _allowed(layer: str, target: str) -> bool:
    rules = ALLOWED[layer]
    return layer_of(target) == layer or any(target == r or target.startswith(r + ".") or layer_of(target) == r
                                            for r in rules)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_it_may(layer: str) -> None:
    wrong = sorted(f"{mod} -> {t}" for mod, targets in _graph().items() if layer_of(mod) == layer
                   for t in targets if not _allowed(layer, t))
    assert wrong == [], f"{layer} may import only {sorted(ALLOWED[layer])} (and itself)"


def test_sql_only_in_the_store() -> None:
    """Every SQL statement lives in gateway/store: nothing else imports sqlalchemy or alembic."""
    offenders = sorted(mod for mod, path in MODULES.items() if layer_of(mod) != "gateway.store"
                       and any(n.split(".")[0] in ("sqlalchemy", "alembic") for n in _imports(path)))
    assert offenders == []
