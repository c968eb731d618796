"""The soak benchmark's pure parts: per-interval figures, memory after warm-up and the verdict on the bars."""

from __future__ import annotations

import os
from typing import Any

import pytest

from benchmarks.loadgen import Sample
from benchmarks.soak import MB, intervals, memory_after_warmup, rss_bytes, soak_bodies, verdict


def _rss(*points: tuple[float, float]) -> list[tuple[float, int]]:
    return [(t, int(mb * MB)) for t, mb in points]


def test_memory_after_warmup_compares_from_the_first_sample_past_warmup() -> None:
    rss = _rss((0, 100), (30, 380), (60, 400), (90, 430), (120, 420))
    mem = memory_after_warmup(rss, 60)
    assert mem == pytest.approx({"warm_mb": 400, "max_mb": 430, "end_mb": 420, "growth": 0.075})
    assert memory_after_warmup(rss, 200) is None


def _bars(**kw: Any) -> dict[str, bool | None]:
    args: dict[str, Any] = {"rss": _rss((0, 100), (60, 400), (300, 420)), "warmup_s": 60, "sent": 100,
                               "ok": 100, "crashed": False, "rows": 100, "counted": 100.0}
    args.update(kw)
    return {line["bar"].split(" (")[0].split(",")[0]: line["met"] for line in verdict(**args)}


def test_verdict_all_bars_met() -> None:
    assert _bars() == {"memory flat": True, "zero errors": True, "no lost log rows": True}


@pytest.mark.parametrize(("change", "failed"), [
    ({"rss": _rss((60, 400), (200, 441))}, "memory flat"),  # +10.25%
    ({"ok": 99}, "zero errors"),
    ({"crashed": True}, "zero errors"),
    ({"sent": 0, "ok": 0, "rows": 0, "counted": 0.0}, "zero errors"),  # nothing ran: not a pass
    ({"rows": 99}, "no lost log rows"),
    ({"counted": 101.0}, "no lost log rows"),
])
def test_verdict_each_bar_can_fail(change: dict[str, object], failed: str) -> None:
    bars = _bars(**change)
    assert bars.pop(failed) is False
    assert all(bars.values())


def test_verdict_memory_is_not_judged_without_a_sample_after_warmup() -> None:
    lines = verdict(rss=_rss((0, 100), (30, 200)), warmup_s=60, sent=5, ok=5, crashed=False, rows=5, counted=5)
    assert lines[0]["met"] is None and "too short" in lines[0]["measured"]


def test_intervals_bucket_by_completion_time() -> None:
    t0 = 1000.0
    samples = [Sample(200, 0.010, 0.004, end_s=t0 + 0.5), Sample(200, 0.030, 0.006, end_s=t0 + 9.9),
               Sample(502, 0.001, None, end_s=t0 + 10.1), Sample(200, 0.020, None, end_s=t0 + 15.0),
               Sample(200, 0.020, None, error="incomplete", end_s=t0 + 14.0)]
    out = intervals(samples, t0, 10.0, _rss((5, 400), (9, 410), (12, 420)))
    assert [(w["completed"], w["errors"]) for w in out] == [(2, 0), (1, 2)]
    assert out[0]["rps"] == pytest.approx(0.2) and out[0]["rss_mb"] == pytest.approx(410)
    assert out[0]["latency_p50_ms"] == pytest.approx(20.0) and out[0]["ttft_p99_ms"] == pytest.approx(5.98)
    assert out[1]["t_end_s"] == pytest.approx(15.0) and out[1]["rps"] == pytest.approx(0.2)  # the short last window
    assert out[1]["ttft_p50_ms"] is None
    assert intervals([], t0, 10.0) == []


def test_mixed_bodies_alternate_streaming() -> None:
    bodies = soak_bodies(["a", "b", "c"], "mixed")
    assert [b.get("stream", False) for b in bodies] == [True, False]  # even: alternation survives the rotation
    assert all(b["model"] == "auto" for b in bodies)
    assert all(b["stream"] for b in soak_bodies(["a"], "stream"))
    assert not any(b.get("stream") for b in soak_bodies(["a"], "plain"))


def test_rss_of_this_process_and_of_no_process() -> None:
    assert rss_bytes(os.getpid()) > 1 * MB
    assert rss_bytes(2**22 + 12345) == 0
