"""``uniroute db`` (migrations), and what every database command shares.

:func:`run` opens the store the config names (``$UNIROUTE_DATABASE_URL`` wins), runs the command,
disposes the store, and reports a failure in one line (``error: ...`` on stderr, exit status 1),
never as a traceback: a refused request (any :class:`~gateway.errors.GatewayError`), a bad or
missing config, an unreachable database, an unknown migration revision.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from gateway.errors import GatewayError
from gateway.store.engine import Store, database_url_from_config, redact


def open_store(args: argparse.Namespace) -> Store:
    """The store of ``--config``'s ``database_url`` (``$UNIROUTE_DATABASE_URL`` wins)."""
    return Store(database_url_from_config(getattr(args, "config", None)))


def error_line(exc: BaseException, store: Store | None = None) -> str | None:
    """What a command prints for an expected failure, in one line; None for anything else (a bug)."""
    import sqlalchemy as sa
    import yaml
    from alembic.util import CommandError

    if isinstance(exc, GatewayError):
        return " ".join(exc.message.split())
    if isinstance(exc, sa.exc.SQLAlchemyError):
        lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        where = f"database {redact(store.url)}" if store is not None else "database"
        return f"{where}: {type(exc).__name__}: {lines[0].strip() if lines else ''}"
    if isinstance(exc, ValueError | OSError | CommandError | yaml.YAMLError):  # ConfigError is a ValueError
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def run(args: argparse.Namespace, command: Callable[[Store], int | None], *, migrate: bool = False) -> int:
    """Run ``command`` on the configured store (``migrate``: bring its schema up to date first); an expected
    failure prints ``error: ...`` and returns 1."""
    store: Store | None = None
    try:
        store = open_store(args)
        if migrate:
            store.upgrade()
        return int(command(store) or 0)
    except Exception as exc:
        line = error_line(exc, store)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    finally:
        if store is not None:
            store.dispose()


def db_upgrade_command(args: argparse.Namespace) -> int:
    def upgrade(store: Store) -> None:
        store.upgrade(args.revision)
        print(f"database {redact(store.url)} at revision {store.current_revision()}")

    return run(args, upgrade)


def db_downgrade_command(args: argparse.Namespace) -> int:
    def downgrade(store: Store) -> None:
        store.downgrade(args.revision)
        print(f"database {redact(store.url)} at revision {store.current_revision() or 'base (empty)'}")

    return run(args, downgrade)


def db_current_command(args: argparse.Namespace) -> int:
    def current(store: Store) -> None:
        now, head = store.current_revision(), Store.head_revision()
        state = "up to date" if now == head else f"behind head {head}: run `uniroute db upgrade`"
        print(f"{redact(store.url)}: revision {now or 'none (empty database)'} ({state})")

    return run(args, current)
