import math

import numpy as np
import pytest

from routing.deferral import (
    DEFAULT_LAMS,
    area,
    cost_to_reach,
    curve_value,
    deferral_curve,
    lambda_all_cheapest,
    pareto_points,
    qnc,
    sweep,
)


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


def test_curve_reaches_both_ends_exactly_whatever_the_grid() -> None:
    """Issue 15: the λ grid stopped at 31.6, so with close costs no curve reached its all-cheapest point
    and the Area's flat extension credited the last point's score down to zero cost."""
    rng = np.random.default_rng(0)
    errors = rng.uniform(size=(300, 4))
    true = (rng.random((300, 4)) < 0.6).astype(float)
    costs = np.array([1.0, 1.001, 1.5, 3.0])  # the cheapest two differ by 0.03% of the max cost
    c = costs / costs.max()
    lam_end = lambda_all_cheapest(errors, c)
    assert lam_end > DEFAULT_LAMS.max()  # the old grid could not get there
    for lams in (DEFAULT_LAMS, np.array([0.01]), np.array([5.0, 1e6])):
        xs, ys = deferral_curve(errors, true, costs, lams)
        i0, iend = int(np.argmax(xs)), int(np.argmin(xs))
        # the all-best end: λ = 0, every prompt to its lowest expected error
        best = errors.argmin(axis=1)
        assert xs[i0] == pytest.approx(c[best].mean()) and ys[i0] == pytest.approx(true[np.arange(300), best].mean())
        # the all-cheapest end, exactly: every prompt to the cheapest model
        assert xs[iend] == c.min() and ys[iend] == true[:, 0].mean()
    # no extrapolation gain: the first Pareto point is the all-cheapest point, for any router
    pc, ps = pareto_points(*deferral_curve(errors, true, costs, DEFAULT_LAMS))
    assert pc[0] == c.min() and ps[0] == true[:, 0].mean()


def test_all_cheapest_lambda_is_the_last_switch() -> None:
    errors = np.array([[0.5, 0.1], [0.2, 0.0]])
    c = np.array([0.5, 1.0])  # model 0 is the cheapest
    lam = lambda_all_cheapest(errors, c)
    assert lam == pytest.approx((0.5 - 0.1) / 0.5)
    assert set(sweep(errors, c, np.array([0.1, 100.0]))) == {0.0, 0.1, 2 * lam + 1}  # past the end: dropped
    assert lambda_all_cheapest(np.array([[0.3, 0.3]]), np.array([1.0, 1.0])) == 0.0  # equal costs


@pytest.mark.parametrize("block_cells", [1 << 20, 7, 1])
def test_curve_is_the_one_lambda_at_a_time_decision_bit_for_bit(block_cells: int, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """The λ of a sweep are decided in blocks (Decider.choose_each); every point is exactly what one
    Decider.choose per λ gives, ties (equal errors, equal costs: cheaper first, then by name) included,
    whatever the block size."""
    from routing import deferral
    from routing.decision import Decider

    monkeypatch.setattr(deferral, "_BLOCK_CELLS", block_cells)
    rng = np.random.default_rng(5)
    errors = np.round(rng.random((40, 6)), 1)  # many ties
    scores = rng.random((40, 6))
    costs = np.array([3.0, 1.0, 3.0, 2.0, 1.0, 8.0])
    names = ["f", "b", "a", "e", "d", "c"]
    decider = Decider(costs, names)
    for lams in (DEFAULT_LAMS, np.array([0.0, 0.2, 0.2, 5.0])):
        xs, ys = deferral_curve(errors, scores, costs, lams, names, ends=False)
        rows = np.arange(len(errors))
        for t, lam in enumerate(lams):
            choice = decider.choose(errors, float(lam))
            assert xs[t] == decider.costs[choice].mean() and ys[t] == scores[rows, choice].mean()
        each = decider.choose_each(errors, lams)
        assert each.shape == (len(lams), len(errors))
        assert all(np.array_equal(each[t], decider.choose(errors, float(lam))) for t, lam in enumerate(lams))
