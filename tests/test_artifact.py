from pathlib import Path

import numpy as np
import pytest

from routing.artifact import RouterArtifact, fit_artifact, load_policy, load_pool, pool_from_profiles
from routing.policy import GatewayPolicy, PoolModel
from routing.profiles import load_profiles, save_profiles


def blobs(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = 8
    lab = rng.integers(2, size=n)
    centres = np.eye(d)[:2]
    x = centres[lab] + 0.05 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scores = np.stack([lab == 0, lab == 1, rng.random(n) < 0.3], axis=1).astype(float)
    return x, scores, lab


@pytest.fixture
def fitted(tmp_path: Path) -> tuple[Path, RouterArtifact, np.ndarray, np.ndarray]:
    x, scores, lab = blobs()
    ids = [f"p{i}" for i in range(len(x))]
    art, profiles = fit_artifact(x, scores, np.array([4.0, 4.0, 1.0]), ["A", "B", "C"], ids,
                                 [f"prompt {i}" for i in ids], embedder_id="test-embedder",
                                 training_set_hash="abc", k=2, val_size=80)
    out = art.save(tmp_path / "router")
    save_profiles(out, profiles, artifact_version=art.version)
    return out, art, x, lab


def test_round_trip(fitted: tuple[Path, RouterArtifact, np.ndarray, np.ndarray]) -> None:
    out, art, _, _ = fitted
    back = RouterArtifact.load(out)
    assert back.version == art.version
    assert back.k == 2 and back.embedder_id == "test-embedder" and back.training_set_hash == "abc"
    assert np.array_equal(back.centroids, art.centroids)
    assert back.theta is not None and art.theta is not None and np.array_equal(back.theta, art.theta)
    assert back.val_prompt_ids == art.val_prompt_ids and len(back.val_prompts) == 80
    assert set(load_profiles(out, "kmeans")) == {"A", "B", "C"}
    assert set(load_profiles(out, "learnedmap")) == {"A", "B", "C"}


@pytest.mark.parametrize("variant", ["kmeans", "learnedmap"])
def test_loaded_policy_decides_like_the_fitted_one(
        fitted: tuple[Path, RouterArtifact, np.ndarray, np.ndarray], variant: str) -> None:
    out, art, x, lab = fitted
    from routing.artifact import UniRoutePolicy

    live = UniRoutePolicy(art, variant)
    loaded = load_policy(out, variant)
    assert isinstance(loaded, GatewayPolicy)
    pool = load_pool(out, variant)
    agree = 0
    for i in range(60):
        a, b = live.rank(x[i], pool, 0.05), loaded.rank(x[i], pool, 0.05)
        assert [c.model for c in a.ranked] == [c.model for c in b.ranked]
        assert a.cluster == b.cluster
        agree += a.chosen.model == "AB"[lab[i]]
    assert agree >= 57  # the two experts split the two clusters
    # λ → ∞ picks the cheapest
    assert loaded.rank(x[0], pool, 1e6).chosen.model == "C"


def test_unprofiled_models_are_excluded(fitted: tuple[Path, RouterArtifact, np.ndarray, np.ndarray]) -> None:
    out, _, x, _ = fitted
    policy = load_policy(out, "kmeans")
    pool = [*load_pool(out, "kmeans"), PoolModel("new-model", cost=0.01, psi=None)]
    d = policy.rank(x[0], pool, 10.0)
    assert "new-model" not in [c.model for c in d.ranked]
    with pytest.raises(ValueError, match="no profiled model"):
        policy.rank(x[0], [PoolModel("new-model", cost=1.0)], 0.0)
    with pytest.raises(ValueError, match="clusters"):
        policy.rank(x[0], [PoolModel("bad", cost=1.0, psi=np.zeros(5))], 0.0)


def test_a_new_registry_pool_is_ranked_afresh(fitted: tuple[Path, RouterArtifact, np.ndarray, np.ndarray]) -> None:
    """The policy caches the prepared pool by identity; a new snapshot (new tuple) is never served stale."""
    out, _, x, lab = fitted
    policy = load_policy(out, "kmeans")
    pool = tuple(load_pool(out, "kmeans"))
    expert = "AB"[lab[0]]
    assert policy.rank(x[0], pool, 0.0).chosen.model == expert
    assert policy.rank(x[0], pool, 0.0).chosen.model == expert  # cached
    worse = tuple(PoolModel(m.name, m.cost, np.ones_like(m.psi) if m.name == expert else m.psi) for m in pool)
    assert policy.rank(x[0], worse, 0.0).chosen.model != expert
    cheaper = (*pool, PoolModel("D", cost=1e-3, psi=np.zeros(2)))
    assert policy.rank(x[0], cheaper, 0.0).chosen.model == "D"
    assert policy.rank(x[0], pool, 0.0).chosen.model == expert


def test_adding_a_model_profiles_it_without_refitting(
        fitted: tuple[Path, RouterArtifact, np.ndarray, np.ndarray]) -> None:
    out, art, _, _ = fitted
    before = (out / "arrays.npz").read_bytes()
    profs = art.profile_model("D", dict.fromkeys(art.val_prompt_ids[:40], 1.0), cost=2.0)
    save_profiles(out, profs, artifact_version=art.version)
    assert (out / "arrays.npz").read_bytes() == before
    assert "D" in load_profiles(out, "learnedmap")
    pool = pool_from_profiles(load_profiles(out, "kmeans"))
    assert {m.name for m in pool} == {"A", "B", "C", "D"}
    with pytest.raises(KeyError, match="not validation prompts"):
        art.profile_model("E", {"nope": 1.0})


def test_load_missing_artifact_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="router fit"):
        RouterArtifact.load(tmp_path)


def test_fit_with_a_static_embedder_round_trips(tmp_path: Path) -> None:
    """`router fit --embedder FOLDER` copies the static embedding into the artifact; the gateway's
    `make_embedder(artifact.embedder_path)` loads it back with the same id, even after the folder moves."""
    import argparse
    import shutil

    from routing.cli import fit_command
    from routing.embedder import make_embedder
    from routing.synthetic import make_synthetic_dataset
    from tests.static_model import make_tiny_static

    static = make_tiny_static(tmp_path / "static")
    data = make_synthetic_dataset(tmp_path / "data", n_prompts=120)
    args = argparse.Namespace(dataset=str(data), out=str(tmp_path / "router"), k="3", variant="learnedmap",
                              val_size=40, seed=0, embedder=str(static), cache_dir=str(tmp_path / "cache"))
    assert fit_command(args) == 0
    moved = tmp_path / "moved-router"
    shutil.move(tmp_path / "router", moved)
    shutil.rmtree(static)  # the artifact does not depend on the source folder
    art = RouterArtifact.load(moved)
    assert art.embedder_path == str((moved / "embedder").resolve())
    assert art.embedder_id.startswith("tiny-test+m2v16-") and art.centroids.shape[1] == 16
    emb = make_embedder(art.embedder_path, cache_dir=tmp_path / "cache2")
    assert emb.id == art.embedder_id
    policy = load_policy(moved)
    decision = policy.rank(emb.embed(["What is 2 + 2?"])[0], load_pool(moved, art.variant), 0.1)
    assert decision.ranked
    assert '"embedder_path": "embedder"' in (moved / "artifact.json").read_text()


def test_difficulty_prior_round_trips_and_profiles_new_models_as_the_fit_did(tmp_path: Path) -> None:
    """Issue 15: the prior a variant's Ψ were shrunk with (and δ) travel in the artifact, so profiling a
    new model (`uniroute profile`) gives it the Ψ the fit gave a model with the same outcomes."""
    x, scores, _ = blobs()
    ids = [f"p{i}" for i in range(len(x))]
    art, profiles = fit_artifact(x, scores, np.array([4.0, 4.0, 1.0]), ["A", "B", "C"], ids,
                                 [f"prompt {i}" for i in ids], embedder_id="test-embedder",
                                 training_set_hash="abc", k=2, val_size=80, prior="difficulty")
    out = art.save(tmp_path / "router")
    back = RouterArtifact.load(out)
    assert back.version == art.version
    for v in ("kmeans", "learnedmap"):
        assert back.profile_priors[v]["prior"] == "difficulty"
        assert np.array_equal(back.difficulty[v], art.difficulty[v])
    # a twin of A profiled afresh on the validation prompts gets A's Ψ, in both variants
    pos = {pid: i for i, pid in enumerate(ids)}
    a_scores = {pid: float(scores[pos[pid], 0]) for pid in back.val_prompt_ids}
    fitted_a = {p.variant: p for p in profiles if p.model == "A"}
    for prof in back.profile_model("A-twin", a_scores, cost=4.0):
        assert np.allclose(prof.psi, fitted_a[prof.variant].psi, atol=1e-12)


def test_artifacts_without_profile_priors_load_as_flat(fitted: tuple[Path, RouterArtifact, np.ndarray, np.ndarray]
                                                       ) -> None:
    """An artifact written before issue 15 (no profile_priors, no difficulty arrays) keeps its version and
    profiles new models with the flat prior and its recorded prior_strength."""
    import json

    out, _, _, _ = fitted
    meta = json.loads((out / "artifact.json").read_text())
    meta.pop("profile_priors")
    old = RouterArtifact.load(out)  # as written now
    with np.load(out / "arrays.npz") as arrays:
        kept = {k: arrays[k] for k in arrays.files if not k.startswith("difficulty_")}
    np.savez(out / "arrays.npz", **kept)  # type: ignore[arg-type]
    old_style = RouterArtifact(embedder_id=old.embedder_id, k=old.k, centroids=old.centroids, theta=old.theta,
                               val_prompt_ids=old.val_prompt_ids, val_prompts=old.val_prompts,
                               val_embeddings=old.val_embeddings, training_set_hash=old.training_set_hash,
                               prior_strength=2.0)
    meta["version"] = old_style.version
    meta["prior_strength"] = 2.0
    (out / "artifact.json").write_text(json.dumps(meta))
    loaded = RouterArtifact.load(out)
    assert loaded.profile_priors == {} and loaded.profile_prior("kmeans") == (2.0, None)
    # a bad prior name is refused with the valid ones
    meta["profile_priors"] = {"kmeans": {"prior": "hierarchical", "prior_strength": 1.0}}
    (out / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="valid priors: flat, difficulty"):
        RouterArtifact.load(out)


def test_the_evaluation_only_peer_prior_is_refused_by_the_artifact(tmp_path: Path) -> None:
    """The peer prior (issue 15, not adopted) needs the training models' outcomes and Ψ, which an artifact does
    not hold: `router fit` refuses it rather than profile onboarded models with another prior than the fit's."""
    x, scores, _ = blobs()
    ids = [f"p{i}" for i in range(len(x))]
    with pytest.raises(ValueError, match="evaluation-only"):
        fit_artifact(x, scores, np.array([4.0, 4.0, 1.0]), ["A", "B", "C"], ids, [f"prompt {i}" for i in ids],
                     embedder_id="test-embedder", training_set_hash="abc", k=2, val_size=80, prior="peer")
