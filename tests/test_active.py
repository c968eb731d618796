"""Active allocation of a new model's labels and the sequential stopping rule (routing/active.py, issue 15)."""

import numpy as np
import pytest
from scipy.stats import beta as beta_dist

from routing.active import (
    allocate,
    choose_and_label,
    cluster_posteriors,
    cluster_weights,
    hard_clusters,
    importance_weights,
    tight_enough,
    traffic_shares,
)
from routing.estimators import ActivePool, LabelOracle, LearnedMap, LearnedMapActive, RoutingTask
from routing.profiles import shrunk_cluster_errors
from tests.test_estimators import noisy_task


def one_hot(clusters: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[clusters]


def test_posterior_is_the_stored_psi_and_its_half_width_the_beta_posterior() -> None:
    rng = np.random.default_rng(0)
    w = rng.dirichlet(np.ones(3), size=50)
    e = (rng.random(50) < 0.3).astype(float)
    mean, hw = cluster_posteriors(w, e, 2.0, float(e.mean()))
    psi, _ = shrunk_cluster_errors(w, e[:, None], 2.0)
    np.testing.assert_allclose(mean, psi[0], rtol=1e-12)  # the posterior mean is Ψ_k as stored
    a = w.T @ e + 2.0 * e.mean()
    b = w.T @ (1 - e) + 2.0 * (1 - e.mean())
    np.testing.assert_allclose(hw, 1.959963984540054 * beta_dist(a, b).std(), rtol=1e-9)
    # more labels: tighter; no label and no prior: unbounded
    _, hw_more = cluster_posteriors(np.vstack([w, w]), np.concatenate([e, e]), 2.0, float(e.mean()))
    assert np.all(hw_more < hw)
    _, hw_none = cluster_posteriors(np.zeros((0, 3)), np.zeros(0), 0.0, 0.5)
    assert np.all(np.isinf(hw_none))
    with pytest.raises(ValueError, match="membership rows"):
        cluster_posteriors(w, e[:10], 2.0, 0.5)


def test_tight_enough_needs_every_cluster_below_target_unless_exhausted() -> None:
    hw = np.array([0.05, 0.2, 0.08])
    assert not tight_enough(hw, 0.1)
    assert tight_enough(hw, 0.1, exhausted=np.array([False, True, False]))
    assert tight_enough(hw, 0.2)


def test_allocate_respects_batch_and_capacity_and_favours_uncertain_traffic() -> None:
    extra = allocate(np.zeros(3), np.array([100, 100, 5]), 60, np.array([0.5, 0.3, 0.2]),
                     np.array([0.25, 0.25, 0.25]), 1.0)
    assert extra.sum() == 60 and extra[2] <= 5 and extra[0] > extra[1] > 0
    # a settled cluster (Ψ̂ near 0) gets fewer labels than an equally large uncertain one
    extra = allocate(np.zeros(2), np.array([100, 100]), 40, np.array([0.5, 0.5]), np.array([0.01, 0.25]), 1.0)
    assert extra[1] > extra[0]
    # never more than there is to label
    assert allocate(np.zeros(2), np.array([3, 4]), 50, np.ones(2), np.full(2, 0.25), 1.0).tolist() == [3, 4]


def test_cluster_weights() -> None:
    f = np.array([0.6, 0.3, 0.1])
    np.testing.assert_allclose(cluster_weights(f, "traffic", power=2.0), f ** 2)
    d = np.array([0.1, 0.2, 0.0])
    w = cluster_weights(f, "disagreement", d, power=1.0)
    assert w[2] == 0 and w[1] > w[0] * (0.3 / 0.6)
    with pytest.raises(ValueError, match="valid: traffic, disagreement"):
        cluster_weights(f, "entropy")
    with pytest.raises(ValueError, match="needs the known models"):
        cluster_weights(f, "disagreement", None)


def test_importance_weights_undo_uneven_sampling() -> None:
    shares = np.array([0.8, 0.2])
    c = np.array([0] * 10 + [1] * 10)  # half the labels from a cluster with a fifth of the traffic
    v = importance_weights(c, shares)
    assert v.sum() == pytest.approx(20)
    assert v[:10].sum() / v.sum() == pytest.approx(0.8)
    # the reweighted overall error is the traffic-weighted one, and the cluster means are unchanged
    e = np.concatenate([np.zeros(10), np.ones(10)])
    psi, counts = shrunk_cluster_errors(one_hot(c, 2), e[:, None], 0.0, row_weights=v)
    np.testing.assert_allclose(psi[0], [0.0, 1.0])
    np.testing.assert_allclose(counts, [10, 10])  # the real counts set the shrinkage
    psi_m, _ = shrunk_cluster_errors(one_hot(c, 2), e[:, None], 10.0, row_weights=v)
    np.testing.assert_allclose(psi_m[0], [10 * 0.2 / 20, (10 + 10 * 0.2) / 20])  # toward ē = 0.2, not 0.5
    # weights of 1 give the plain estimator
    plain, _ = shrunk_cluster_errors(one_hot(c, 2), e[:, None], 3.0)
    ones, _ = shrunk_cluster_errors(one_hot(c, 2), e[:, None], 3.0, row_weights=np.ones(20))
    np.testing.assert_allclose(ones, plain, rtol=1e-12)
    with pytest.raises(ValueError, match="row_weights"):
        shrunk_cluster_errors(one_hot(c, 2), e[:, None], 3.0, row_weights=np.ones(3))


def test_choose_and_label_asks_each_prompt_once_within_the_budget_in_rounds() -> None:
    rng = np.random.default_rng(1)
    k = 4
    clusters = rng.choice(k, size=300, p=[0.55, 0.25, 0.15, 0.05])
    w = one_hot(clusters, k)
    truth = (rng.random(300) < np.array([0.5, 0.05, 0.5, 0.5])[clusters]).astype(float)
    calls: list[np.ndarray] = []

    def label(rows: np.ndarray) -> np.ndarray:
        calls.append(rows)
        return truth[rows]

    res = choose_and_label(w, 80, label, prior_strength=1.0, seed=3, rounds=4)
    asked = np.concatenate(calls)
    assert len(calls) == res.rounds == 4 and len(asked) == 80 == len(set(asked.tolist()))
    np.testing.assert_array_equal(res.rows, asked)
    np.testing.assert_array_equal(res.errors, truth[asked])
    per = np.bincount(clusters[asked], minlength=k)
    # n_k + m ∝ f_k·σ_k (power 2): the settled cluster 1 (5 % error) gets fewer labels than the uncertain
    # cluster 2, relative to their traffic
    assert per[1] / 0.25 < per[2] / 0.15
    # power 1 (n_k + m ∝ √(f_k)·σ_k): the small clusters get more than a uniform sample gives them
    # (0.15·80 = 12, 0.05·80 = 4)
    sq = choose_and_label(w, 80, lambda r: truth[r], prior_strength=1.0, seed=3, rounds=4, power=1.0)
    per1 = np.bincount(clusters[sq.rows], minlength=k)
    assert per1[3] > 4 and per1[2] > 12
    # seeded: the same choice again
    again = choose_and_label(w, 80, lambda r: truth[r], prior_strength=1.0, seed=3, rounds=4)
    np.testing.assert_array_equal(again.rows, res.rows)
    # a budget beyond the candidates labels them all once
    assert len(choose_and_label(w, 1000, lambda r: truth[r], prior_strength=1.0, seed=0).rows) == 300
    with pytest.raises(ValueError, match="at least 1"):
        choose_and_label(w, 0, lambda r: truth[r], prior_strength=1.0, seed=0)


def test_hard_clusters_and_shares() -> None:
    w = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    assert hard_clusters(w).tolist() == [0, 1, 0]
    np.testing.assert_allclose(traffic_shares(hard_clusters(w), 3), [2 / 3, 1 / 3, 0])


def test_label_oracle_counts_and_refuses_repeats_and_overruns() -> None:
    o = LabelOracle(np.arange(20, dtype=float).reshape(10, 2), budget=4)
    assert o.ask(1, np.array([0, 3])).tolist() == [1.0, 7.0]
    with pytest.raises(ValueError, match="twice"):
        o.ask(1, np.array([3]))
    with pytest.raises(ValueError, match="budget 4 exceeded"):
        o.ask(1, np.array([4, 5, 6]))
    assert o.asked == [[], [0, 3]]


def active_task(budget: int, noise_seed: int | None = None) -> tuple[RoutingTask, np.ndarray]:
    task = noisy_task(n_val=300)
    pool_scores = np.asarray(task.val_scores).copy()
    task.candidates = ActivePool(x=task.x_val, train_scores=task.val_train_scores,
                                 oracle=LabelOracle(pool_scores, budget=budget))
    if noise_seed is not None:  # the uniform sample's labels are not what active profiling reads
        task.val_scores = np.random.default_rng(noise_seed).random(task.val_scores.shape)
    return task, pool_scores


def _pool(task: RoutingTask) -> ActivePool:
    """The task's candidates (``active_task`` sets them)."""
    assert task.candidates is not None
    return task.candidates


def test_active_learnedmap_reads_only_the_labels_it_chose() -> None:
    """Honesty: the pool models are seen only through the labels the allocation asked for, at most the
    budget per model; replacing every other label of theirs with noise changes nothing, bit for bit."""
    task, scores = active_task(60)
    lm = LearnedMapActive(n_clusters=4, prior_strength=2.0).fit(task)
    asked = _pool(task).oracle.asked
    assert lm.labels_used_ == [60] * 4 and all(len(set(a)) == 60 for a in asked)
    assert lm.psi_.shape == (4, 4) and np.all((lm.psi_ >= 0) & (lm.psi_ <= 1))
    noisy = scores.copy()
    rng = np.random.default_rng(5)
    for j, rows in enumerate(asked):
        others = np.setdiff1d(np.arange(len(noisy)), rows)
        noisy[others, j] = rng.random(len(others))
    task2, _ = active_task(60, noise_seed=7)
    _pool(task2).oracle = LabelOracle(noisy, budget=60)
    lm2 = LearnedMapActive(n_clusters=4, prior_strength=2.0).fit(task2)
    np.testing.assert_array_equal(lm2.psi_, lm.psi_)
    # with the whole candidate set as the budget it labels everything; weights are then 1: plain LearnedMap
    task3, _ = active_task(300)
    full = LearnedMapActive(n_clusters=4, prior_strength=2.0).fit(task3)
    plain = LearnedMap(n_clusters=4, prior_strength=2.0).fit(noisy_task(n_val=300))
    np.testing.assert_allclose(full.psi_, plain.psi_, atol=1e-12)


@pytest.mark.parametrize("allocation", ["shared", "informative"])
def test_shared_designs_ask_every_new_model_the_same_prompts_within_the_budget(allocation: str) -> None:
    task, scores = active_task(60)
    lm = LearnedMapActive(n_clusters=4, prior_strength=2.0, allocation=allocation).fit(task)
    asked = _pool(task).oracle.asked
    assert all(sorted(a) == sorted(asked[0]) for a in asked) and len(set(asked[0])) == lm.labels_used_[0] <= 60
    assert lm.labels_used_[0] >= 58  # systematic sampling: the budget, up to rounding
    # the design depends on the known models' labels only: noise in the new models' labels leaves it as it was
    task2, _ = active_task(60, noise_seed=3)
    _pool(task2).oracle = LabelOracle(np.random.default_rng(4).random(scores.shape), budget=60)
    LearnedMapActive(n_clusters=4, prior_strength=2.0, allocation=allocation).fit(task2)
    assert _pool(task2).oracle.asked == asked


def test_inclusion_probabilities_and_systematic_sampling() -> None:
    from routing.active import inclusion_probabilities, informativeness, systematic_sample

    q = informativeness(np.array([[1, 1], [0, 1], [0, 0], [1, 0], [1, 1]], dtype=float), floor=0.05)
    np.testing.assert_allclose(q, [0.05, 0.55, 0.05, 0.55, 0.05])
    pi = inclusion_probabilities(q, 3)
    assert pi.sum() == pytest.approx(3) and pi[1] == pi[3] == 1.0  # capped: taken for sure
    hits = np.zeros(5)
    for s in range(3000):
        picked = systematic_sample(pi, s)
        assert len(picked) == 3
        hits[picked] += 1
    np.testing.assert_allclose(hits / 3000, pi, atol=0.03)
    with pytest.raises(ValueError, match=r"not in 1\.\.5"):
        inclusion_probabilities(q, 6)


def test_active_learnedmap_refuses_an_unknown_allocation() -> None:
    task, _ = active_task(60)
    with pytest.raises(ValueError, match="valid: active, uniform, shared, informative"):
        LearnedMapActive(n_clusters=4, prior_strength=2.0, allocation="greedy").fit(task)
