"""Sequential profiling (issue 15): how many validation prompts a new model needs for a target half-width,
and what routing quality its profile then gives.

    PYTHONPATH=. nice -n 10 python benchmarks/sequential_profiling.py [--embedder static] [--seed0 100] \
        [--trials 20] [--targets 0.3,0.25,0.2] [--allocation uniform|active] [--json out.json]

Each trial is ``uniroute eval``'s (routing/evaluation.py: the seeded 60/10/30 prompt split and 18/9 LLM
split). LearnedMap (the headline) is fitted as the evaluation fits it with the whole validation split
(K, m chosen for it). Then every test LLM is profiled sequentially as ``uniroute profile --target-ci X``
profiles a new model (routing.active.SequentialProfile: rounds of max(K, N/10) prompts, the stopping rule
on every cluster's 95 % Beta half-width with the router's prior), reading its labels only on the prompts
asked; its Ψ is the estimator on those prompts. Prints, per target: prompts used per model (mean, min,
max), the mean Area of the router with those profiles and its paired difference to the same router
profiled on all validation prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

import gateway  # noqa: F401  (offline environment)
from routing.active import SequentialProfile
from routing.dataset import default_dataset_path, load_dataset
from routing.deferral import area
from routing.embedder import make_embedder
from routing.estimators import LearnedMap, RoutingTask
from routing.evaluation import split_trial
from routing.profiles import shrunk_cluster_errors


def profile_sequentially(z: np.ndarray, scores: np.ndarray, m: float, target: float, allocation: str,
                         seed: int) -> tuple[np.ndarray, int, str]:
    """Ψ (K,) of one model from its labels ``scores`` (N,) asked sequentially; (Ψ, prompts used, stop reason)."""
    seq = SequentialProfile(z, prior_strength=m, target_ci=target, allocation=allocation, seed=seed)
    asked: list[int] = []
    while True:
        st = seq.state(asked, asked, 1.0 - scores[asked])
        nxt = seq.next_rows(st, asked)
        if len(nxt) == 0:
            break
        asked += [int(i) for i in nxt]
    rows = np.asarray(asked, dtype=np.int64)
    psi, _ = shrunk_cluster_errors(z[rows], 1.0 - scores[rows][:, None], m)
    return psi[0], len(rows), str(st.stop)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--embedder", default="static")
    ap.add_argument("--seed0", type=int, default=100)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--targets", default="0.3,0.25,0.2")
    ap.add_argument("--allocation", default="uniform", choices=["uniform", "active"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ds = load_dataset(args.dataset or default_dataset_path() or "data/mmlu_pro_27", with_responses=False)
    x = make_embedder(args.embedder).embed(ds.prompts)
    targets = [float(t) for t in args.targets.split(",")]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for seed in range(args.seed0, args.seed0 + args.trials):
        tr, va, te, mtr, mte = split_trial(len(x), len(ds.models), seed)
        s = ds.scores
        task = RoutingTask(x_train=x[tr], train_scores=s[np.ix_(tr, mtr)], train_costs=ds.model_costs[mtr],
                           x_val=x[va], val_train_scores=s[np.ix_(va, mtr)], val_scores=s[np.ix_(va, mte)],
                           pool_costs=ds.model_costs[mte], pool_names=[ds.models[j] for j in mte], seed=seed)
        lm = LearnedMap().fit(task)
        test = s[np.ix_(te, mte)]
        full = area(*lm.curve(x[te], test, ds.model_costs[mte], names=task.pool_names))
        z = lm.membership(x[va])
        row: dict[str, Any] = {"seed": seed, "k": lm.k_, "m": lm.prior_strength_, "area_all": full,
                               "candidates": len(va), "targets": {}}
        psi_all = lm.psi_.copy()
        for t in targets:
            got = [profile_sequentially(z, task.val_scores[:, j], lm.prior_strength_, t, args.allocation,
                                        seed) for j in range(len(mte))]  # one order for every model
            lm.psi_ = np.stack([g[0] for g in got])
            a = area(*lm.curve(x[te], test, ds.model_costs[mte], names=task.pool_names))
            lm.psi_ = psi_all
            row["targets"][str(t)] = {"used": [g[1] for g in got], "stops": [g[2] for g in got], "area": a}
        rows.append(row)
        print(json.dumps({"seed": seed, "k": row["k"], **{t: (float(np.mean(v["used"])), round(v["area"] - full, 4))
                                                            for t, v in row["targets"].items()}}), flush=True)
    print(f"\n{args.trials} trials (seeds {args.seed0}–{args.seed0 + args.trials - 1}), {args.allocation} allocation, "
          f"{time.perf_counter() - t0:.0f} s; candidates per trial: {rows[0]['candidates']}")
    print("| target 95% half-width | prompts per new model: mean (min–max) | Area | Area − Area with all "
          "validation prompts (paired mean ± s.e.) | stopped on target |")
    print("|---|---|---|---|---|")
    for t in targets:
        used = np.concatenate([r["targets"][str(t)]["used"] for r in rows])
        d = np.asarray([r["targets"][str(t)]["area"] - r["area_all"] for r in rows])
        stops = [s for r in rows for s in r["targets"][str(t)]["stops"]]
        print(f"| {t:g} | {used.mean():.0f} ({used.min()}–{used.max()}) | "
              f"{np.mean([r['targets'][str(t)]['area'] for r in rows]):.4f} | {d.mean():+.4f} ± "
              f"{d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0:.4f} | "
              f"{sum(s == 'target' for s in stops)}/{len(stops)} |")
    print(f"| all ({rows[0]['candidates']}) | {rows[0]['candidates']} | {np.mean([r['area_all'] for r in rows]):.4f} | 0 | |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
