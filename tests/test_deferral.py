import math

import numpy as np
import pytest

from routing.deferral import area, cost_to_reach, curve_value, deferral_curve, pareto_points, qnc


def test_pareto_keeps_points_where_score_rises_with_cost() -> None:
    c = np.array([0.5, 0.1, 0.3, 0.3, 0.8, 1.0])
    s = np.array([0.6, 0.4, 0.5, 0.45, 0.55, 0.7])
    pc, ps = pareto_points(c, s)
    assert pc.tolist() == [0.1, 0.3, 0.5, 1.0]
    assert ps.tolist() == [0.4, 0.5, 0.6, 0.7]


def test_area_hand_computed_with_flat_extension() -> None:
    # points (0.2, 0.4) and (0.6, 0.8): flat 0.4 on [0, .2], trapezoid on [.2, .6], flat 0.8 on [.6, 1]
    c, s = np.array([0.2, 0.6]), np.array([0.4, 0.8])
    expected = 0.2 * 0.4 + 0.4 * (0.4 + 0.8) / 2 + 0.4 * 0.8
    assert area(c, s) == pytest.approx(expected)
    # Area(50%): [0, .5], not rescaled: 0.08 + trapezoid from .2 to .5 (0.4 → 0.7)
    assert area(c, s, 0.5) == pytest.approx(0.08 + 0.3 * (0.4 + 0.7) / 2)


def test_area_ignores_dominated_points() -> None:
    c, s = np.array([0.2, 0.4, 0.6]), np.array([0.4, 0.3, 0.8])
    assert area(c, s) == pytest.approx(area(np.array([0.2, 0.6]), np.array([0.4, 0.8])))


def test_single_point_curve_is_flat() -> None:
    assert area(np.array([0.3]), np.array([0.5])) == pytest.approx(0.5)
    assert area(np.array([0.3]), np.array([0.5]), 0.5) == pytest.approx(0.25)


def test_curve_value_interpolates() -> None:
    v = curve_value(np.array([0.2, 0.6]), np.array([0.4, 0.8]), np.array([0.0, 0.4, 1.0]))
    assert v.tolist() == pytest.approx([0.4, 0.6, 0.8])


def test_qnc_and_cost_to_reach() -> None:
    c, s = np.array([0.2, 0.6, 1.0]), np.array([0.4, 0.8, 0.9])
    assert qnc(c, s, 0.6) == pytest.approx(0.4)
    assert cost_to_reach(c, s, 0.85) == pytest.approx(0.8)
    assert math.isinf(qnc(c, s, 0.95))  # never reached: reported as inf
    assert cost_to_reach(c, s, 0.3) == pytest.approx(0.2)  # the cheapest point's cost, not the flat 0


def test_deferral_curve_endpoints() -> None:
    errors = np.array([[0.1, 0.5], [0.9, 0.2]])
    true = np.array([[1.0, 0.0], [0.0, 1.0]])
    costs = np.array([1.0, 0.25])
    xs, ys = deferral_curve(errors, true, costs, np.array([0.0, 100.0]))
    assert xs.tolist() == pytest.approx([(1.0 + 0.25) / 2, 0.25])
    assert ys.tolist() == pytest.approx([1.0, 0.5])
