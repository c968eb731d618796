"""Fixtures shared across test modules."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx._transports.default
import pytest

from routing.dataset import DATASET_ENV, default_dataset_path


def _share_httpx_ssl_contexts() -> None:
    """One SSL context per pytest process for every httpx client the tests make (``httpx.get/post``, the openai and
    anthropic SDKs' clients): httpx builds a new one for each client, reading and parsing the CA bundle, ~50 ms of CPU,
    which the tests paid for every one-off request and every SDK client they created, all on plain-HTTP loopback.
    An ``ssl.SSLContext`` is meant to be shared; the same arguments give the same context."""
    transports: Any = httpx._transports.default
    original = transports.create_ssl_context
    if not isinstance(original, functools._lru_cache_wrapper):
        transports.create_ssl_context = functools.lru_cache(maxsize=16)(original)


_share_httpx_ssl_contexts()


@pytest.fixture(scope="session")
def shared_dataset() -> Path:
    """The real routing benchmark: the repository's ``data/mmlu_pro_27`` (``$UNIROUTE_DATASET`` wins).

    It is part of the repository, so a missing folder is an error, not a skip."""
    path = default_dataset_path()
    if path is None or not (path / "models.csv").is_file():
        pytest.fail(f"no routing benchmark at {path or 'data/mmlu_pro_27'} (${DATASET_ENV} or the repository's "
                    "data/mmlu_pro_27); the repository ships it, so this checkout is incomplete")
    return path


@pytest.fixture(scope="session")
def shared_router_artifact(shared_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A UniRoute artifact fitted on the real benchmark with the static embedder, as `make demo` fits it.

    ``--embedder static`` distils the static embedding from the local MiniLM weights into the embedding
    cache once per machine (~1 min on 2 loaded cores); embedding the ~10k prompts with it then takes
    seconds (with MiniLM: 10-30 min on a cold cache).

    Fitted once per test run: under pytest-xdist the workers share it (the first to need it fits it
    in the run's common temporary folder, holding a lock; the others wait for it and read it)."""
    from gateway.cli.main import main as cli
    from routing.embedder import file_lock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder of this run, above each worker's own
    out, done = root / "shared-router" / "artifact", root / "shared-router" / "fitted"
    with file_lock(root / "shared-router.lock"):
        if not done.exists():
            assert cli(["router", "fit", "--dataset", str(shared_dataset), "--out", str(out),
                        "--embedder", "static"]) == 0
            done.touch()
    return out


@pytest.fixture(scope="session")
def fake_upstream_url() -> Iterator[str]:
    """The ``/v1`` base URL of tests/fake_upstream.py served by uvicorn on loopback, one server per session."""
    from tests.procs import fake_upstream

    with fake_upstream() as url:
        yield url


def pytest_configure(config: pytest.Config) -> None:
    from tests import parallel
    from tests.progress import NeverSilent

    config.pluginmanager.register(NeverSilent(config), "uniroute-never-silent")
    parallel.register(config)  # where the tests run under pytest-xdist, and in which order

