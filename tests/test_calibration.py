import itertools

import numpy as np
import pytest

from routing.calibration import calibrate_lambda, expected_cost, target_from_fraction
from routing.policy import PoolModel


def pool() -> list[PoolModel]:
    # cluster 0: the cheap model is nearly as good; cluster 1: the dear model is much better
    return [PoolModel("cheap", 1.0, np.array([0.30, 0.70])),
            PoolModel("mid", 3.0, np.array([0.25, 0.40])),
            PoolModel("dear", 10.0, np.array([0.20, 0.10]))]


def memberships(n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.random(n)
    return np.stack([w, 1 - w], axis=1)


def test_expected_cost_is_monotone_in_lambda() -> None:
    z = memberships()
    costs = [expected_cost(z, pool(), lam)[0] for lam in np.linspace(0, 5, 60)]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(costs))
    assert costs[0] == pytest.approx(1.0) and costs[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("target", [0.15, 0.3, 0.5, 0.8])
def test_calibration_meets_the_target(target: float) -> None:
    z = memberships()
    cal = calibrate_lambda(z, pool(), target)
    assert cal.expected_cost <= target + 1e-12
    # the least such λ: a slightly smaller λ overshoots the target
    if cal.lam > 0:
        assert expected_cost(z, pool(), cal.lam * (1 - 1e-4))[0] > target


def test_calibration_limits() -> None:
    z = memberships()
    assert calibrate_lambda(z, pool(), 1.0).lam == 0.0
    with pytest.raises(ValueError, match="cheapest achievable"):
        calibrate_lambda(z, pool(), 0.05)


def test_fraction_of_best() -> None:
    assert target_from_fraction(pool(), [0.5, 0.3, 0.15], 0.5) == pytest.approx(0.5)
    assert target_from_fraction(pool(), [0.5, 0.1, 0.15], 0.5) == pytest.approx(0.15)


def test_the_pacers_feed_forward_is_the_curve_calibrate_bisects() -> None:
    """The budget pacer's C(λ) (routing.calibration.cost_curve, via gateway.pacing.CostCurve) is
    ``uniroute router calibrate``'s expected cost at every λ of the gateway's grid, and inverting it lands
    next to the λ the calibration finds (docs/PACING.md, "Feed-forward from the calibration curve")."""
    from gateway.pacing import DEFAULT_LAMBDA_GRID, CostCurve
    from routing.calibration import cost_curve

    z = memberships()
    grid = list(DEFAULT_LAMBDA_GRID)
    curve = cost_curve(z, pool(), grid)
    assert curve.tolist() == pytest.approx([expected_cost(z, pool(), lam)[0] for lam in grid])
    assert all(a >= b for a, b in itertools.pairwise(curve.tolist()))
    cc = CostCurve.from_points(grid, curve.tolist())
    for target in (0.15, 0.3, 0.5, 0.8):
        lam = cc.lambda_for(target)
        cal = calibrate_lambda(z, pool(), target)
        # C is a step function and the pacer interpolates it between grid points: its inverse lands in the
        # grid interval where the calibrated λ (the least λ whose expected cost meets the target) is
        assert cc.cost_at(lam) == pytest.approx(target)
        below = max(g for g in grid if g <= lam)
        above = min(g for g in grid if g >= lam)
        assert below - 1e-9 <= cal.lam <= above + 1e-9, (target, lam, cal.lam)
        if below < above:  # the curve steps below the target inside that interval
            assert expected_cost(z, pool(), above)[0] <= target + 1e-12 < expected_cost(z, pool(), below)[0]
    with pytest.raises(ValueError, match="no profiled model"):
        cost_curve(z, [PoolModel("new", 1.0)], grid)
