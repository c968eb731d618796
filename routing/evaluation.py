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

from routing import figures
from routing.decision import normalise
from routing.deferral import DEFAULT_LAMS, area, cost_to_reach, curve_value, deferral_curve, qnc
from routing.estimators import (
    ActivePool,
    AlwaysCheapest,
    AlwaysMostAccurate,
    Clairvoyant,
    KNNRouter,
    LabelOracle,
    LearnedMap,
    LearnedMapActive,
    LearnedMapEnsemble,
    LearnedMapKNN,
    RandomRouter,
    RouterEstimator,
    RoutingTask,
    UniRouteKMeans,
    ZeroRouter,
)

ORACLE = "oracle"

#: The headline method, fixed in advance (issue 15): the variant ``uniroute router fit`` ships by default
#: (``--variant learnedmap``). The bars are judged on it; every other UniRoute row is "another variant".
HEADLINE = "uniroute-learnedmap"
#: Reporting seeds start here. Seeds 0–19 were used for development: the earlier tables and the
#: exploration (τ, m, β and the ensemble grid were tuned on the test Areas of seeds 0–9); seeds 200–219
#: decided the profile prior (issue 15). Seeds from 100 on (100–119 in docs/EVALUATION.md) tuned nothing.
REPORT_SEED0 = 100
#: Sign test tie tolerance: paired Areas closer than this count as ties (dropped), not wins or losses.
TIE_TOL = 1e-4


def _kmeans(**kw: Any) -> Callable[[], RouterEstimator]:
    return lambda: UniRouteKMeans(**kw)


def _learnedmap(**kw: Any) -> Callable[[], RouterEstimator]:
    return lambda: LearnedMap(**kw)


#: evaluation method name → policy factory. K (and τ, m where "auto") are chosen per trial with the
#: training LLMs at the validation noise level (routing.estimators.select_params).
METHODS: dict[str, Callable[[], RouterEstimator]] = {
    "zero-router": ZeroRouter,
    "knn": KNNRouter,
    "uniroute-kmeans": UniRouteKMeans,
    "uniroute-learnedmap": LearnedMap,
    "uniroute-kmeans-soft": _kmeans(temperature="auto"),
    "uniroute-kmeans-ens": _kmeans(n_clusters=(10, 20, 40, 80)),
    "uniroute-kmeans-ens-soft": _kmeans(n_clusters=(10, 20, 40, 80), temperature="auto"),
    "uniroute-learnedmap-ens": lambda: LearnedMapEnsemble((10, 20, 40, 80)),
    "uniroute-learnedmap-knn": LearnedMapKNN,  # LearnedMap and K-NN averaged
    # the profile priors side by side (paired measurement of issue 15; the rows above use DEFAULT_PRIOR)
    "uniroute-kmeans-flat": _kmeans(prior="flat"),
    "uniroute-kmeans-difficulty": _kmeans(prior="difficulty"),
    "uniroute-kmeans-soft-flat": _kmeans(temperature="auto", prior="flat"),
    "uniroute-kmeans-soft-difficulty": _kmeans(temperature="auto", prior="difficulty"),
    "uniroute-learnedmap-flat": _learnedmap(prior="flat"),
    "uniroute-learnedmap-difficulty": _learnedmap(prior="difficulty"),
    "uniroute-kmeans-peer": _kmeans(prior="peer"),
    "uniroute-kmeans-soft-peer": _kmeans(temperature="auto", prior="peer"),
    "uniroute-learnedmap-peer": _learnedmap(prior="peer"),
    "uniroute-learnedmap-peer-similarity": _learnedmap(prior="peer-similarity"),
    # active allocation of each new model's label budget (issue 15, routing/active.py)
    "uniroute-learnedmap-active": LearnedMapActive,
    "uniroute-learnedmap-active-disagree": lambda: LearnedMapActive(weight="disagreement"),
    # one design shared by every new model (not adaptive): by cluster from the known models, or by prompt
    "uniroute-learnedmap-active-shared": lambda: LearnedMapActive(allocation="shared"),
    "uniroute-learnedmap-active-informative": lambda: LearnedMapActive(allocation="informative"),
    # the control of the per-model ones above: the same path (all candidates, the oracle, the budget), a uniform choice
    "uniroute-learnedmap-active-uniform": lambda: LearnedMapActive(allocation="uniform"),
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


def validation_subset(va: np.ndarray, seed: int, val_size: int | None) -> np.ndarray:
    """The first ``val_size`` validation prompts in a seeded order (all of them for None): the
    subsets of one trial are nested, so a larger size only adds labels."""
    if val_size is None:
        return va
    if not 0 < val_size <= len(va):
        raise ValueError(f"validation size {val_size} is not in 1..{len(va)} (this trial's validation prompts)")
    order = np.random.default_rng([seed, 1]).permutation(va)
    return np.sort(order[:val_size])


def run_trial(x: np.ndarray, scores: np.ndarray, costs: np.ndarray, models: Sequence[str], seed: int,
              methods: Sequence[str], *, oracle: bool = True, val_size: int | None = None,
              cache: dict[Any, Any] | None = None) -> TrialResult:
    """One trial. ``val_size``: each new (test) LLM is seen through that many validation labels (a
    seeded subset of the trial's validation prompts; the training LLMs' validation labels are cut to
    the same prompts). ``cache``: shared by the trials of one seed at several sizes (the clusters and
    θ depend on the training prompts and LLMs only)."""
    tr, va_all, te, mtr, mte = split_trial(len(x), len(models), seed)
    va = validation_subset(va_all, seed, val_size)
    task = RoutingTask(
        x_train=x[tr], train_scores=scores[np.ix_(tr, mtr)], train_costs=costs[mtr],
        x_val=x[va], val_train_scores=scores[np.ix_(va, mtr)], val_scores=scores[np.ix_(va, mte)],
        pool_costs=costs[mte], pool_names=[models[j] for j in mte],
        pool_train_scores=scores[np.ix_(tr, mte)], seed=seed,
        # active profiling chooses its len(va) labels per new model among all the trial's validation prompts
        candidates=ActivePool(x=x[va_all], train_scores=scores[np.ix_(va_all, mtr)],
                              oracle=LabelOracle(scores[np.ix_(va_all, mte)], budget=len(va))),
    )
    if cache is not None:
        task.cache = cache
    test_scores = scores[np.ix_(te, mte)]
    best = float(test_scores.mean(axis=0).max())
    res = TrialResult(seed=seed, info={"test_models": task.pool_names, "best_test_score": best,
                                       "val_size": len(va)})
    for name in methods:
        t0 = time.perf_counter()
        if task.candidates is not None:  # each method's active profiling starts with nothing asked
            task.candidates.oracle = LabelOracle(scores[np.ix_(va_all, mte)], budget=len(va))
        policy = METHODS[name]().fit(task)
        xs, ys = policy.curve(x[te], test_scores, costs[mte], names=task.pool_names)
        res.metrics[name] = summarise_curve(xs, ys, best)
        res.metrics[name]["fit_seconds"] = time.perf_counter() - t0
        res.curves[name] = curve_value(xs, ys, CURVE_GRID)
        for attr in ("k_", "temperature_", "prior_strength_", "labels_used_"):
            if hasattr(policy, attr):
                res.info[f"{name}.{attr}"] = getattr(policy, attr)
    if oracle:
        xs, ys = deferral_curve(1.0 - test_scores, test_scores, normalise(costs[mte]), DEFAULT_LAMS,
                                task.pool_names)
        res.metrics[ORACLE] = summarise_curve(xs, ys, best)
        res.curves[ORACLE] = curve_value(xs, ys, CURVE_GRID)
    return res


def sign_test(a: Sequence[float], b: Sequence[float], tol: float = TIE_TOL) -> dict[str, float]:
    """Paired two-sided sign test of a vs b: a pair differing by at most ``tol`` is a tie and is dropped."""
    from scipy.stats import binomtest

    diffs = [u - v for u, v in zip(a, b, strict=True)]
    wins = sum(1 for d in diffs if d > tol)
    losses = sum(1 for d in diffs if d < -tol)
    p = float(binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    return {"wins": wins, "losses": losses, "ties": len(diffs) - wins - losses, "p": p, "tol": tol}


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
    out["headline"] = HEADLINE
    uni = [n for n in names if n.startswith("uniroute")]
    for name in sorted(uni, key=lambda n: n != HEADLINE):  # the headline's tests first
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
        label = f"**{name}** (headline)" if name == summary.get("headline") else name
        lines.append(f"| {label} | {cell('area')} | {cell('area50')} | {cell('qnc')} | {cell('cost95')} | "
                     f"{row['fit_seconds']['mean_finite']:.2f} |")
    if summary["sign_tests"]:
        tol = next(iter(summary["sign_tests"].values()))["tol"]
        lines += ["", f"| sign test (Area, paired over trials; ties: within {tol:g}) | wins | losses | ties | "
                  "p (two-sided) |", "|---|---|---|---|---|"]
        for key, t in summary["sign_tests"].items():
            lines.append(f"| {key} | {t['wins']} | {t['losses']} | {t['ties']} | {t['p']:.2g} |")
    return "\n".join(lines)


def plot_curves(results: Sequence[TrialResult], path: str | Path, title: str) -> Path:
    plt = figures.pyplot()

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
    return figures.save(fig, path, dpi=120)


def _seed_iter(seeds: range, progress: bool, desc: str) -> Any:
    if not progress:
        return seeds
    from tqdm import tqdm

    return tqdm(seeds, desc=desc, unit="trial")


def _check_methods(methods: Sequence[str]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")


def evaluate(x: np.ndarray, scores: np.ndarray, costs: np.ndarray, models: Sequence[str], *,
             trials: int, seed0: int = REPORT_SEED0, methods: Sequence[str] = DEFAULT_METHODS,
             progress: bool = True, val_size: int | None = None) -> tuple[list[TrialResult], dict[str, Any]]:
    _check_methods(methods)
    seeds = range(seed0, seed0 + trials)
    results = [run_trial(x, scores, costs, models, s, methods, val_size=val_size)
               for s in _seed_iter(seeds, progress, "trials")]
    summary = aggregate(results)
    summary["val_size"] = results[0].info["val_size"] if results else val_size
    return results, summary


def evaluate_sizes(x: np.ndarray, scores: np.ndarray, costs: np.ndarray, models: Sequence[str], *,
                   val_sizes: Sequence[int], trials: int, seed0: int = REPORT_SEED0,
                   methods: Sequence[str] = DEFAULT_METHODS, progress: bool = True
                   ) -> tuple[dict[int, list[TrialResult]], dict[str, Any]]:
    """The label-efficiency curve: every method at each validation size, on the same trials (same
    splits, test prompts and LLMs; nested validation subsets), so sizes and methods pair per trial."""
    _check_methods(methods)
    sizes = sorted({int(n) for n in val_sizes})
    by_size: dict[int, list[TrialResult]] = {n: [] for n in sizes}
    for s in _seed_iter(range(seed0, seed0 + trials), progress, "trials × sizes"):
        cache: dict[Any, Any] = {}
        for n in sizes:
            by_size[n].append(run_trial(x, scores, costs, models, s, methods, val_size=n, cache=cache))
    summary: dict[str, Any] = {"trials": trials, "seeds": list(range(seed0, seed0 + trials)), "val_sizes": sizes,
                               "headline": HEADLINE, "by_size": {str(n): aggregate(by_size[n]) for n in sizes}}
    if HEADLINE in methods and len(sizes) > 1:
        top = sizes[-1]
        summary["headline_vs_largest"] = {
            str(n): {"delta_mean": float(np.mean([a.metrics[HEADLINE]["area"] - b.metrics[HEADLINE]["area"]
                                                  for a, b in zip(by_size[n], by_size[top], strict=True)])),
                     "reference_size": top}
            for n in sizes}
    return by_size, summary


def sizes_table(summary: dict[str, Any]) -> str:
    """Markdown: mean Area and QNC per method (rows) and validation size (columns), then the headline's
    sign tests against K-NN and ZeroRouter at each size."""
    sizes = summary["val_sizes"]
    by = summary["by_size"]
    n = summary["trials"]
    methods = list(by[str(sizes[0])]["methods"])
    head = "| method | " + " | ".join(f"n = {s}" for s in sizes) + " |"
    sep = "|---" * (len(sizes) + 1) + "|"
    lines = [f"Mean Area ± std over {n} trials, by validation labels per new model:", "", head, sep]

    def label(name: str) -> str:
        return f"**{name}** (headline)" if name == summary.get("headline") else name

    for name in methods:
        cells = [_fmt(by[str(s)]["methods"][name]["area"]) for s in sizes]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    lines += ["", "QNC (mean over the trials that reach the best test model's score; reached in):", "", head, sep]
    for name in methods:
        cells = []
        for s in sizes:
            v = by[str(s)]["methods"][name]["qnc"]
            cells.append("never" if v["n_finite"] == 0 else f"{v['mean_finite']:.3f} ({v['n_finite']}/{n})")
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    tests = [k for k in by[str(sizes[0])]["sign_tests"] if k.startswith(f"{summary.get('headline')} vs ")]
    if tests:
        tol = by[str(sizes[0])]["sign_tests"][tests[0]]["tol"]
        lines += ["", f"Sign tests of the headline (wins/losses/ties within {tol:g}, p two-sided):", "", head, sep]
        for key in tests:
            cells = [(lambda t: f"{t['wins']}/{t['losses']}/{t['ties']}, p = {t['p']:.2g}")(
                by[str(s)]["sign_tests"][key]) for s in sizes]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if "headline_vs_largest" in summary:
        d = summary["headline_vs_largest"]
        lines += ["", f"| headline Area − its Area at n = {sizes[-1]} (mean of paired differences) | "
                  + " | ".join(f"{d[str(s)]['delta_mean']:+.4f}" for s in sizes) + " |", sep]
    return "\n".join(lines)


def plot_sizes(summary: dict[str, Any], path: str | Path, title: str) -> Path:
    """Area (and QNC) against the number of validation labels per new model, one line per router
    (the paper's Figure 2, bottom); error bars: standard error over the trials."""
    plt = figures.pyplot()

    sizes = summary["val_sizes"]
    by = summary["by_size"]
    n = summary["trials"]
    methods = [m for m in by[str(sizes[0])]["methods"] if m not in ("random", "most-accurate", "cheapest", ORACLE)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    for name in methods:
        rows = [by[str(s)]["methods"][name] for s in sizes]
        mean = [r["area"]["mean_finite"] for r in rows]
        err = [r["area"]["std"] / math.sqrt(n) if math.isfinite(r["area"]["std"]) else 0.0 for r in rows]
        style = "--" if name == "clairvoyant" else "-"
        width = 2.4 if name == summary.get("headline") else (1.6 if name.startswith("uniroute") else 1.0)
        ax.errorbar(sizes, mean, yerr=err, fmt=style + "o", label=name, linewidth=width, markersize=3, capsize=2)
        q = [r["qnc"]["mean_finite"] if r["qnc"]["n_finite"] else math.nan for r in rows]
        bx.plot(sizes, q, style + "o", label=name, linewidth=width, markersize=3)
    for a, ylabel in ((ax, "mean Area (deferral curve, test prompts)"),
                      (bx, "QNC (mean over trials that reach it)")):
        a.set_xscale("log")
        a.set_xticks(sizes)
        a.set_xticklabels([str(s) for s in sizes])
        a.set_xlabel("validation labels per new model")
        a.set_ylabel(ylabel)
        a.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    return figures.save(fig, path, dpi=120)
