"""The paper's evaluation protocol on any routing-benchmark folder.

Each seeded trial draws a random 60/10/30 train/validation/test prompt split and a
random 2/3 training LLMs / 1/3 unseen test LLMs split. Policies are fitted on a
:class:`~routing.estimators.RoutingTask` (test LLMs seen only through their
validation outcomes, except by Clairvoyant) and routed over the test LLMs on the
test prompts by sweeping λ. Per method and trial: Area, Area(50%), QNC and the
cost at which the curve reaches 95% of the most accurate test model's score.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from routing.decision import normalise
from routing.deferral import DEFAULT_LAMS, area, cost_to_reach, curve_value, deferral_curve, qnc
from routing.estimators import (
    AlwaysCheapest,
    AlwaysMostAccurate,
    Clairvoyant,
    KNNRouter,
    LearnedMap,
    LearnedMapEnsemble,
    RandomRouter,
    RouterEstimator,
    RoutingTask,
    UniRouteKMeans,
    ZeroRouter,
)

ORACLE = "oracle"

#: evaluation method name → policy factory
METHODS: dict[str, Callable[[], RouterEstimator]] = {
    "zero-router": ZeroRouter,
    "knn": KNNRouter,
    "uniroute-kmeans": UniRouteKMeans,
    "uniroute-learnedmap": LearnedMap,
    "uniroute-kmeans-soft": lambda: UniRouteKMeans(temperature=0.1),
    "uniroute-kmeans-ens": lambda: UniRouteKMeans(n_clusters=(10, 20, 40, 80)),
    "uniroute-kmeans-ens-soft": lambda: UniRouteKMeans(n_clusters=(10, 20, 40, 80), temperature=0.1),
    "uniroute-learnedmap-ens": lambda: LearnedMapEnsemble((10, 20, 40, 80)),
    "clairvoyant": Clairvoyant,
    "random": RandomRouter,
    "most-accurate": AlwaysMostAccurate,
    "cheapest": AlwaysCheapest,
}
DEFAULT_METHODS = ["zero-router", "knn", "uniroute-kmeans", "uniroute-learnedmap", "uniroute-kmeans-soft",
                   "uniroute-kmeans-ens-soft", "clairvoyant", "random", "most-accurate", "cheapest"]
CURVE_GRID = np.linspace(0.0, 1.0, 201)


@dataclass
class TrialResult:
    seed: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # method → metric → value
    curves: dict[str, np.ndarray] = field(default_factory=dict)  # method → curve on CURVE_GRID
    info: dict[str, Any] = field(default_factory=dict)


def split_trial(n_prompts: int, n_models: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test prompt indices, train LLM indices, test LLM indices)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_prompts)
    n_tr, n_val = round(0.6 * n_prompts), round(0.1 * n_prompts)
    mperm = rng.permutation(n_models)
    m_tr = round(2 * n_models / 3)
    return (np.sort(perm[:n_tr]), np.sort(perm[n_tr:n_tr + n_val]), np.sort(perm[n_tr + n_val:]),
            np.sort(mperm[:m_tr]), np.sort(mperm[m_tr:]))


def summarise_curve(xs: np.ndarray, ys: np.ndarray, best_score: float) -> dict[str, float]:
    return {
        "area": area(xs, ys, 1.0),
        "area50": area(xs, ys, 0.5),
        "qnc": qnc(xs, ys, best_score),
        "cost95": cost_to_reach(xs, ys, 0.95 * best_score),
    }


def run_trial(x: np.ndarray, scores: np.ndarray, costs: np.ndarray, models: Sequence[str], seed: int,
              methods: Sequence[str], *, oracle: bool = True) -> TrialResult:
    tr, va, te, mtr, mte = split_trial(len(x), len(models), seed)
    task = RoutingTask(
        x_train=x[tr], train_scores=scores[np.ix_(tr, mtr)], train_costs=costs[mtr],
        x_val=x[va], val_train_scores=scores[np.ix_(va, mtr)], val_scores=scores[np.ix_(va, mte)],
        pool_costs=costs[mte], pool_names=[models[j] for j in mte],
        pool_train_scores=scores[np.ix_(tr, mte)], seed=seed,
    )
    test_scores = scores[np.ix_(te, mte)]
    best = float(test_scores.mean(axis=0).max())
    res = TrialResult(seed=seed, info={"test_models": task.pool_names, "best_test_score": best})
    for name in methods:
        t0 = time.perf_counter()
        policy = METHODS[name]().fit(task)
        xs, ys = policy.curve(x[te], test_scores, costs[mte], names=task.pool_names)
        res.metrics[name] = summarise_curve(xs, ys, best)
        res.metrics[name]["fit_seconds"] = time.perf_counter() - t0
        res.curves[name] = curve_value(xs, ys, CURVE_GRID)
        for attr in ("k_",):
            if hasattr(policy, attr):
                res.info[f"{name}.{attr}"] = getattr(policy, attr)
    if oracle:
        xs, ys = deferral_curve(1.0 - test_scores, test_scores, normalise(costs[mte]), DEFAULT_LAMS,
                                task.pool_names)
        res.metrics[ORACLE] = summarise_curve(xs, ys, best)
        res.curves[ORACLE] = curve_value(xs, ys, CURVE_GRID)
    return res


def sign_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired two-sided sign test of a vs b (ties dropped)."""
    from scipy.stats import binomtest

    wins = int(sum(1 for u, v in zip(a, b, strict=True) if u > v))
    losses = int(sum(1 for u, v in zip(a, b, strict=True) if u < v))
    p = float(binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return {"wins": wins, "losses": losses, "p": p}


def aggregate(results: Sequence[TrialResult]) -> dict[str, Any]:
    names = list(results[0].metrics)
    out: dict[str, Any] = {"trials": len(results), "seeds": [r.seed for r in results], "methods": {},
                           "sign_tests": {}}
    for name in names:
        row: dict[str, Any] = {}
        for metric in ("area", "area50", "qnc", "cost95", "fit_seconds"):
            vals = np.asarray([r.metrics[name].get(metric, math.nan) for r in results], dtype=np.float64)
            finite = vals[np.isfinite(vals)]
            row[metric] = {
                "mean": float(vals.mean()) if len(finite) == len(vals) else (math.inf if np.isinf(vals).any()
                                                                           else math.nan),
                "std": float(vals.std(ddof=1)) if len(vals) > 1 and len(finite) == len(vals) else math.nan,
                "mean_finite": float(finite.mean()) if len(finite) else math.nan,
                "n_finite": len(finite),
            }
        out["methods"][name] = row
    for name in names:
        if not name.startswith("uniroute"):
            continue
        for ref in ("knn", "zero-router"):
            if ref in names:
                out["sign_tests"][f"{name} vs {ref}"] = sign_test(
                    [r.metrics[name]["area"] for r in results], [r.metrics[ref]["area"] for r in results])
    return out


def _fmt(v: dict[str, float], digits: int = 4) -> str:
    if v["n_finite"] == 0:
        return "never"
    mean = v["mean_finite"]
    s = f"{mean:.{digits}f}"
    if math.isfinite(v["std"]):
        s += f" ± {v['std']:.{digits}f}"
    return s


def markdown_table(summary: dict[str, Any]) -> str:
    n = summary["trials"]
    lines = ["| method | Area | Area(50%) | QNC | cost at 95% of best | fit s/trial |",
             "|---|---|---|---|---|---|"]
    for name, row in summary["methods"].items():
        def cell(metric: str, row: dict[str, Any] = row) -> str:
            v = row[metric]
            s = _fmt(v)
            if 0 < v["n_finite"] < n:
                s += f" (reached in {v['n_finite']}/{n}; mean over those)"
            return s
        lines.append(f"| {name} | {cell('area')} | {cell('area50')} | {cell('qnc')} | {cell('cost95')} | "
                     f"{row['fit_seconds']['mean_finite']:.2f} |")
    if summary["sign_tests"]:
        lines += ["", "| sign test (Area, paired over trials) | wins | losses | p (two-sided) |", "|---|---|---|---|"]
        for key, t in summary["sign_tests"].items():
            lines.append(f"| {key} | {t['wins']} | {t['losses']} | {t['p']:.2g} |")
    return "\n".join(lines)


def plot_curves(results: Sequence[TrialResult], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in results[0].curves:
        mean = np.mean([r.curves[name] for r in results], axis=0)
        style = "--" if name in (ORACLE, "clairvoyant") else "-"
        ax.plot(CURVE_GRID, mean, style, label=name, linewidth=1.6 if name.startswith("uniroute") else 1.0)
    ax.set_xlabel("mean cost / max cost of the test pool")
    ax.set_ylabel("mean score on test prompts")
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def evaluate(x: np.ndarray, scores: np.ndarray, costs: np.ndarray, models: Sequence[str], *,
             trials: int, seed0: int = 0, methods: Sequence[str] = DEFAULT_METHODS, progress: bool = True
             ) -> tuple[list[TrialResult], dict[str, Any]]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    seeds = range(seed0, seed0 + trials)
    it: Any = seeds
    if progress:
        from tqdm import tqdm

        it = tqdm(seeds, desc="trials", unit="trial")
    results = [run_trial(x, scores, costs, models, s, methods) for s in it]
    return results, aggregate(results)
