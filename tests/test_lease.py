"""The database lease: one holder at a time, on SQLite and PostgreSQL, with two (and more) contenders."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store import lease
from gateway.store.engine import Store
from tests.storeutil import fresh_pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'l.db'}")
        s.upgrade()
        yield s
        s.dispose()
        return
    with fresh_pg_database() as url:
        s = Store(url)
        s.upgrade()
        yield s
        s.dispose()


def test_two_contenders(store: Store) -> None:
    assert lease.acquire(store, "job", "a", 60)
    assert not lease.acquire(store, "job", "b", 60)
    assert lease.acquire(store, "job", "a", 60)  # renewal by the holder
    assert lease.holder_of(store, "job") == "a"
    assert not lease.release(store, "job", "b")
    assert lease.release(store, "job", "a")
    assert lease.acquire(store, "job", "b", 60)
    assert lease.holder_of(store, "job") == "b"


def test_expired_lease_is_taken_over(store: Store) -> None:
    assert lease.acquire(store, "job", "a", 0.2)
    time.sleep(0.3)
    assert lease.acquire(store, "job", "b", 60)
    assert not lease.acquire(store, "job", "a", 60)


def test_racing_contenders_one_winner(store: Store) -> None:
    for round_ in range(5):
        name = f"race-{round_}"
        barrier = threading.Barrier(6)
        wins: list[str] = []

        def contend(holder: str, name: str = name, barrier: threading.Barrier = barrier,
                    wins: list[str] = wins) -> None:
            barrier.wait()
            if lease.acquire(store, name, holder, 60):
                wins.append(holder)

        threads = [threading.Thread(target=contend, args=(f"h{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, wins
