"""What a running gateway serves for ``model: "auto"`` scores and costs what the evaluation says it will.

The repository's benchmark (data/mmlu_pro_27) is split by prompt: 70 % fit the router (``uniroute
router fit`` with the default static embedder, as ``make demo`` fits it), 30 % are held out. The
evaluation's side is what ``uniroute eval`` computes in each trial: the estimators fitted on the same
task, and their deferral curve (``RouterEstimator.curve``) on the whole held-out split, at three λ.
The served side is a real ``uniroute serve`` (replay upstream, LiteLLM, the artifact) sent a random
sample of the held-out prompts at each λ (``x-uniroute-lambda``); what was served is scored with the
benchmark's recorded score of the model that answered, and costed with its normalised router cost.
The realised means must match the curve within sampling error (three standard errors of a sample
mean), and the served model must be the estimator's choice for (nearly) every prompt.
"""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.cli.main import main as cli
from routing.artifact import RouterArtifact, deployment_task, fit_estimators
from routing.dataset import BenchmarkDataset, load_dataset, write_dataset
from routing.decision import normalise
from routing.embedder import make_embedder
from tests.procs import free_port, replay_upstream, running, server_env

pytestmark = pytest.mark.slow

SEED = 7
HELD_OUT = 0.3
N_SAMPLE = 300  # held-out prompts sent through the gateway per λ
LAMS = (0.02, 0.3, 3.0)  # the accurate end, the middle and the cheap end of the curve on this benchmark
VAL_SIZE = 500


def _subset(ds: BenchmarkDataset, idx: np.ndarray, path: Path) -> Path:
    return write_dataset(path, prompt_ids=[ds.prompt_ids[i] for i in idx], prompts=[ds.prompts[i] for i in idx],
                         models=ds.models, model_costs=ds.model_costs.tolist(), scores=ds.scores[idx],
                         categories=[ds.categories[i] for i in idx], answers=[ds.answers[i] for i in idx],
                         description="the fitting part of data/mmlu_pro_27 (tests/test_served_quality.py)")


async def _send(base: str, prompts: list[str], lam: float) -> list[str]:
    sem = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        async def one(prompt: str) -> str:
            async with sem:
                r = await client.post("/chat/completions", headers={"x-uniroute-lambda": str(lam)},
                                      json={"model": "auto", "messages": [{"role": "user", "content": prompt}]})
                assert r.status_code == 200, r.text
                return str(r.json()["model"])
        return list(await asyncio.gather(*(one(p) for p in prompts)))


def test_auto_serves_the_evaluated_quality_and_cost(shared_dataset: Path, tmp_path: Path) -> None:
    ds = load_dataset(shared_dataset)
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(ds.n_prompts)
    n_held = int(HELD_OUT * ds.n_prompts)
    held, fit = np.sort(perm[:n_held]), np.sort(perm[n_held:])
    fit_dir = _subset(ds, fit, tmp_path / "fit-data")
    out = tmp_path / "artifact"
    assert cli(["router", "fit", "--dataset", str(fit_dir), "--out", str(out), "--embedder", "static",
                "--val-size", str(VAL_SIZE), "--seed", str(SEED)]) == 0
    artifact = RouterArtifact.load(out)
    assert artifact.embedder_path is not None

    # the evaluation's side: the estimators on the same task; their curve on the whole held-out split
    embedder = make_embedder(artifact.embedder_path)
    x_fit = embedder.embed([ds.prompts[i] for i in fit])
    task, _, _ = deployment_task(x_fit, ds.scores[fit], ds.model_costs, ds.models, val_size=VAL_SIZE, seed=SEED)
    _, learnedmap = fit_estimators(task, k=artifact.k)
    x_held = embedder.embed([ds.prompts[i] for i in held])
    curve_cost, curve_score = learnedmap.curve(x_held, ds.scores[held], ds.model_costs, np.asarray(LAMS),
                                               names=ds.models)
    costs = normalise(ds.model_costs)
    column = {m: j for j, m in enumerate(ds.models)}

    # the served side: a sample of the held-out prompts through a running gateway at each λ
    sample = rng.choice(len(held), size=N_SAMPLE, replace=False)
    prompts = [ds.prompts[held[i]] for i in sample]
    expected_errors = learnedmap.expected_error(x_held[sample])
    with replay_upstream(shared_dataset) as replay_base:
        port = free_port()
        cfg = tmp_path / "config.yaml"
        cfg.write_text(textwrap.dedent(f"""\
            server: {{host: 127.0.0.1, port: {port}}}
            database_url: sqlite:///{tmp_path / 'gw.db'}
            auth: {{mode: open}}
            router: {{policy: uniroute, variant: learnedmap, artifact: {out}, max_wait_ms: 0}}
            replay_models: {{dataset: {shared_dataset}, api_base: {replay_base}}}
            """))
        with running(["-m", "gateway.cli.main", "serve", "--config", str(cfg)],
                     f"http://127.0.0.1:{port}/health/readiness", env=server_env(), timeout_s=120):
            for i, lam in enumerate(LAMS):
                served = asyncio.run(_send(f"http://127.0.0.1:{port}/v1", prompts, lam))
                j = np.array([column[m] for m in served])
                score = ds.scores[held[sample], j]
                cost = costs[j]
                chosen = learnedmap.decide(expected_errors, ds.model_costs, lam, ds.models)[:, 0]
                agree = float(np.mean(chosen == j))
                assert agree >= 0.99, f"λ={lam}: the gateway served the estimator's choice for only {agree:.1%}"
                se_score = max(float(score.std(ddof=1)), 1e-3) / np.sqrt(N_SAMPLE)
                se_cost = max(float(cost.std(ddof=1)), 1e-3) / np.sqrt(N_SAMPLE)
                assert abs(score.mean() - curve_score[i]) <= 3 * se_score, (
                    f"λ={lam}: served mean score {score.mean():.4f}, the curve says {curve_score[i]:.4f} "
                    f"(3 SE = {3 * se_score:.4f})")
                assert abs(cost.mean() - curve_cost[i]) <= 3 * se_cost, (
                    f"λ={lam}: served mean cost {cost.mean():.4f}, the curve says {curve_cost[i]:.4f} "
                    f"(3 SE = {3 * se_cost:.4f})")
    # the three λ really are different operating points
    assert curve_cost[0] > curve_cost[1] > curve_cost[2]
