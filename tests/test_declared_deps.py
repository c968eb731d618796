"""Every third-party package the shipped code imports is declared in pyproject.toml.

A package that only arrives transitively (``openai`` through LiteLLM, ``scipy`` through scikit-learn) can vanish
or change major version when the package that brings it moves on, and a wheel install then breaks at import or,
worse, at the first request that reaches the lazy import. So: the top-level names imported anywhere in the
wheel's packages (module level or inside functions, as the AST shows them), minus the standard library and the
project's own packages, each map (``importlib.metadata.packages_distributions``) to a distribution named in
``[project].dependencies`` — or, for an optional feature (OpenTelemetry), in one of the non-dev extras.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: the packages of the wheel (``[tool.setuptools.packages.find] include``, minus the globs)
OWN = sorted({p.rstrip("*").split(".")[0] for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]})
#: extras that are not features of the shipped code (test and lint tools)
TOOLING_EXTRAS = {"dev"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_name(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert m, f"not a requirement: {requirement!r}"
    return _canonical(m.group(1))


def imported_top_levels() -> dict[str, list[str]]:
    """Top-level module name → the files (relative) that import it, for every absolute import in :data:`OWN`."""
    found: dict[str, list[str]] = {}
    for pkg in OWN:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], []).append(str(path.relative_to(ROOT)))
    return found


def test_the_scan_sees_the_packages_it_must_see() -> None:
    """The scanner is not vacuous: it finds the project's own imports and the lazy ones inside functions."""
    found = imported_top_levels()
    assert set(OWN) == {"gateway", "routing", "profiling", "replay", "simulation"}
    assert {"gateway", "litellm", "numpy", "scipy", "openai"} <= set(found)
    assert "routing/estimators.py" in found["scipy"]  # a lazy import inside a function


def test_every_imported_third_party_package_is_declared() -> None:
    project = PYPROJECT["project"]
    declared = {_dist_name(r) for r in project["dependencies"]}
    optional = {_dist_name(r) for extra, reqs in project.get("optional-dependencies", {}).items()
                if extra not in TOOLING_EXTRAS for r in reqs}
    dists = importlib.metadata.packages_distributions()
    third_party = {name: files for name, files in imported_top_levels().items()
                   if name not in sys.stdlib_module_names and name not in OWN and name != "__future__"}
    problems = []
    for name, files in sorted(third_party.items()):
        provided_by = {_canonical(d) for d in dists.get(name, [])}
        if not provided_by:
            problems.append(f"{name} (imported by {files[0]}) is not installed: no distribution provides it")
        elif not provided_by & (declared | optional):
            problems.append(f"{name} (imported by {', '.join(sorted(set(files))[:3])}) comes from "
                            f"{' or '.join(sorted(provided_by))}, which [project].dependencies does not declare")
    assert not problems, "undeclared imports:\n" + "\n".join(problems)
