import numpy as np
import pytest

from routing.profiles import estimate_profile, load_profiles, save_profiles, shrunk_cluster_errors


def test_no_shrinkage_is_the_cluster_mean() -> None:
    w = np.array([[1, 0], [1, 0], [0, 1]], dtype=float)
    e = np.array([[1.0], [0.0], [1.0]])
    psi, counts = shrunk_cluster_errors(w, e, 0.0)
    assert psi[0].tolist() == pytest.approx([0.5, 1.0])
    assert counts.tolist() == [2, 1]


def test_shrinkage_pulls_small_clusters_toward_the_overall_error() -> None:
    # cluster 0: 100 prompts, error 0.2; cluster 1: 1 prompt, error 1
    w = np.zeros((101, 2))
    w[:100, 0] = 1
    w[100, 1] = 1
    e = np.concatenate([np.r_[np.ones(20), np.zeros(80)], [1.0]])[:, None]
    overall = e.mean()
    psi, _ = shrunk_cluster_errors(w, e, 4.0)
    # (n_k ē_k + m ē) / (n_k + m)
    assert psi[0, 1] == pytest.approx((1 * 1.0 + 4 * overall) / 5)
    assert psi[0, 0] == pytest.approx((100 * 0.2 + 4 * overall) / 104)
    assert abs(psi[0, 0] - 0.2) < abs(psi[0, 1] - 1.0)  # the big cluster moves far less


def test_empty_cluster_takes_the_overall_error() -> None:
    w = np.array([[1, 0], [1, 0]], dtype=float)
    e = np.array([[0.25], [0.75]])
    for m in (0.0, 3.0):
        psi, _ = shrunk_cluster_errors(w, e, m)
        assert psi[0, 1] == pytest.approx(0.5)


def test_fractional_scores_and_soft_weights() -> None:
    w = np.array([[0.5, 0.5], [0.0, 1.0]])
    prof = estimate_profile("m", w, np.array([0.3, 0.9]), prior_strength=0.0)
    assert prof.psi.tolist() == pytest.approx([0.7, (0.5 * 0.7 + 0.1) / 1.5])
    assert prof.counts.tolist() == pytest.approx([0.5, 1.5])
    assert np.all((prof.psi >= 0) & (prof.psi <= 1))


def test_profiles_round_trip_and_merge(tmp_path: object) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    w = np.eye(3)
    a = estimate_profile("a", w, np.array([1.0, 0.0, 1.0]), prior_strength=1.0, cost=3.0)
    b = estimate_profile("b", w, np.array([0.0, 0.0, 1.0]), prior_strength=1.0, variant="learnedmap")
    save_profiles(d, [a], artifact_version="v1")
    save_profiles(d, [b], artifact_version="v1")
    km = load_profiles(d, "kmeans")
    assert list(km) == ["a"] and km["a"].psi.tolist() == pytest.approx(a.psi.tolist()) and km["a"].cost == 3.0
    assert list(load_profiles(d, "learnedmap")) == ["b"]
    with pytest.raises(ValueError, match="belong to artifact v1"):
        save_profiles(d, [a], artifact_version="v2")


def test_a_models_profile_does_not_depend_on_the_other_models() -> None:
    """Ψ(h) from h's outcomes alone (onboarding) is bit for bit Ψ(h) from a fit over all models,
    and two models with the same outcomes get the same Ψ (an exact tie for the router's tie-break)."""
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(7), size=333)
    e = rng.random((333, 9)).round(3)  # fractional: sums that do not round exactly
    e[:, 5] = e[:, 2]
    psi, _ = shrunk_cluster_errors(w, e, 2.0)
    assert np.array_equal(psi[5], psi[2])
    for j in range(9):
        assert np.array_equal(shrunk_cluster_errors(w, e[:, j], 2.0)[0][0], psi[j])
        assert np.array_equal(shrunk_cluster_errors(w, e[:, [j]], 2.0)[0][0], psi[j])


def test_difficulty_prior_keeps_the_overall_error_and_ranks_the_clusters() -> None:
    from routing.profiles import cluster_difficulty, difficulty_prior_means

    # training models: cluster 1 is much harder than cluster 0 for all of them
    rng = np.random.default_rng(0)
    lab = rng.integers(3, size=3000)
    w = np.eye(3)[lab]
    base = np.array([0.1, 0.6, 0.3])
    errors = np.stack([(rng.random(3000) < np.clip(base[lab] + shift, 0, 1)).astype(float)
                       for shift in (-0.05, 0.0, 0.1, 0.2)], axis=1)
    delta = cluster_difficulty(w, errors)
    assert delta[1] > delta[2] > delta[0]
    freq = np.array([0.5, 0.2, 0.3])
    pi = difficulty_prior_means(np.array([0.2, 0.5]), delta, freq)
    assert (pi @ freq).tolist() == pytest.approx([0.2, 0.5], abs=1e-9)  # the model's own overall error
    assert np.all(pi[:, 1] > pi[:, 2]) and np.all(pi[:, 2] > pi[:, 0])
    # leave one out: row h is δ without model h
    loo = cluster_difficulty(w, errors, leave_one_out=True)
    assert loo[2] == pytest.approx(cluster_difficulty(w, errors[:, [0, 1, 3]]))


def test_difficulty_prior_pulls_a_thin_cluster_toward_its_difficulty() -> None:
    delta = np.array([-1.0, 1.5])
    w = np.zeros((41, 2))
    w[:40, 0] = 1
    w[40, 1] = 1  # one prompt in the hard cluster, answered correctly
    e = np.concatenate([np.r_[np.ones(8), np.zeros(32)], [0.0]])[:, None]
    flat, _ = shrunk_cluster_errors(w, e, 8.0)
    hard, counts = shrunk_cluster_errors(w, e, 8.0, delta)
    pi = np.asarray(__import__("routing.profiles", fromlist=["x"]).difficulty_prior_means(
        e.mean(axis=0), delta, counts / counts.sum()))
    assert hard[0, 1] == pytest.approx((0.0 + 8.0 * pi[0, 1]) / 9.0)
    assert hard[0, 1] > flat[0, 1]  # the hard cluster's prior is above the model's overall error
    # the same outcomes give the same Ψ alone or next to other models (Ψ(h) depends on h's outcomes only)
    other = np.random.default_rng(1).random((41, 1))
    both, _ = shrunk_cluster_errors(w, np.hstack([e, other]), 8.0, delta)
    assert np.array_equal(both[0], hard[0])


def _peers(seed: int = 0, n: int = 4000, k: int = 4, m: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(memberships (n, K), per-cluster error rates (m, K) with model-specific patterns, errors (n, m))."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(k, size=n)
    rates = rng.uniform(0.05, 0.95, size=(m, k))
    errors = (rng.random((n, m)) < rates[:, lab].T).astype(float)
    return np.eye(k)[lab], rates, errors


def test_a_model_that_copies_a_training_model_gets_its_pattern() -> None:
    """The peer prior: a new model whose outcomes are a training model's gets (nearly) all the weight on
    it, and its prior means follow that model's Ψ across the clusters, recalibrated to its own ē."""
    from routing.profiles import peer_prior_offsets, peer_weights

    w, rates, errors = _peers()
    train, val = slice(0, 3000), slice(3000, 3200)
    peer_psi, _ = shrunk_cluster_errors(w[train], errors[train], 1.0)
    new = errors[val, [2]]  # the new model answers as training model 2 does
    wts = peer_weights(new, errors[val])
    assert wts.shape == (1, 5) and wts.sum() == pytest.approx(1.0) and np.all(wts >= 0)
    assert wts[0, 2] > 0.99
    delta = peer_prior_offsets(new, errors[val], peer_psi)
    assert np.argsort(delta[0]).tolist() == np.argsort(peer_psi[2]).tolist()
    assert np.corrcoef(delta[0], rates[2])[0, 1] > 0.95
    # a strong prior: Ψ is (nearly) the copied model's pattern, even from 200 prompts
    psi, counts = shrunk_cluster_errors(w[val], new, 1e6, delta)
    assert (psi[0] @ counts / counts.sum()) == pytest.approx(new.mean(), abs=1e-6)  # keeps its own ē
    assert np.abs(psi[0] - peer_psi[2]).max() < 0.03
    flat, _ = shrunk_cluster_errors(w[val], new, 1e6)
    assert np.abs(flat[0] - peer_psi[2]).max() > 0.1  # the flat prior has no pattern


@pytest.mark.parametrize("method", ["nnls", "similarity"])
def test_peer_prior_leave_one_out_excludes_the_model_itself(method: str) -> None:
    from routing.profiles import peer_weights

    _, _, errors = _peers(1)
    loo = peer_weights(errors[:300], errors[:300], allowed=~np.eye(5, dtype=bool), method=method)
    assert np.all(np.diag(loo) == 0) and loo.sum(axis=1) == pytest.approx(np.ones(5))
    own = peer_weights(errors[:300], errors[:300], method=method)
    assert np.all(np.argmax(own, axis=1) == np.arange(5))  # allowed to, each model is its own best match
    if method == "nnls":
        assert np.diag(own) == pytest.approx(np.ones(5), abs=1e-6)


def test_peer_prior_depends_on_the_models_own_outcomes_only() -> None:
    """Ψ(h) under the peer prior, profiled alone (onboarding) or next to other models, is bit for bit the same."""
    from routing.profiles import peer_prior_offsets

    w, _, errors = _peers(2)
    peer_psi, _ = shrunk_cluster_errors(w[:3000], errors[:3000], 1.0)
    rng = np.random.default_rng(3)
    new = (rng.random((250, 4)) < 0.4).astype(float)
    new[:, 3] = new[:, 1]
    rows = slice(3000, 3250)
    delta = peer_prior_offsets(new, errors[rows], peer_psi)
    psi, _ = shrunk_cluster_errors(w[rows], new, 8.0, delta)
    assert np.array_equal(psi[3], psi[1])
    for j in range(4):
        alone = peer_prior_offsets(new[:, j], errors[rows], peer_psi)
        assert np.array_equal(alone[0], delta[j])
        assert np.array_equal(shrunk_cluster_errors(w[rows], new[:, j], 8.0, alone)[0][0], psi[j])
