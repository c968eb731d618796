"""Helpers shared by the store/auth/budget/metrics tests: throwaway databases and service checks.

PostgreSQL and Redis tests skip with a reason when the service is down, except under
``CI=true`` where they fail (the CI must not silently skip them).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.store.engine import Store

PG_ADMIN_URL = os.environ.get("UNIROUTE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("UNIROUTE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REPO_ROOT = Path(__file__).resolve().parents[1]


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def require(service: str, ok: bool) -> None:
    if ok:
        return
    msg = f"{service} is not reachable (start it with `make services`)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {msg}")
    pytest.skip(msg)


def require_pg() -> None:
    u = sa.make_url(PG_ADMIN_URL)
    require(f"PostgreSQL at {u.host}:{u.port}", _port_open(u.host or "127.0.0.1", u.port or 5432))


def require_redis() -> None:
    u = sa.make_url(REDIS_URL.replace("redis://", "redis+x://"))
    require(f"Redis at {u.host}:{u.port}", _port_open(u.host or "127.0.0.1", u.port or 6379))


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new, empty PostgreSQL database ``uniroute_test_<random>``; dropped afterwards."""
    require_pg()
    name = f"uniroute_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    """A fresh database URL of ``kind`` ('sqlite' or 'postgresql')."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'uniroute.db'}"
    elif kind == "postgresql":
        with fresh_pg_database() as url:
            yield url
    else:  # pragma: no cover
        raise ValueError(kind)


#: The databases a store test runs on: SQLite, and PostgreSQL (marked ``postgres``).
DB_KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def store_fixture(*, migrate: bool = True, **store_kwargs: Any) -> Callable[..., Iterator[Store]]:
    """A ``store`` fixture: a :class:`Store` (built with ``store_kwargs``, e.g. ``pool_size``) on a fresh database of
    each of :data:`DB_KINDS` (each test using it runs once on each), migrated to the head unless ``migrate=False``,
    disposed afterwards. A test module takes it as ``store = store_fixture(...)``."""

    @pytest.fixture(params=DB_KINDS)
    def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
        with database(request.param, tmp_path) as url:
            s = Store(url, **store_kwargs)
            try:
                if migrate:
                    s.upgrade()
                yield s
            finally:
                s.dispose()

    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
