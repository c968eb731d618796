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
