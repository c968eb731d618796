"""``uniroute db`` (migrations), and what every database command shares.

:func:`run` opens the store the config names (``$UNIROUTE_DATABASE_URL`` wins), runs the command and
disposes the store. A failure (a refused request, a bad or missing config, an unreachable database, an
unknown migration revision) is printed in one line by :func:`gateway.cli.main.main`, as for every command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from gateway.store.engine import Store, database_url_from_config, redact


def open_store(args: argparse.Namespace) -> Store:
    """The store of ``--config``'s ``database_url`` (``$UNIROUTE_DATABASE_URL`` wins)."""
    return Store(database_url_from_config(getattr(args, "config", None)))


def run(args: argparse.Namespace, command: Callable[[Store], int | None], *, migrate: bool = False) -> int:
    """Run ``command`` on the configured store (``migrate``: bring its schema up to date first)."""
    store = open_store(args)
    try:
        if migrate:
            store.upgrade()
        return int(command(store) or 0)
    finally:
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
