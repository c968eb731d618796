from __future__ import annotations

import numpy as np
import pytest

from profiling.reprofile import ClusterFeedback, drift_report, format_drift, reprofile


def test_no_feedback_keeps_prior() -> None:
    r = reprofile(np.array([0.2, 0.7]), np.array([10, 30]), [])
    assert np.allclose(r.psi, [0.2, 0.7])
    assert np.allclose(r.counts, [10, 30])


def test_posterior_mean_by_hand() -> None:
    # cluster 0: prior 0.2 on 10 prompts; 10 feedback rows all bad -> (2 + 10) / 20 = 0.6
    fb = [ClusterFeedback(0, 0.0)] * 10 + [ClusterFeedback(1, 1.0)] * 5
    r = reprofile(np.array([0.2, 0.5]), np.array([10, 5]), fb)
    assert r.psi[0] == pytest.approx(0.6)
    assert r.psi[1] == pytest.approx((2.5 + 0) / 10)
    assert list(r.feedback_counts) == [10, 5]


def test_feedback_weight_is_capped() -> None:
    fb = [ClusterFeedback(0, 0.0)] * 1000
    r = reprofile(np.array([0.0]), np.array([10]), fb, max_feedback_weight_ratio=1.0)
    assert r.psi[0] == pytest.approx(0.5)  # feedback counts as at most 10 observations


def test_bad_feedback_rejected() -> None:
    with pytest.raises(ValueError, match="cluster 5 out of range"):
        reprofile(np.array([0.1]), np.array([1]), [ClusterFeedback(5, 1.0)])
    with pytest.raises(ValueError, match="not in"):
        reprofile(np.array([0.1]), np.array([1]), [ClusterFeedback(0, 2.0)])


def test_drift_report_orders_by_change() -> None:
    rows = drift_report({
        "a": (np.array([0.1, 0.2]), np.array([0.1, 0.5]), np.array([0, 7])),
        "b": (np.array([0.4]), np.array([0.3]), np.array([2])),
    })
    assert [(d.model, d.cluster) for d in rows] == [("a", 1), ("b", 0)]
    assert "+0.300" in format_drift(rows)
    assert format_drift([]) == "no profile changed"
