"""The budget pacer's controller (gateway/pacing.py): pure arithmetic, driven here on synthetic traffic.

The simulation through the real chat service is tests/test_simulate.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gateway.pacing import DEFAULT_LAMBDA_GRID, FALLBACK_CURVE, CostCurve, PaceInputs, PaceState, pace_step

DAY = 86_400.0
CURVE = CostCurve.from_points(DEFAULT_LAMBDA_GRID, [0.05 + 0.95 / (1.0 + 20.0 * lam) for lam in DEFAULT_LAMBDA_GRID])


def test_cost_curve_inverts_and_is_flat_outside_its_grid() -> None:
    c = CostCurve.from_points([0.0, 1.0, 2.0], [1.0, 0.5, 0.2])
    assert c.cost_at(-1) == 1.0 and c.cost_at(5) == 0.2
    assert c.cost_at(0.5) == pytest.approx(0.75)
    assert c.lambda_for(0.75) == pytest.approx(0.5)
    assert c.lambda_for(2.0) == 0.0 and c.lambda_for(0.1) == 2.0
    for lam in np.linspace(0, 2, 21):
        assert c.lambda_for(c.cost_at(float(lam))) == pytest.approx(float(lam))
    # measured points that rise again (ties broken differently) are made non-increasing
    assert CostCurve.from_points([0, 1, 2], [1.0, 0.4, 0.6]).costs == (1.0, 0.4, 0.4)


@pytest.mark.parametrize("bad", [([0.0], [1.0]), ([1.0, 0.5], [1.0, 0.5]), ([0.0, 1.0], [1.0, math.nan]),
                                 ([0.0, 1.0], [1.0])])
def test_cost_curve_refuses_bad_points(bad: tuple[list[float], list[float]]) -> None:
    with pytest.raises(ValueError):
        CostCurve(tuple(bad[0]), tuple(bad[1]))


def _inputs(now: float, spent: float, *, budget: float = 100.0, reserved: float = 0.0, start: float = 0.0,
            lam: float = 0.1) -> PaceInputs:
    return PaceInputs(now=now, period_start=start, period_end=start + DAY, budget_usd=budget, spent_usd=spent,
                      reserved_usd=reserved, lambda_min=0.0, lambda_max=10.0, default_lambda=lam)


def test_a_new_pace_starts_from_the_keys_default_and_holds_it_until_there_is_spend() -> None:
    s = pace_step(None, _inputs(10.0, 0.0))
    assert s.lam == pytest.approx(0.1, rel=1e-3) and s.integral == 0.0
    s2 = pace_step(s, _inputs(20.0, 0.0), CURVE)
    assert s2.lam <= s.lam  # nothing spent: behind the line, so λ may only fall


def test_lambda_rises_when_spend_runs_ahead_and_falls_when_there_is_room() -> None:
    s = pace_step(None, _inputs(0.25 * DAY, 25.0), CURVE)  # on the line
    ahead = pace_step(s, _inputs(0.30 * DAY, 45.0), CURVE)
    behind = pace_step(s, _inputs(0.30 * DAY, 27.0), CURVE)
    assert ahead.lam > s.lam > behind.lam


def test_nothing_left_means_the_cheapest_end_of_the_range() -> None:
    s = pace_step(None, _inputs(0.5 * DAY, 99.0, reserved=1.0), CURVE)
    assert s.lam == 10.0
    assert pace_step(None, _inputs(0.5 * DAY, 0.0, budget=0.0), CURVE).lam == 10.0


def test_a_new_period_starts_a_new_pace_from_the_last_lambda() -> None:
    old = PaceState(lam=2.0, integral=1.5, exposure=1e4, updated_at=DAY - 1, period_start=0.0)
    s = pace_step(old, _inputs(DAY + 5, 0.0, start=DAY), CURVE)
    assert s.period_start == DAY and s.integral == 0.0 and s.lam == pytest.approx(2.0, rel=0.2)


def test_the_fallback_curve_still_lets_the_feedback_move_lambda() -> None:
    s = pace_step(None, _inputs(0.25 * DAY, 25.0))
    assert pace_step(s, _inputs(0.30 * DAY, 45.0)).lam > s.lam
    assert FALLBACK_CURVE.cost_at(0.0) == 1.0


def _simulate(rate: list[float], demand: float, budget: float, steps: int = 2000, noise: float = 0.3,
              seed: int = 0) -> tuple[float, list[float]]:
    """Spend over one period: at each step, the spend of that step's traffic at the λ in use (with noise)."""
    rng = np.random.default_rng(seed)
    dt = DAY / steps
    state: PaceState | None = None
    spent = 0.0
    lams = []
    for i in range(steps):
        t = i * dt
        state = pace_step(state, _inputs(t, spent, budget=budget), CURVE)
        lams.append(state.lam)
        r = rate[int(i * len(rate) / steps)]
        spent += max(0.0, demand * r * CURVE.cost_at(state.lam) * dt * (1 + noise * rng.normal()))
    return spent, lams


@pytest.mark.parametrize("rate", [[1.0], [1.0, 1.0, 4.0, 1.0, 0.2, 1.0, 3.0, 1.0]], ids=["steady", "bursty"])
@pytest.mark.parametrize("share", [0.2, 0.5])
def test_spend_ends_within_five_percent_of_the_budget(rate: list[float], share: float) -> None:
    demand = 1.0 / DAY  # at C = 1 the traffic would spend 1 USD per unit of rate over the period
    mean_rate = float(np.mean(rate))
    budget = share * demand * mean_rate * DAY  # what C = share would spend
    spent, lams = _simulate(rate, demand, budget)
    assert abs(spent - budget) <= 0.05 * budget, (spent, budget)
    assert min(lams) >= 0.0 and max(lams) <= 10.0
