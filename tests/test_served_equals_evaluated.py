"""What is measured is what is served (issue #11, point 4).

``uniroute router fit`` (the real command) writes an artifact from a routing benchmark; the
gateway loads it as it does at start-up (``gateway.router.build_router`` with a config, the
registry with the artifact's profiles, the prompts embedded through the gateway's micro-batcher)
and ranks 1,200 new prompts with ``UniRoutePolicy.rank`` at five λ. The evaluation's estimators,
fitted on the same task, rank the same prompts with ``expected_error`` and ``decide``. For both
variants (K-means, LearnedMap), every prompt and every λ, the chosen model and the whole
fallback order must be the same.

The pool has two pairs of twins (identical outcomes, hence identical Ψ): ``math-expert-b`` /
``math-expert-a`` at the same cost, listed in reverse name order (the name decides), and
``bio-expert`` / ``bio-expert-lite``, where the cheaper one sorts second by name (at λ = 0 the
cost decides). Their ties are exact, so if either side changes the tie-break (pool position,
name only, a nudge) or z(x), the decisions differ and this test fails.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from gateway.cli.main import main as cli
from gateway.config import load_config
from gateway.serving.registry import Registry, with_profiles
from gateway.serving.router import RouterBundle, build_router
from routing.artifact import RouterArtifact, UniRoutePolicy, deployment_task, fit_estimators
from routing.calibration import expected_cost
from routing.dataset import load_dataset, write_dataset
from routing.decision import normalise
from routing.embedder import make_embedder
from routing.estimators import LearnedMap, RoutingTask, UniRouteKMeans
from routing.policy import PoolModel
from routing.synthetic import make_prompts
from tests.static_model import make_tiny_static

N_PROMPTS, N_VAL, N_TEST = 1200, 400, 1200
LAMS = (0.0, 0.02, 0.08, 0.3, 1.5)
SEED = 0
#: dataset order (= registry order): the math twins in reverse name order, the dearer bio twin first
MODELS: dict[str, tuple[float, dict[str, float] | str]] = {  # name → (cost, accuracy per topic | twin of)
    "small-general": (1.0, {"math": 0.45, "biology": 0.45, "law": 0.5, "history": 0.5}),
    "math-expert-b": (2.0, {"math": 0.95, "biology": 0.2, "law": 0.25, "history": 0.3}),
    "math-expert-a": (2.0, "math-expert-b"),
    "bio-expert": (3.0, {"math": 0.2, "biology": 0.95, "law": 0.35, "history": 0.3}),
    "bio-expert-lite": (2.0, "bio-expert"),
    "law-expert": (4.0, {"math": 0.3, "biology": 0.3, "law": 0.9, "history": 0.6}),
    "large-general": (20.0, {"math": 0.85, "biology": 0.85, "law": 0.85, "history": 0.85}),
}


def _dataset(path: Path) -> Path:
    prompts, cats, answers = make_prompts(N_PROMPTS, seed=SEED)
    rng = np.random.default_rng(SEED + 1)
    partial = rng.random(N_PROMPTS) < 0.15  # partial credit: fractional scores, rounding matters
    scores = np.zeros((N_PROMPTS, len(MODELS)))
    for j, (_, spec) in enumerate(MODELS.values()):
        if isinstance(spec, str):
            scores[:, j] = scores[:, list(MODELS).index(spec)]
            continue
        right = rng.random(N_PROMPTS) < np.array([spec[c] for c in cats])
        scores[:, j] = np.where(partial, np.where(right, 0.6, 0.3), right.astype(float))
    return write_dataset(path, prompt_ids=[f"p{i}" for i in range(N_PROMPTS)], prompts=prompts,
                         models=list(MODELS), model_costs=[c for c, _ in MODELS.values()], scores=scores,
                         categories=cats, answers=answers, description="served-equals-evaluated test data")


@dataclass
class Served:
    """What the gateway built from the artifact, per variant."""

    policy: UniRoutePolicy
    pool: tuple[PoolModel, ...]
    embeddings: list[np.ndarray]  # the test prompts, embedded by the gateway's batcher


@dataclass
class Setup:
    artifact: RouterArtifact
    task: RoutingTask
    estimators: dict[str, UniRouteKMeans | LearnedMap]
    x_test: np.ndarray  # the test prompts, embedded in one batch (as the evaluation embeds)
    served: dict[str, Served]


async def _serve(config_path: Path, texts: list[str]) -> tuple[RouterBundle, Registry, list[np.ndarray]]:
    """The gateway's start-up (app.py's lifespan, up to the registry) and its per-request embedding."""
    config = load_config(config_path)
    bundle = await build_router(config, warm_up=False)
    registry = Registry.from_config(config)
    if bundle.profiles:
        registry.replace(with_profiles(registry.snapshot.entries, bundle.profiles))
    embed = bundle.embed
    assert embed is not None
    embeddings = list(await asyncio.gather(*(embed(t) for t in texts)))
    await bundle.aclose()
    return bundle, registry, embeddings


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("served")
    static = make_tiny_static(root / "static", dim=24)
    data = _dataset(root / "data")
    out = root / "artifact"
    cache = root / "cache"
    assert cli(["router", "fit", "--dataset", str(data), "--out", str(out), "--k", "auto",
                "--val-size", str(N_VAL), "--seed", str(SEED), "--embedder", str(static),
                "--cache-dir", str(cache)]) == 0
    artifact = RouterArtifact.load(out)

    # the evaluation's side: the same estimators on the same task, the prompts embedded in one batch
    ds = load_dataset(data, with_responses=False)
    embedder = make_embedder(str(static), cache_dir=cache)
    task, _, _ = deployment_task(embedder.embed(ds.prompts), ds.scores, ds.model_costs, ds.models,
                                 val_size=N_VAL, seed=SEED)
    km, lm = fit_estimators(task, k="auto")
    test_texts = make_prompts(N_TEST, seed=SEED + 100)[0]
    x_test = embedder.embed(test_texts)

    # the gateway's side: a config per variant, loaded as `uniroute serve` loads it
    served: dict[str, Served] = {}
    for variant in ("kmeans", "learnedmap"):
        cfg: dict[str, Any] = {
            "database_url": f"sqlite:///{root / 'gw.db'}",
            "router": {"policy": "uniroute", "variant": variant, "artifact": str(out),
                       "embed_cache_dir": str(cache)},
            "replay_models": {"dataset": str(data), "api_base": "http://127.0.0.1:9/v1"},
        }
        path = root / f"config-{variant}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        bundle, registry, embeddings = asyncio.run(_serve(path, test_texts))
        assert isinstance(bundle.policy, UniRoutePolicy) and bundle.policy.variant == variant
        served[variant] = Served(bundle.policy, registry.pool(), embeddings)
    return Setup(artifact, task, {"kmeans": km, "learnedmap": lm}, x_test, served)


def test_the_artifact_holds_the_estimators(setup: Setup) -> None:
    """`router fit` wrote exactly the estimators' clusters, θ and Ψ, and the gateway loaded them."""
    art, km, lm = setup.artifact, setup.estimators["kmeans"], setup.estimators["learnedmap"]
    assert isinstance(km, UniRouteKMeans) and isinstance(lm, LearnedMap)
    assert art.k == km.k_ and np.array_equal(art.centroids, km.centroids_)
    assert art.theta is not None and np.array_equal(art.theta, lm.theta_)
    for variant, est in setup.estimators.items():
        pool = {m.name: m for m in setup.served[variant].pool}
        assert set(pool) == set(MODELS)
        for j, name in enumerate(setup.task.pool_names):
            psi = pool[name].psi
            assert psi is not None and np.array_equal(psi, np.asarray(est.psi_)[j]), (variant, name)
            assert pool[name].cost == setup.task.pool_costs[j]
        # the twins' profiles tie exactly, or the tie-break would never be exercised
        psi_of = {name: np.asarray(m.psi) for name, m in pool.items()}
        assert np.array_equal(psi_of["math-expert-a"], psi_of["math-expert-b"])
        assert np.array_equal(psi_of["bio-expert"], psi_of["bio-expert-lite"])
    # the gateway's embeddings of the test prompts are the evaluation's
    assert np.array_equal(np.stack(setup.served["kmeans"].embeddings), setup.x_test)


def test_onboarding_a_model_reproduces_its_fitted_profile(setup: Setup) -> None:
    """Profiling a model alone on the artifact's validation prompts (as `uniroute profile` does) gives
    the Ψ the fit gave it, bit for bit."""
    art, task = setup.artifact, setup.task
    for j, name in enumerate(task.pool_names):
        scores = dict(zip(art.val_prompt_ids, task.val_scores[:, j].tolist(), strict=True))
        for prof in art.profile_model(name, scores):
            assert np.array_equal(prof.psi, np.asarray(setup.estimators[prof.variant].psi_)[j]), (prof.variant, name)


@pytest.mark.parametrize("variant", ["kmeans", "learnedmap"])
def test_the_gateway_chooses_what_the_estimator_decides(setup: Setup, variant: str) -> None:
    est, served, task = setup.estimators[variant], setup.served[variant], setup.task
    errors = est.expected_error(setup.x_test)  # (n, m), evaluation's batch
    clusters = est.membership(setup.x_test).argmax(axis=1)
    reordered = tuple(reversed(served.pool))  # the gateway's ranking may not depend on the registry order
    mismatches: list[str] = []
    chosen: set[str] = set()
    ties_at_the_top = {"name": 0, "cost": 0}
    for lam in LAMS:
        ranking = est.decide(errors, task.pool_costs, lam, task.pool_names)  # (n, m), best first
        for i, vec in enumerate(served.embeddings):
            decision = served.policy.rank(vec, served.pool, lam)
            evaluated = [task.pool_names[j] for j in ranking[i]]
            got = [c.model for c in decision.ranked]
            if got != evaluated or decision.cluster != clusters[i]:
                mismatches.append(f"λ={lam} prompt {i}: served {got[:3]} (cluster {decision.cluster}), "
                                  f"evaluated {evaluated[:3]} (cluster {clusters[i]})")
            elif [c.model for c in served.policy.rank(vec, reordered, lam).ranked] != got:
                mismatches.append(f"λ={lam} prompt {i}: the reversed registry ranks differently")
            by_name = {c.model: c for c in decision.ranked}
            for j, name in enumerate(task.pool_names):
                assert by_name[name].expected_error == pytest.approx(errors[i, j], rel=1e-12, abs=1e-15)
            top, second = decision.ranked[0], decision.ranked[1]
            if top.objective == second.objective:
                ties_at_the_top["name" if top.cost == second.cost else "cost"] += 1
            chosen.add(decision.chosen.model)
    assert not mismatches, f"{len(mismatches)} of {len(LAMS) * len(served.embeddings)} decisions differ, " \
                           f"e.g. {mismatches[:5]}"
    # the comparison covered several choices and exact ties decided by the name and by the cost
    assert len(chosen) >= 4, chosen
    assert ties_at_the_top["name"] > 0 and ties_at_the_top["cost"] > 0, ties_at_the_top
    assert "math-expert-b" not in chosen and "bio-expert-lite" in chosen


@pytest.mark.parametrize("variant", ["kmeans", "learnedmap"])
def test_calibration_decides_as_the_estimator(setup: Setup, variant: str) -> None:
    """The λ calibration (the gateway's default λ) costs the validation prompts with the same decisions."""
    est, art, task = setup.estimators[variant], setup.artifact, setup.task
    z = art.membership(art.val_embeddings, variant)
    pool = list(setup.served[variant].pool)
    c = normalise(task.pool_costs)
    for lam in LAMS:
        choice = est.decide(est.expected_error(task.x_val), task.pool_costs, lam, task.pool_names)[:, 0]
        cost, _ = expected_cost(z, pool, lam)
        assert cost == pytest.approx(float(c[choice].mean()), rel=1e-12)
