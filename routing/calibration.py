"""λ calibration: the λ whose expected mean normalised cost on the validation prompts meets a target.

For a fixed pool, the expected cost of routing the validation prompts,
C(λ) = mean_x c(r_λ(x)) / max c, is a non-increasing step function of λ (a larger λ
never moves a prompt to a dearer model). :func:`calibrate_lambda` bisects for the
least λ with C(λ) ≤ target — the existence the paper's Proposition 1 promises,
made constructive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from routing.decision import Decider, expected_errors
from routing.policy import PoolModel, normalised_costs


@dataclass(frozen=True)
class Calibration:
    lam: float
    expected_cost: float  # mean normalised cost on the validation prompts at lam
    expected_error: float
    target_cost: float


def expected_cost(z: np.ndarray, pool: Sequence[PoolModel], lam: float) -> tuple[float, float]:
    """(mean normalised cost, mean expected error) of routing prompts with memberships ``z`` (n, K),
    deciding as the gateway does (:class:`routing.decision.Decider`) over the pool's profiled models."""
    profiled = [m for m in pool if m.psi is not None]
    psi = np.stack([np.asarray(m.psi, dtype=np.float64) for m in profiled])
    decider = Decider([m.cost for m in profiled], [m.name for m in profiled])
    err = expected_errors(z, psi)
    choice = decider.choose(err, lam)
    return float(decider.costs[choice].mean()), float(err[np.arange(len(err)), choice].mean())


def cost_curve(z: np.ndarray, pool: Sequence[PoolModel], lams: Sequence[float]) -> np.ndarray:
    """C(λ) at each of ``lams``: the expected mean normalised cost of routing prompts with memberships ``z``
    (as :func:`expected_cost`, with the decider built once). The budget pacer's feed-forward
    (gateway/pacing.py) inverts it."""
    profiled = [m for m in pool if m.psi is not None]
    if not profiled:
        raise ValueError("no profiled model in the pool")
    psi = np.stack([np.asarray(m.psi, dtype=np.float64) for m in profiled])
    decider = Decider([m.cost for m in profiled], [m.name for m in profiled])
    err = expected_errors(z, psi)
    return np.asarray([float(decider.costs[decider.choose(err, float(lam))].mean()) for lam in lams])


def calibrate_lambda(z: np.ndarray, pool: Sequence[PoolModel], target_cost: float, *,
                     tol: float = 1e-7, max_iter: int = 200) -> Calibration:
    """The least λ ≥ 0 whose expected mean normalised cost is ≤ ``target_cost``."""
    profiled = [m for m in pool if m.psi is not None]
    if not profiled:
        raise ValueError("no profiled model in the pool")
    c0, e0 = expected_cost(z, profiled, 0.0)
    if c0 <= target_cost:
        return Calibration(0.0, c0, e0, target_cost)
    c = normalised_costs(profiled)
    gaps = np.diff(np.unique(c))
    hi = 2.0 / float(gaps.min()) if len(gaps) else 1.0  # beyond this every prompt goes to the cheapest model
    c_hi, _ = expected_cost(z, profiled, hi)
    if c_hi > target_cost:
        raise ValueError(f"target mean normalised cost {target_cost:g} is below the cheapest achievable "
                         f"{c_hi:.4g}; valid targets are in [{c_hi:.4g}, 1]")
    lo = 0.0
    for _ in range(max_iter):
        if hi - lo <= tol * max(1.0, hi):
            break
        mid = 0.5 * (lo + hi)
        if expected_cost(z, profiled, mid)[0] <= target_cost:
            hi = mid
        else:
            lo = mid
    cost, err = expected_cost(z, profiled, hi)
    return Calibration(hi, cost, err, target_cost)


def target_from_fraction(pool: Sequence[PoolModel], overall_errors: Sequence[float], fraction: float) -> float:
    """``fraction`` × the normalised cost of the most accurate model (lowest overall error)."""
    c = normalised_costs(pool)
    best = int(np.argmin(np.asarray(overall_errors)))
    return float(fraction * c[best])
