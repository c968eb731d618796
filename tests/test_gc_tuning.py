"""The served gateway's collector settings (gateway/app.py: freeze_heap; docs/PERFORMANCE.md "Stalls"): the
objects alive at start-up are frozen, so a full collection no longer walks them — the cause of the half-second
stalls of issue 14."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator

import pytest

from gateway.app import GC_THRESHOLDS, freeze_heap


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def _full_collection_s() -> float:
    t0 = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t0


def test_a_full_collection_skips_what_was_alive_at_start_up(restore_gc: None) -> None:
    heap = [{"i": i, "l": [i]} for i in range(300_000)]  # long-lived containers, as LiteLLM's cost map and modules
    gc.collect()
    before = min(_full_collection_s() for _ in range(3))
    freeze_heap()
    assert gc.get_freeze_count() >= len(heap)
    assert gc.get_threshold() == GC_THRESHOLDS
    after = min(_full_collection_s() for _ in range(3))
    assert after < before / 3, (before, after)
    garbage: list[list[object]] = [[]]
    garbage[0].append(garbage)  # a cycle made after start-up is still collected
    del garbage
    assert gc.collect() >= 1
    del heap

