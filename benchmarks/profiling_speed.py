"""Profiling speed benchmark (issue 5): `uniroute profile` on 500 validation prompts against the replay upstream.

    python -m benchmarks.profiling_speed [--dataset DIR] [--model NAME] [--val-size 500]
                                                       [--concurrency 16]

Fits a router without MODEL (``router fit --exclude-models``), starts ``uniroute replay`` on a
free loopback port, registers MODEL with ``uniroute models add`` and times ``uniroute profile
MODEL`` end to end (a fresh process: config, artifact and LiteLLM load included), as an operator
runs it. Default dataset: ``$UNIROUTE_DATASET`` or the repository's ``data/mmlu_pro_27``, else a generated one.
Prints the profiling report (it includes the CLI's own wall time) and the end-to-end seconds.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.overhead import free_port

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--model", default=None, help="the model to onboard (default: the dataset's cheapest)")
    ap.add_argument("--val-size", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_OFFLINE_MODE": "true", "HF_HUB_OFFLINE": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="uniroute-profbench-"))
    from routing.dataset import default_dataset_path

    dataset = Path(args.dataset) if args.dataset else default_dataset_path()
    if dataset is None or not (dataset / "models.csv").is_file():
        from routing.synthetic import make_synthetic_dataset

        dataset = make_synthetic_dataset(tmp / "dataset", n_prompts=args.val_size + 500)
    with open(dataset / "models.csv", encoding="utf-8", newline="") as fh:
        costs = {r["model"]: float(r["cost"]) for r in csv.DictReader(fh)}
    model = args.model or min(costs, key=lambda m: costs[m])
    cli = [sys.executable, "-m", "gateway.cli.main"]
    subprocess.run([*cli, "router", "fit", "--dataset", str(dataset), "--out", str(tmp / "artifact"),
                    "--exclude-models", model, "--val-size", str(args.val_size)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    port = free_port()
    replay = subprocess.Popen([*cli, "replay", "--dataset", str(dataset), "--port", str(port)], env=env)
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        cfg = tmp / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "database_url": f"sqlite:///{tmp / 'bench.db'}",
            "router": {"policy": "uniroute", "artifact": str(tmp / "artifact")},
            "profiling": {"concurrency": args.concurrency, "min_graded_per_cluster": 0},
        }))
        subprocess.run([*cli, "models", "add", model, "--litellm-model", f"openai/{model}", "--api-base",
                        f"http://127.0.0.1:{port}/v1", "--api-key", "replay", "--router-cost", str(costs[model]),
                        "--input-cost-per-1m", str(costs[model] * 0.01), "--output-cost-per-1m", str(costs[model] * 0.01),
                        "--config", str(cfg)], env=env, check=True, stdout=subprocess.DEVNULL)
        t0 = time.perf_counter()
        out = subprocess.run([*cli, "profile", model, "--activate", "--config", str(cfg), "--json"], env=env, check=True,
                             capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        replay.terminate()
        replay.wait(timeout=10)
    print(out.stdout)
    print(f"dataset {dataset.name}, model {model}, {args.val_size} prompts, concurrency {args.concurrency}: "
          f"`uniroute profile` took {wall:.2f} s end to end (process start included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
