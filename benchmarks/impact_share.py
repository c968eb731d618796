"""Impact report bar (issue 13, point 2): predicted vs realised traffic share of a removed-then-profiled model.

    PYTHONPATH=. nice -n 10 python benchmarks/impact_share.py [--models all|A,B] [--lambdas 0.03,0.1,0.3,1]

The benchmark (``$UNIROUTE_DATASET`` or data/mmlu_pro_27) is split by prompt with a seed: 70 % fit a router
as ``uniroute router fit --embedder static`` does (K=40, 500 validation prompts), 30 % are unseen by it. Of
the unseen prompts, 2,000 are the "recent traffic" (their most likely clusters are what the request log
holds) and 1,000 others are the held-out requests that come next.

For each model M: M is removed from the pool; it is then profiled on the validation prompts from its
recorded scores (what `uniroute profile` grades against the replay upstream), the impact report
(routing/impact.py) predicts its share of traffic at each λ from the recent traffic's cluster mix; the
realised share is the share of the 1,000 held-out requests the router (the gateway's decision,
routing/decision.py) sends to M in the pool with M. Prints the table and the largest error (the bar: 5 points).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import gateway  # noqa: F401  (offline environment)
from routing.artifact import fit_artifact
from routing.dataset import BenchmarkDataset, default_dataset_path, load_dataset
from routing.decision import Decider, expected_errors
from routing.embedder import make_embedder
from routing.impact import cluster_traffic, impact_report
from routing.policy import PoolModel


def measure(ds: BenchmarkDataset, x: np.ndarray, embedder_id: str, models: Sequence[str], lams: Sequence[float], *,
            traffic_n: int = 2000, held_out: int = 1000, seed: int = 7, k: int = 40,
            fit_share: float = 0.7) -> list[dict[str, Any]]:
    """Predicted and realised share per (model, λ): the router is fitted on ``fit_share`` of the prompts (split with
    ``seed``); of the rest, ``traffic_n`` are the recent traffic, the next ``held_out`` the requests to come."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(ds.n_prompts)
    n_fit = int(fit_share * ds.n_prompts)
    fit, unseen = np.sort(perm[:n_fit]), perm[n_fit:]
    if len(unseen) < traffic_n + held_out:
        raise ValueError(f"{len(unseen)} unseen prompts: fewer than traffic {traffic_n} + held-out {held_out}")
    traffic, held = unseen[:traffic_n], unseen[traffic_n: traffic_n + held_out]
    art, profiles = fit_artifact(x[fit], ds.scores[fit], ds.model_costs, ds.models,
                                 [ds.prompt_ids[i] for i in fit], [ds.prompts[i] for i in fit],
                                 embedder_id=embedder_id, training_set_hash="impact-bench", k=k, seed=seed)
    variant = art.variant
    z_val = art.membership(art.val_embeddings, variant)
    weights = cluster_traffic(art.membership(x[traffic], variant).argmax(axis=1).tolist(), art.k)
    z_held = art.membership(x[held], variant)
    psi = {p.model: p.psi for p in profiles if p.variant == variant}
    val_pos = {pid: i for i, pid in enumerate(ds.prompt_ids)}
    rows: list[dict[str, Any]] = []
    for name in models:
        j = ds.models.index(name)
        pool = [PoolModel(m, float(ds.model_costs[i]), psi[m]) for i, m in enumerate(ds.models) if m != name]
        scores = {pid: float(ds.scores[val_pos[pid], j]) for pid in art.val_prompt_ids}
        prof = art.profile_model(name, scores, cost=float(ds.model_costs[j]), variants=[variant])[0]
        cand = PoolModel(name, float(ds.model_costs[j]), prof.psi)
        rep = impact_report(z_val, pool, cand, weights, [("grid", lam) for lam in lams])
        full = [*pool, cand]
        decider = Decider([m.cost for m in full], [m.name for m in full])
        err = expected_errors(z_held, np.stack([np.asarray(m.psi) for m in full]))
        for li, lam in zip(rep.lambdas, lams, strict=True):
            realised = float(np.mean(decider.choose(err, lam) == len(pool)))
            rows.append({"model": name, "lambda": lam, "predicted": li.traffic_share, "realised": realised})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--models", default="all")
    ap.add_argument("--lambdas", default="0.03,0.1,0.3,1")
    ap.add_argument("--traffic", type=int, default=2000)
    ap.add_argument("--held-out", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = args.dataset or default_dataset_path()
    if path is None:
        raise SystemExit("no dataset: pass --dataset DIR or set $UNIROUTE_DATASET")
    ds = load_dataset(path, with_responses=False)
    emb = make_embedder("static")
    x = emb.embed(ds.prompts)
    lams = [float(v) for v in args.lambdas.split(",")]
    models = ds.models if args.models == "all" else args.models.split(",")
    rows = measure(ds, x, emb.id, models, lams, traffic_n=args.traffic, held_out=args.held_out, seed=args.seed)
    errs = np.array([abs(r["predicted"] - r["realised"]) for r in rows])
    print("| model | λ | predicted share | realised share (1,000 held-out) | error (points) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["predicted"] > 0.005 or r["realised"] > 0.005:
            print(f"| {r['model']} | {r['lambda']:g} | {100 * r['predicted']:.1f}% | {100 * r['realised']:.1f}% | "
                  f"{100 * abs(r['predicted'] - r['realised']):.1f} |")
    print(f"\n{len(rows)} (model, λ) pairs ({len(models)} models x {len(lams)} λ; rows where both shares are "
          f"< 0.5% not shown): largest error {100 * errs.max():.2f} points, mean {100 * errs.mean():.2f}; "
          f"within 5 points: {int((errs <= 0.05).sum())}/{len(rows)}; {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)
    return 0 if errs.max() <= 0.05 else 1


if __name__ == "__main__":
    raise SystemExit(main())
