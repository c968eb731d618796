"""Profiling a registered model: resumable outcomes in SQL, activation only with enough graded answers per cluster."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from gateway.config import parse_config
from gateway.errors import NotFoundError, UpstreamError
from gateway.spec import parse_spec
from gateway.store import models as catalog
from gateway.store.engine import Store
from profiling.profiler import SqlOutcomeStore, run_profiling, validation_prompts
from routing.artifact import RouterArtifact

N = 12


def _artifact(n: int = N) -> RouterArtifact:
    emb = np.array([[1.0, 0.0] if i % 2 == 0 else [0.0, 1.0] for i in range(n)])
    return RouterArtifact(embedder_id="test", k=2, centroids=np.eye(2), theta=None,
                          val_prompt_ids=[f"p{i}" for i in range(n)], val_prompts=[f"question {i}" for i in range(n)],
                          val_embeddings=emb, training_set_hash="h", variant="kmeans",
                          val_answers=["A" if i % 3 else "B" for i in range(n)])


class FakeForwarder:
    """Answers 'The answer is (A).'; fails every prompt in ``failing`` (a set of prompt texts)."""

    def __init__(self, failing: set[str] | None = None) -> None:
        self.failing = failing or set()
        self.calls = 0

    async def complete(self, candidates: list[Any], messages: list[dict[str, Any]], params: dict[str, Any]) -> Any:
        self.calls += 1
        if messages[-1]["content"] in self.failing:
            raise UpstreamError("model 'new' failed: boom")
        msg = SimpleNamespace(content="7" if candidates[0].name == "judge" else "The answer is (A).")
        return SimpleNamespace(response=SimpleNamespace(choices=[SimpleNamespace(message=msg)]), cost_usd=0.001)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'p.db'}")
    s.upgrade()
    catalog.add_model(s, parse_spec({"name": "new", "router_cost": 1.0, "routable": False,
                                             "litellm_params": {"model": "openai/new"}}))
    return s


def _config(min_per_cluster: int) -> Any:
    return parse_config({"router": {"policy": "cheapest", "variant": "kmeans"},
                         "profiling": {"min_graded_per_cluster": min_per_cluster, "attempts": 2}})


async def test_profiles_and_activates(store: Store) -> None:
    art = _artifact()
    fwd = FakeForwarder()
    res = await run_profiling(_config(3), store, fwd, "new", artifact=art, activate=True)
    assert res.activated and not res.partial and res.report.graded == N
    assert res.graded_per_cluster == [6, 6] and abs(res.report.cost_usd - 0.012) < 1e-9
    scores = {pid: 1.0 if ans == "A" else 0.0 for pid, ans in zip(art.val_prompt_ids, art.val_answers or [],
                                                                       strict=True)}
    expected = art.profile_model("new", scores, variants=["kmeans"])[0].psi
    active = catalog.active_profiles(store, catalog.profile_key(art.version, "kmeans"))
    assert np.allclose(active["new"].psi, expected) and active["new"].source == "validation"
    assert catalog.spec_from_row(catalog.get_model(store, "new")).routable
    # resumable: a second run asks nothing again
    again = await run_profiling(_config(3), store, fwd, "new", artifact=art, activate=True)
    assert fwd.calls == N and again.report.skipped == N


async def test_failures_block_activation_unless_partial(store: Store) -> None:
    art = _artifact()
    odd = {f"question {i}" for i in range(N) if i % 2 == 1}  # every prompt of cluster 1 fails
    res = await run_profiling(_config(1), store, FakeForwarder(odd), "new", artifact=art, activate=True)
    assert not res.activated and res.short_clusters == [1] and res.report.failed == N // 2
    assert any("boom" in e for e in res.report.errors) and "not activated" in res.message
    assert catalog.active_profiles(store, catalog.profile_key(art.version, "kmeans")) == {}
    assert not catalog.spec_from_row(catalog.get_model(store, "new")).routable
    outcomes = SqlOutcomeStore(store, art.version).outcomes("new")
    assert sum(o.score is None for o in outcomes) == N // 2  # failures are recorded
    res = await run_profiling(_config(1), store, FakeForwarder(odd), "new", artifact=art, allow_partial=True,
                              activate=True)
    assert res.activated and res.partial and "PARTIAL" in res.message
    assert catalog.active_profiles(store, catalog.profile_key(art.version, "kmeans"))["new"].source == \
        "validation-partial"


async def test_a_model_that_rejects_every_call_is_given_up_on(store: Store) -> None:
    art = _artifact(100)
    fwd = FakeForwarder({f"question {i}" for i in range(100)})
    res = await run_profiling(_config(1), store, fwd, "new", artifact=art, concurrency=4, allow_partial=True,
                              activate=True)
    assert not res.activated and res.report.graded == 0 and 20 <= res.report.failed < 100
    assert fwd.calls < 100 and res.report.stopped and "boom" in res.report.stopped
    assert "not activated" in res.message and "first 20 answers all failed" in res.message
    assert res.as_dict()["stopped"] == res.report.stopped
    assert catalog.active_profiles(store, catalog.profile_key(art.version, "kmeans")) == {}
    assert len(SqlOutcomeStore(store, art.version).outcomes("new")) == res.report.failed


async def test_unknown_model_and_missing_answers(store: Store) -> None:
    art = _artifact()
    with pytest.raises(NotFoundError, match="unknown model 'ghost'; known: new"):
        await run_profiling(_config(1), store, FakeForwarder(), "ghost", artifact=art)
    art.val_answers = None
    with pytest.raises(Exception, match="no reference answers"):
        validation_prompts(art, "kmeans")
    assert len(validation_prompts(art, "kmeans", {"p0": "A"})) == N


async def test_judge_grader_asks_the_configured_judge_model(store: Store) -> None:
    catalog.add_model(store, parse_spec({"name": "judge", "router_cost": 1.0,
                                                 "litellm_params": {"model": "openai/judge"}}))
    cfg = parse_config({"router": {"variant": "kmeans"},
                        "profiling": {"min_graded_per_cluster": 1, "judge_model": "judge"}})
    fwd = FakeForwarder()
    res = await run_profiling(cfg, store, fwd, "new", artifact=_artifact(), grader="judge", activate=True)
    assert res.activated and fwd.calls == 2 * N
    active = catalog.active_profiles(store, catalog.profile_key(_artifact().version, "kmeans"))
    assert np.allclose(active["new"].psi, 0.3)  # every answer rated 7/10


async def test_judge_grader_needs_a_judge_model(store: Store) -> None:
    with pytest.raises(Exception, match=r"profiling\.judge_model"):
        await run_profiling(_config(1), store, FakeForwarder(), "new", artifact=_artifact(), grader="judge")


# ------------------------------------------------------------------ sequential profiling (issue 15)
def _seq_artifact(n: int = 200) -> RouterArtifact:
    """Two clusters; the fake model (always answers A) is right on every prompt of cluster 0 and on a third
    of cluster 1's."""
    emb = np.array([[1.0, 0.0] if i % 2 == 0 else [0.0, 1.0] for i in range(n)])
    answers: list[str | None] = ["A" if i % 2 == 0 or i % 3 == 0 else "B" for i in range(n)]
    return RouterArtifact(embedder_id="test", k=2, centroids=np.eye(2), theta=None,
                          val_prompt_ids=[f"p{i}" for i in range(n)], val_prompts=[f"question {i}" for i in range(n)],
                          val_embeddings=emb, training_set_hash="h", variant="kmeans", val_answers=answers)


@pytest.mark.parametrize("allocation", ["uniform", "active"])
async def test_sequential_profiling_stops_when_every_cluster_is_tight(store: Store, allocation: str) -> None:
    from routing.active import cluster_posteriors

    art = _seq_artifact()
    fwd = FakeForwarder()
    res = await run_profiling(_config(3), store, fwd, "new", artifact=art, activate=True, target_ci=0.15, max_prompts=200,
                              allocation=allocation)
    seq = res.sequential
    assert seq is not None and seq["stop"] == "target" and seq["allocation"] == allocation
    assert 20 <= seq["used"] < 200 and fwd.calls == seq["used"] == res.report.graded
    assert max(seq["half_widths"]) <= 0.15 and res.activated and not res.partial
    # the half-widths are those of the Beta posterior of the graded prompts, with the artifact's prior
    outcomes = SqlOutcomeStore(store, art.version).outcomes("new")
    rows = np.asarray([int(o.prompt_id[1:]) for o in outcomes])
    errors = np.asarray([1.0 - float(o.score or 0.0) for o in outcomes])
    if allocation == "uniform":
        _, hw = cluster_posteriors(art.membership(art.val_embeddings[rows], "kmeans"), errors, art.prior_strength,
                                   float((errors.sum() + 1) / (len(errors) + 2)))
        np.testing.assert_allclose(seq["half_widths"], np.round(hw, 4))
    # the stored Ψ is the artifact's estimator on exactly the prompts asked
    scores = {f"p{i}": 1.0 - e for i, e in zip(rows, errors, strict=True)}
    expected = art.profile_model("new", scores, variants=["kmeans"], reweight=allocation == "active")[0].psi
    active = catalog.active_profiles(store, catalog.profile_key(art.version, "kmeans"))
    np.testing.assert_allclose(active["new"].psi, expected)
    assert active["new"].source == "validation"


async def test_sequential_profiling_budget_without_target_and_resume(store: Store) -> None:
    art = _seq_artifact()
    fwd = FakeForwarder()
    res = await run_profiling(_config(50), store, fwd, "new", artifact=art, activate=True, max_prompts=30)
    assert res.sequential is not None and res.sequential["used"] == 30 == fwd.calls
    assert res.sequential["stop"] == "max_prompts" and res.activated  # no target: the budget is the rule
    # a larger budget later resumes: only the new prompts are asked
    res = await run_profiling(_config(50), store, fwd, "new", artifact=art, activate=True, max_prompts=50)
    assert res.sequential is not None and res.sequential["used"] == 50 and fwd.calls == 50


async def test_sequential_profiling_short_of_the_target_is_not_activated(store: Store) -> None:
    art = _seq_artifact()
    fwd = FakeForwarder()
    res = await run_profiling(_config(1), store, fwd, "new", artifact=art, activate=True, max_prompts=20, target_ci=0.05)
    assert res.sequential is not None and res.sequential["stop"] == "max_prompts" and fwd.calls == 20
    assert not res.activated and res.short_clusters and "above the target 0.05" in res.message
    assert catalog.active_profiles(store, catalog.profile_key(art.version, "kmeans")) == {}
    res = await run_profiling(_config(1), store, fwd, "new", artifact=art, activate=True, max_prompts=20, target_ci=0.05,
                              allow_partial=True)
    assert res.activated and res.partial and fwd.calls == 20
    with pytest.raises(ValueError, match="target_ci must be in"):
        await run_profiling(_config(1), store, fwd, "new", artifact=art, target_ci=1.5)
    with pytest.raises(ValueError, match="unknown allocation"):
        await run_profiling(_config(1), store, fwd, "new", artifact=art, max_prompts=5, allocation="greedy")


async def test_sequential_profiling_asks_every_model_the_same_prompts(store: Store) -> None:
    """One seeded order per artifact, not per model: models profiled on few prompts share them."""
    catalog.add_model(store, parse_spec({"name": "other", "router_cost": 2.0, "routable": False,
                                         "litellm_params": {"model": "openai/other"}}))
    art = _seq_artifact()
    for name in ("new", "other"):
        res = await run_profiling(_config(1), store, FakeForwarder(), name, artifact=art, max_prompts=30)
        assert res.sequential is not None and res.sequential["used"] == 30
    asked = [sorted(o.prompt_id for o in SqlOutcomeStore(store, art.version).outcomes(name)) for name in ("new", "other")]
    assert len(asked[0]) == 30 and asked[0] == asked[1]
