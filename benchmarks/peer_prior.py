"""The peer prior of Ψ (issue 15, point 4): paired comparisons from `uniroute eval --json`, and how far each
prior's Ψ is from the new models' Ψ on their many training-prompt labels.

    # paired: each method against the first (mean Area difference ± s.e., sign test with ties within 1e-4),
    # and each method's Area at every n minus its own Area at the largest n
    PYTHONPATH=. python benchmarks/peer_prior.py paired out.json [more.json ...] \
        --methods uniroute-learnedmap,uniroute-learnedmap-peer,uniroute-learnedmap-peer-similarity

    # Ψ error: soft K-means (τ = 0.1, θ's starting map) at fixed K; per prior and m, the traffic-weighted squared
    # error of the test LLMs' Ψ from n validation labels against their Ψ from the ~6,000 training prompts,
    # absolute and model-relative (each cluster's mean over the test LLMs and each model's mean removed: the
    # part that ranks models differently per cluster, which is what routing uses)
    PYTHONPATH=. nice -n 10 python benchmarks/peer_prior.py psi-error --embedder static --seed0 200 --trials 10 --k 20

    # LearnedMap with m fixed (K still chosen by the selection), flat and peer prior, as `uniroute eval` runs
    # its trials (routing.evaluation.evaluate_sizes; the same splits, θ and per-trial JSON layout): does a
    # strong peer prior, which the Ψ error favours, route better than the m the selection picks?
    PYTHONPATH=. nice -n 10 python benchmarks/peer_prior.py fixed-m --embedder static --seed0 200 --trials 20 \
        --val-sizes 250,500,1000 --m 32 --json out.json

Several JSON files of the same seeds and sizes are merged per trial (methods run separately).
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

import gateway  # noqa: F401  (offline environment)
from routing.dataset import BenchmarkDataset
from routing.evaluation import TIE_TOL, sign_test


def _per_trial(paths: Sequence[str]) -> dict[int, dict[int, dict[str, float]]]:
    """size → seed → method → Area."""
    out: dict[int, dict[int, dict[str, float]]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        per = doc["per_trial"]
        groups = per.items() if isinstance(per, dict) else [(str(doc["val_size"]), per)]
        for size, rows in groups:
            for r in rows:
                areas = {m: v["area"] for m, v in r["metrics"].items()}
                out.setdefault(int(size), {}).setdefault(int(r["seed"]), {}).update(areas)
    return out


def paired(paths: Sequence[str], methods: Sequence[str]) -> None:
    data = _per_trial(paths)
    base = methods[0]
    largest = max(data)
    for size in sorted(data):
        seeds = sorted(data[size])
        print(f"n = {size} ({len(seeds)} trials)")
        a = np.array([data[size][s][base] for s in seeds])
        for m in methods:
            b = np.array([data[size][s][m] for s in seeds])
            line = f"  {m:40s} Area {b.mean():.4f}"
            if m != base:
                d = b - a
                t = sign_test(b.tolist(), a.tolist())
                line += (f"   − {base}: {d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f}, "
                         f"{t['wins']}/{t['losses']}/{t['ties']} (p = {t['p']:.2g})")
            top = np.array([data[largest][s][m] for s in seeds])
            g = b - top
            line += f"   − own n = {largest}: {g.mean():+.4f} ± {g.std(ddof=1) / np.sqrt(len(g)):.4f}"
            print(line)
    print(f"(ties: |difference| ≤ {TIE_TOL:g})")


def _embedded(embedder: str) -> tuple[BenchmarkDataset, np.ndarray]:
    """The dataset (``$UNIROUTE_DATASET``, else data/mmlu_pro_27) and its prompts' embeddings (``minilm``: MiniLM)."""
    from routing.dataset import default_dataset_path, load_dataset
    from routing.embedder import make_embedder

    ds = load_dataset(default_dataset_path() or "data/mmlu_pro_27", with_responses=False)
    return ds, make_embedder(None if embedder == "minilm" else embedder).embed(ds.prompts)


def psi_error(embedder: str, seed0: int, trials: int, k: int, sizes: Sequence[int]) -> None:
    from routing.clusters import ClusterMap
    from routing.evaluation import split_trial, validation_subset
    from routing.profiles import (
        PEER_PSI_STRENGTH,
        cluster_difficulty,
        peer_prior_offsets,
        shrunk_cluster_errors,
    )

    ds, x = _embedded(embedder)
    ms = (0.5, 2.0, 8.0, 32.0, 128.0, 512.0)
    priors = ("flat", "difficulty", "peer", "peer-similarity")
    err: dict[tuple[int, str, float, str], list[float]] = {}
    for seed in range(seed0, seed0 + trials):
        tr, va_all, _, mtr, mte = split_trial(len(x), len(ds.models), seed)
        cm = ClusterMap(k, random_state=seed).fit(x[tr])
        w_tr = cm.weights(x[tr], 0.1)
        e_tr = 1.0 - ds.scores[np.ix_(tr, mtr)]
        truth, _ = shrunk_cluster_errors(w_tr, 1.0 - ds.scores[np.ix_(tr, mte)], 1.0)
        peer_psi, _ = shrunk_cluster_errors(w_tr, e_tr, PEER_PSI_STRENGTH)
        for n in sizes:
            va = validation_subset(va_all, seed, n)
            w_va = cm.weights(x[va], 0.1)
            e, e_peers = 1.0 - ds.scores[np.ix_(va, mte)], 1.0 - ds.scores[np.ix_(va, mtr)]
            freq = w_va.sum(axis=0) / w_va.sum()
            deltas: dict[str, Any] = {
                "flat": None, "difficulty": cluster_difficulty(w_tr, e_tr),
                "peer": peer_prior_offsets(e, e_peers, peer_psi),
                "peer-similarity": peer_prior_offsets(e, e_peers, peer_psi, method="similarity")}
            for prior in priors:
                for m in ms:
                    psi, _ = shrunk_cluster_errors(w_va, e, m, deltas[prior])
                    d = psi - truth
                    rel = d - d.mean(axis=0) - (d - d.mean(axis=0)).mean(axis=1, keepdims=True)
                    err.setdefault((n, prior, m, "abs"), []).append(float(((d ** 2) @ freq).mean()))
                    err.setdefault((n, prior, m, "rel"), []).append(float(((rel ** 2) @ freq).mean()))
    print(f"K = {k}, seeds {seed0}–{seed0 + trials - 1}; mean squared error ×1e4 at m = {', '.join(map(str, ms))}")
    for n in sizes:
        for kind in ("abs", "rel"):
            print(f"n = {n}, {'absolute' if kind == 'abs' else 'model-relative'}")
            for prior in priors:
                print(f"  {prior:16s}" + "".join(f"{1e4 * np.mean(err[(n, prior, m, kind)]):8.2f}" for m in ms))


def fixed_m(embedder: str, seed0: int, trials: int, sizes: Sequence[int], m: float, out: str) -> None:
    from routing import evaluation as ev
    from routing.estimators import LearnedMap

    ds, x = _embedded(embedder)
    names = []
    for prior in ("flat", "peer"):
        name = f"uniroute-learnedmap-{prior}-m{m:g}"
        ev.METHODS[name] = functools.partial(LearnedMap, prior_strength=m, prior=prior)
        names.append(name)
    by_size, _ = ev.evaluate_sizes(x, ds.scores, ds.model_costs, ds.models, val_sizes=sizes, trials=trials,
                                   seed0=seed0, methods=names)
    doc = {"per_trial": {str(n): [{"seed": r.seed, "metrics": r.metrics,
                                   "info": {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.info.items()}}
                                  for r in rows] for n, rows in by_size.items()}}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=float)
    paired([out], names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("paired")
    p.add_argument("json", nargs="+")
    p.add_argument("--methods", required=True, help="comma-separated; the first is the reference")
    q = sub.add_parser("psi-error")
    q.add_argument("--embedder", default="static", help="'static' or 'minilm'")
    q.add_argument("--seed0", type=int, default=200)
    q.add_argument("--trials", type=int, default=10)
    q.add_argument("--k", type=int, default=20)
    q.add_argument("--val-sizes", default="250,1000")
    r = sub.add_parser("fixed-m")
    r.add_argument("--embedder", default="static", help="'static' or 'minilm'")
    r.add_argument("--seed0", type=int, default=200)
    r.add_argument("--trials", type=int, default=20)
    r.add_argument("--val-sizes", default="250,500,1000")
    r.add_argument("--m", type=float, default=32.0)
    r.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.cmd == "paired":
        paired(args.json, args.methods.split(","))
    elif args.cmd == "fixed-m":
        fixed_m(args.embedder, args.seed0, args.trials, [int(v) for v in args.val_sizes.split(",")], args.m, args.json)
    else:
        psi_error(args.embedder, args.seed0, args.trials, args.k, [int(v) for v in args.val_sizes.split(",")])


if __name__ == "__main__":
    main()
