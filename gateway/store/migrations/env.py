"""Alembic environment: the target schema is ``gateway.store.tables.Base.metadata``.

The URL comes from (first wins) a connection or URL handed over by the caller
(``gateway.store.engine.Store.upgrade`` puts them in ``config.attributes``), ``-x url=...``,
``$UNIROUTE_DATABASE_URL``, then ``sqlalchemy.url`` of alembic.ini.
SQLite runs in batch mode, so ALTERs that SQLite lacks are done by table copy.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection

import gateway  # noqa: F401  (offline environment first)
from gateway.store.tables import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    url = url or os.environ.get("UNIROUTE_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: pass -x url=..., set UNIROUTE_DATABASE_URL, or use `uniroute db`")
    return str(url)


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Render the project's TypeDecorators as plain SQLAlchemy types (migrations must not import them)."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    is_sqlite = (connection.dialect.name if connection is not None else sa.make_url(url or "").get_backend_name()) == "sqlite"
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=is_sqlite,
        render_item=render_item,
        compare_type=True,
        literal_binds=connection is None,
        dialect_opts={"paramstyle": "named"} if connection is None else {},
    )


def run_migrations_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    given: Connection | None = config.attributes.get("connection")
    if given is not None:
        _configure(connection=given)
        with context.begin_transaction():
            context.run_migrations()
        return
    from gateway.store.engine import create_engine_for

    engine = create_engine_for(_url())
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
