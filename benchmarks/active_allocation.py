"""Active allocation of a new model's label budget (issue 15): LearnedMapActive variants against the headline,
paired per trial, the differences printed as they come.

    PYTHONPATH=. nice -n 10 python benchmarks/active_allocation.py --embedder static --seed0 200 --trials 20 \
        --val-sizes 250,500 --variants p2-iw,ctl-uniform,shared [--json out.json]

Each trial is ``uniroute eval``'s (routing.evaluation.run_trial; the same splits, θ, K and m). The headline
(LearnedMap) profiles every new model on the trial's seeded uniform subset of n validation prompts; each
variant spends the same n labels per new model, chosen among all the trial's validation prompts
(routing.estimators.LearnedMapActive, routing/active.py). ``--embedder minilm``: MiniLM. Prints per size and
variant: the mean paired Area difference to the headline ± its standard error and the sign test
(wins/losses/ties within 1e-4, p two-sided).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np

import gateway  # noqa: F401  (offline environment)
from routing import evaluation as ev
from routing.dataset import default_dataset_path, load_dataset
from routing.embedder import make_embedder
from routing.estimators import LearnedMapActive, RouterEstimator

VARIANTS: dict[str, Callable[[], RouterEstimator]] = {
    # per new model, adaptive (its own labels between rounds): n_k + m ∝ f_k^(p/2)·σ_k
    "p2-iw": lambda: LearnedMapActive(power=2.0),  # = uniroute-learnedmap-active
    "p2-noiw": lambda: LearnedMapActive(power=2.0, reweight=False),
    "p1-iw": lambda: LearnedMapActive(power=1.0),
    "p3-iw": lambda: LearnedMapActive(power=3.0),
    "p2-disagree": lambda: LearnedMapActive(power=2.0, weight="disagreement"),
    # the control: a uniform sample per new model through the same path
    "ctl-uniform": lambda: LearnedMapActive(allocation="uniform"),
    # one design for every new model, from the known models' labels only
    "shared": lambda: LearnedMapActive(allocation="shared"),
    "shared-p1": lambda: LearnedMapActive(allocation="shared", power=1.0),
    "informative": lambda: LearnedMapActive(allocation="informative"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--embedder", default="static")
    ap.add_argument("--seed0", type=int, default=200)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--val-sizes", default="250,500")
    ap.add_argument("--variants", default="p2-iw,ctl-uniform,shared")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    ev.METHODS.update({v: VARIANTS[v] for v in variants})
    ds = load_dataset(args.dataset or default_dataset_path() or "data/mmlu_pro_27", with_responses=False)
    x = make_embedder(None if args.embedder == "minilm" else args.embedder).embed(ds.prompts)
    sizes = [int(v) for v in args.val_sizes.split(",")]
    methods = [ev.HEADLINE, *variants]
    out: dict[str, list[dict[str, float]]] = {}
    for seed in range(args.seed0, args.seed0 + args.trials):
        cache: dict[object, object] = {}
        for n in sizes:
            r = ev.run_trial(x, ds.scores, ds.model_costs, ds.models, seed, methods, val_size=n, cache=cache,
                             oracle=False)
            out.setdefault(str(n), []).append({m: r.metrics[m]["area"] for m in methods})
            print(seed, n, {m: round(r.metrics[m]["area"] - r.metrics[ev.HEADLINE]["area"], 4) for m in variants},
                  flush=True)
    print(f"\nseeds {args.seed0}–{args.seed0 + args.trials - 1}, {args.embedder}: variant Area − headline Area")
    print("| n | variant | paired mean ± s.e. | wins / losses / ties | p |")
    print("|---|---|---|---|---|")
    for size, rows in out.items():
        for v in variants:
            d = np.asarray([r[v] - r[ev.HEADLINE] for r in rows])
            t = ev.sign_test([r[v] for r in rows], [r[ev.HEADLINE] for r in rows])
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
            print(f"| {size} | {v} | {d.mean():+.4f} ± {se:.4f} | {t['wins']} / {t['losses']} / {t['ties']} | "
                  f"{t['p']:.2g} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
