"""The budget-pacing bar, on a reduced but real simulation (``uniroute simulate``, simulation/run.py).

One simulated day of traffic drawn from the repository's benchmark goes through the real chat service
(the artifact's UniRoute policy and embedder, the Forwarder, the replay server's app, the key authenticator,
budget guard and pacer on a real SQLite store), with steady and with bursty arrivals. The paced key must end
the day within ±5% of its budget, never get a 429, and score at least as well as the best fixed λ chosen in
hindsight for the same spend, minus 0.5 points. The full-size runs are in docs/PACING.md.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import numpy as np
import pytest

from routing.dataset import BenchmarkDataset, load_dataset
from simulation.run import Burst, fixed_lambda_frontier, plot, simulate

RATE = 16.0  # requests per simulated hour: ~400 requests a day (docs/PACING.md runs 100/h)


@pytest.fixture(scope="module")
def dataset(shared_dataset: Path) -> BenchmarkDataset:
    """The benchmark read once for the module's simulations (``simulate`` takes a loaded dataset too)."""
    return load_dataset(shared_dataset)


@pytest.mark.parametrize("bursts", [[], [Burst(0.2, 0.1, 4.0), Burst(0.6, 0.05, 6.0)]], ids=["steady", "bursty"])
def test_paced_spend_meets_the_budget_without_429_at_the_quality_of_the_best_fixed_lambda(
        dataset: BenchmarkDataset, shared_router_artifact: Path, bursts: list[Burst], tmp_path: Path) -> None:
    # the budget: a third of the way from the cheapest to the dearest spend this traffic can have at a fixed λ
    frontier = asyncio.run(fixed_lambda_frontier(dataset, shared_router_artifact, period="day", rate_per_hour=RATE,
                                                 bursts=bursts, seed=3))
    lo, hi = frontier["feasible_spend_usd"]
    budget = lo + (hi - lo) / 3
    r = asyncio.run(simulate(dataset, shared_router_artifact, budget_usd=budget, period="day", rate_per_hour=RATE,
                             bursts=bursts, seed=3))
    # the frontier was drawn on the very requests the paced key sent: the run's own reference agrees
    assert r.hindsight["feasible_spend_usd"] == [lo, hi]
    assert r.hindsight["grid_spend_usd"] == frontier["grid_spend_usd"]
    s = r.summary()
    assert r.refused_429 == 0 and s["errors"] == 0
    assert abs(r.spend - budget) <= 0.05 * budget, s
    assert s["best_fixed_mean_score"] is not None
    assert s["score_minus_best_fixed_points"] >= -0.5, s
    assert r.lam.max() > r.lam.min()  # λ was paced, not left at the key's default
    assert np.all(r.lam == np.clip(r.lam, 0.0, 100.0))
    assert plot(r, tmp_path / "pace.png").stat().st_size > 10_000


def test_the_cli_prints_plots_and_writes_the_period(shared_dataset: Path, shared_router_artifact: Path,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``uniroute simulate`` with its flags: the summary printed, the PNG and the JSON written; bad flags are one
    message naming the flag, not a traceback."""
    from gateway.cli.main import main as cli

    png, out_json = tmp_path / "pace.png", tmp_path / "out" / "pace.json"
    args = ["simulate", "--dataset", str(shared_dataset), "--artifact", str(shared_router_artifact),
            "--budget", "0.01", "--period", "day", "--rate", "4", "--seed", "1", "--quiet"]
    assert cli([*args, "--burst", "0.5:0.1:5", "--plot", str(png), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    s = json.loads(out_json.read_text())
    assert s["requests"] > 50 and s["budget_usd"] == 0.01 and s["period"] == "day"
    assert f"{s['requests']} requests over one day (4/h, bursts 0.5:0.1:5), budget $0.01" in out
    assert f"paced key:  spend ${s['spend_usd']:.4f}" in out and f"{s['status_429']} x 429" in out
    assert "best fixed λ in hindsight" in out and f"plot: {png}" in out
    assert png.stat().st_size > 10_000
    for extra, message in ((["--burst", "0.9:0.2:2"], "need 0 <= START < 1, 0 < LENGTH <= 1 - START"),
                           (["--burst", "soon"], "expected START:LENGTH:FACTOR"),
                           (["--rate", "0"], "--rate must be > 0"),
                           (["--budget", "-1"], "--budget must be a positive number")):
        with pytest.raises(SystemExit, match=re.escape(message)):
            cli([*args, *extra])
    with pytest.raises(SystemExit, match="no router artifact there"):
        cli(["simulate", "--dataset", str(shared_dataset), "--artifact", str(tmp_path / "none"),
             "--budget", "1", "--rate", "4"])
