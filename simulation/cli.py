"""``uniroute simulate``: arguments and printing over :mod:`simulation.run` (docs/PACING.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from routing.dataset import default_dataset_path
from simulation.run import Burst, plot, simulate

ARTIFACT_ENV = "UNIROUTE_ROUTER_ARTIFACT"


def simulate_command(args: argparse.Namespace) -> int:
    dataset = args.dataset or default_dataset_path()
    if dataset is None:
        raise SystemExit("no dataset: pass --dataset DIR or set $UNIROUTE_DATASET")
    artifact = args.artifact or os.environ.get(ARTIFACT_ENV) or "var/router-static"
    if not (Path(artifact) / "artifact.json").is_file():
        raise SystemExit(f"--artifact {artifact!r}: no router artifact there (fit one with `uniroute router fit "
                         f"--dataset DIR --out {artifact} --embedder static`)")
    try:
        bursts = [Burst.parse(b) for b in args.burst]
        result = asyncio.run(simulate(dataset, artifact, budget_usd=args.budget, period=args.period,
                                      rate_per_hour=args.rate, bursts=bursts, seed=args.seed,
                                      start_lambda=args.start_lambda, database_url=args.database_url,
                                      progress=not args.quiet))
    except ValueError as exc:
        raise SystemExit(f"uniroute simulate: {exc}") from None
    s = result.summary()
    lo, hi = s["feasible_spend_usd"]
    print(f"\n{s['requests']} requests over one {s['period']} ({args.rate:g}/h"
          f"{', bursts ' + ' '.join(args.burst) if args.burst else ''}), budget ${s['budget_usd']:g}")
    print(f"  paced key:  spend ${s['spend_usd']:.4f} ({100 * s['spend_share_of_budget']:.1f}% of the budget), "
          f"{s['status_429']} x 429, mean score {100 * s['mean_score']:.2f} points, "
          f"λ {s['lambda_min']:.3g}..{s['lambda_max']:.3g} (median {s['lambda_median']:.3g})")
    if s["best_fixed_lambda"] is not None:
        print(f"  best fixed λ in hindsight with no more spend: λ={s['best_fixed_lambda']:.4g}, spend "
              f"${s['best_fixed_spend_usd']:.4f}, mean score {100 * s['best_fixed_mean_score']:.2f} points "
              f"(paced - fixed: {s['score_minus_best_fixed_points']:+.2f} points)")
    if s["fixed_frontier_at_same_spend"] is not None:
        print(f"  fixed-λ frontier interpolated to the paced spend: {100 * s['fixed_frontier_at_same_spend']:.2f} "
              "points")
    print(f"  spend this traffic can have at a fixed λ: ${lo:.4f} (cheapest) to ${hi:.4f} (most accurate); "
          f"{s['wall_seconds']:.1f} s")
    if args.plot:
        print(f"  plot: {plot(result, args.plot)}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(s, indent=1), encoding="utf-8")
    return 0
