"""Deferral curves and their summaries (Area, Area(50%), QNC, cost at a target score).

Convention (issue 3): a curve is a set of (normalised cost, mean score) points.
Keep the Pareto points, i.e. those whose score is strictly higher than every
cheaper-or-equal point's; join them with straight lines; hold the curve flat
below the cheapest and beyond the dearest kept point; integrate over [0, 1]
(Area) or [0, 0.5] (Area(50%), not rescaled).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from routing.decision import Decider


def pareto_points(costs: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points where score rises with cost, sorted by cost."""
    c = np.asarray(costs, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.lexsort((-s, c))  # by cost, then best score first
    keep_c: list[float] = []
    keep_s: list[float] = []
    best = -math.inf
    for i in order:
        if s[i] > best:
            keep_c.append(float(c[i]))
            keep_s.append(float(s[i]))
            best = s[i]
    return np.asarray(keep_c), np.asarray(keep_s)


def curve_value(costs: np.ndarray, scores: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The interpolated (flat-extended) Pareto curve evaluated at ``x``."""
    pc, ps = pareto_points(costs, scores)
    return np.interp(np.asarray(x, dtype=np.float64), pc, ps)


def area(costs: np.ndarray, scores: np.ndarray, upper: float = 1.0) -> float:
    """Area under the Pareto curve over [0, upper] (exact for the piecewise-linear curve)."""
    pc, ps = pareto_points(costs, scores)
    knots = np.unique(np.clip(np.concatenate([[0.0, upper], pc]), 0.0, upper))
    vals = np.interp(knots, pc, ps)
    return float(np.trapezoid(vals, knots))


def cost_to_reach(costs: np.ndarray, scores: np.ndarray, target: float) -> float:
    """Least normalised cost at which the curve reaches ``target``; inf if it never does.

    Only achievable costs count: never less than the cheapest point's cost.
    """
    pc, ps = pareto_points(costs, scores)
    if ps[-1] < target - 1e-12:
        return math.inf
    if ps[0] >= target:
        # the cheapest point already reaches it; the flat extension below it is a convention
        # of the Area, not an achievable cost, so the answer is the cheapest point's cost
        return float(pc[0])
    j = int(np.argmax(ps >= target - 1e-12))
    c0, c1, s0, s1 = pc[j - 1], pc[j], ps[j - 1], ps[j]
    return float(c0 + (c1 - c0) * (target - s0) / (s1 - s0))


def qnc(costs: np.ndarray, scores: np.ndarray, best_model_score: float) -> float:
    """Quality-neutral cost: least relative cost reaching the most accurate model's score."""
    return cost_to_reach(costs, scores, best_model_score)


def lambda_all_cheapest(errors: np.ndarray, costs: np.ndarray) -> float:
    """The least λ from which every row of ``errors`` goes to a cheapest model (costs normalised).

    Model j beats a cheapest model c on a row when e_j + λ c_j < e_c + λ c_min, i.e. while
    λ < (e_c − e_j) / (c_j − c_min); the largest such ratio over rows and dearer models is the
    λ beyond which only the cheapest models (and, among equal-cost ones, the lower error) win.
    """
    e = np.asarray(errors, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    cmin = c.min()
    dearer = c > cmin
    if not dearer.any() or e.size == 0:
        return 0.0
    e2 = e.reshape(-1, len(c))
    best_cheap = e2[:, ~dearer].min(axis=1)  # the cheapest models' lowest error on each row
    gaps = (best_cheap[:, None] - e2[:, dearer]) / (c[dearer] - cmin)[None, :]
    return float(max(gaps.max(), 0.0))


def sweep(errors: np.ndarray, costs: np.ndarray, lams: np.ndarray) -> np.ndarray:
    """``lams`` with both ends of the curve made exact: λ = 0 (every prompt to its lowest expected
    error, the all-best point) and one λ past :func:`lambda_all_cheapest` (every prompt to a cheapest
    model), so no curve relies on the Area's flat extension to reach its cheapest point."""
    end = 2.0 * lambda_all_cheapest(errors, costs) + 1.0  # strictly past the last switch, by ≥ 1
    grid = np.asarray(lams, dtype=np.float64)
    return np.unique(np.concatenate([[0.0], grid[grid < end], [end]]))


def deferral_curve(errors: np.ndarray, true_scores: np.ndarray, costs: np.ndarray,
                   lams: np.ndarray, names: Sequence[str] | None = None, *, ends: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Route every prompt with r(x) = argmin_h errors[x, h] + λ·costs[h]/max c for each λ.

    The decision is the gateway's (:class:`routing.decision.Decider`): ties go to the cheaper
    model, then by ``names`` (pool position without names). With ``ends`` (the default) the
    sweep always holds both ends of the curve exactly (:func:`sweep`): the all-best point (λ = 0)
    and the all-cheapest point (a λ past every switch), whatever ``lams`` holds.
    Returns (mean normalised cost, mean true score), one point per λ.
    """
    decider = Decider(costs, names)
    e = np.asarray(errors, dtype=np.float64)
    c = decider.costs
    if ends:
        lams = sweep(e, c, lams)
    lam_arr = np.asarray(lams, dtype=np.float64).reshape(-1)
    xs = np.empty(len(lam_arr))
    ys = np.empty(len(lam_arr))
    rows = np.arange(len(e))
    # many λ at once (Decider.choose_each: the objective e + λ·c and tie-break of Decider.choose),
    # in blocks of at most _BLOCK_CELLS objective cells: a λ loop of numpy calls on small arrays is
    # mostly call overhead (router fits and the evaluation draw thousands of curves)
    step = max(1, _BLOCK_CELLS // max(1, e.size))
    for a in range(0, len(lam_arr), step):
        block = lam_arr[a:a + step]
        choice = decider.choose_each(e, block)  # (λ, prompt)
        xs[a:a + step] = c[choice].mean(axis=-1)
        ys[a:a + step] = true_scores[rows, choice].mean(axis=-1)
    return xs, ys


#: the largest (λ, prompt, model) objective block :func:`deferral_curve` evaluates at once (8 MB of float64)
_BLOCK_CELLS = 1 << 20


#: default λ sweep: 0, then log-spaced; :func:`deferral_curve` adds the exact all-cheapest end
DEFAULT_LAMS = np.concatenate([[0.0], np.logspace(-4, 1.5, 160)])
