"""The SQL store: engine, migrations and health.

One :class:`Store` per process, built in the app's lifespan (never at import time).
SQLite is the default (``sqlite:///var/uniroute.db``; WAL journal, busy timeout): fine for
one host. PostgreSQL (``postgresql+psycopg://...``) is for several replicas.

The statements on each table live in the store's noun modules (``keys.py``, ``budget.py``,
``feedback.py``, ``lease.py``, ``models.py`` with the config's ``models`` seed, ...); the request
log's background writer is :mod:`gateway.store.requestlog`; ``uniroute db`` is :mod:`gateway.cli.db`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from gateway.errors import StoreUnavailableError

logger = logging.getLogger("uniroute.store")

DEFAULT_DATABASE_URL = "sqlite:///var/uniroute.db"
DATABASE_URL_ENV = "UNIROUTE_DATABASE_URL"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x756E69726F757465  # "uniroute": pg_advisory_xact_lock key for concurrent upgrades


# --------------------------------------------------------------------------------------- outages
#: The exceptions of a store outage (unreachable, down, locked, read-only, pool exhausted), as opposed to a
#: statement the database refuses (bad data: IntegrityError, DataError, ProgrammingError). The HTTP layer
#: answers them 503 with Retry-After (``gateway.errors.StoreUnavailableError``), never 500.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database cannot be used right now (retrying later may work)."""
    if isinstance(exc, OUTAGE_ERRORS):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and bool(exc.connection_invalidated)


def unavailable_error(exc: BaseException) -> StoreUnavailableError | None:
    """The 503 to answer for ``exc`` when it is a store outage, else None."""
    return StoreUnavailableError(cause=exc) if is_unavailable(exc) else None


# --------------------------------------------------------------------------------------- engine
def normalise_url(url: str | URL) -> URL:
    """``postgresql://`` → ``postgresql+psycopg://`` (psycopg 3 is the driver we ship)."""
    u = sa.make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def redact(url: str | URL) -> str:
    """The URL without its password, for logs and errors."""
    return sa.make_url(url).render_as_string(hide_password=True)


def create_engine_for(
    url: str | URL,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_timeout_s: float = 10.0,
    connect_timeout_s: int = 5,
    sqlite_busy_timeout_ms: int = 30_000,
    echo: bool = False,
) -> Engine:
    """An engine tuned for the gateway: WAL + busy timeout on SQLite, a checked pool on PostgreSQL."""
    u = normalise_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        memory = u.database in (None, "", ":memory:")
        if not memory:
            Path(str(u.database)).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            u,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": sqlite_busy_timeout_ms / 1000},
            **({"poolclass": StaticPool} if memory else {}),
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(sqlite_busy_timeout_ms)}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if backend == "postgresql":
        return sa.create_engine(
            u,
            echo=echo,
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout_s,
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={"connect_timeout": connect_timeout_s, "application_name": "uniroute"},
        )
    raise ValueError(f"unsupported database URL {redact(u)!r}; use sqlite:///PATH or postgresql+psycopg://...")


def database_url_from_config(path: str | os.PathLike[str] | None) -> str:
    """The database URL for CLI commands: $UNIROUTE_DATABASE_URL, else the config's ``database_url``.

    Only that one key is read (and ``${VAR}``-expanded), so ``uniroute db`` works even when the
    rest of the config refers to things that are absent (a dataset, a router artifact).
    A relative SQLite path resolves against the config file's folder, as in ``gateway.config``.
    """
    env = os.environ.get(DATABASE_URL_ENV)
    if env:
        return env
    cfg_path = Path(path) if path is not None else Path(os.environ.get("UNIROUTE_CONFIG") or "config.yaml")
    if not cfg_path.is_file():
        if path is not None:
            raise FileNotFoundError(f"config file {str(cfg_path)!r} not found")
        return DEFAULT_DATABASE_URL
    import yaml

    try:
        data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{cfg_path}: not valid YAML ({' '.join(str(exc).split())})") from None
    url = data.get("database_url") if isinstance(data, dict) else None
    if isinstance(data, dict) and isinstance(data.get("database"), dict):
        url = data["database"].get("url") or url
    if not url:
        url = DEFAULT_DATABASE_URL
    url = os.path.expandvars(str(url))
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        url = prefix + str((cfg_path.resolve().parent / url[len(prefix):]).resolve())
    return url


# ---------------------------------------------------------------------------------------- store
class Store:
    """Engine + session factory + migrations + health check for one database."""

    def __init__(self, url: str | URL = DEFAULT_DATABASE_URL, **engine_kw: Any) -> None:
        self.url = normalise_url(url)
        self.engine = create_engine_for(self.url, **engine_kw)
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def __repr__(self) -> str:
        return f"Store({redact(self.url)!r})"

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self.sessions.begin() as s:
            yield s

    # -- migrations --------------------------------------------------------------------------
    def _alembic_config(self, connection: Connection) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection"] = connection
        return cfg

    @contextlib.contextmanager
    def _migration_lock(self, conn: Connection) -> Iterator[None]:
        """Serialise concurrent upgrades (several workers or replicas starting at once)."""
        if self.dialect == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            yield
            return
        db = self.url.database
        if self.dialect == "sqlite" and db not in (None, "", ":memory:"):
            import fcntl

            with open(f"{db}.migrate.lock", "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
            return
        yield

    def upgrade(self, revision: str = "head") -> None:
        """Apply migrations up to ``revision`` (idempotent; safe to call from every replica)."""
        from alembic import command

        with self.engine.begin() as conn, self._migration_lock(conn):
            command.upgrade(self._alembic_config(conn), revision)

    def downgrade(self, revision: str) -> None:
        from alembic import command

        with self.engine.begin() as conn, self._migration_lock(conn):
            command.downgrade(self._alembic_config(conn), revision)

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @staticmethod
    def head_revision() -> str | None:
        from alembic.config import Config
        from alembic.script import ScriptDirectory

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        return ScriptDirectory.from_config(cfg).get_current_head()

    # -- health ------------------------------------------------------------------------------
    def ping(self) -> bool:
        """True when the database answers ``SELECT 1``."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception as exc:  # any driver error means "not ready"
            logger.warning("database ping failed: %s", type(exc).__name__)
            return False

    async def aping(self, timeout_s: float = 2.0) -> bool:
        """:meth:`ping` off the event loop, bounded by ``timeout_s``."""
        import asyncio

        try:
            return await asyncio.wait_for(asyncio.to_thread(self.ping), timeout_s)
        except TimeoutError:
            return False

    def dispose(self) -> None:
        self.engine.dispose()
