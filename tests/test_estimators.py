"""Estimators on small generated data with known answers (random vectors, no real embedder)."""

from typing import Any

import numpy as np
import pytest

from routing.decision import expected_errors
from routing.estimators import (
    AlwaysCheapest,
    AlwaysMostAccurate,
    Clairvoyant,
    KNNRouter,
    LearnedMap,
    LearnedMapKNN,
    RouterEstimator,
    RoutingTask,
    UniRouteKMeans,
    ZeroRouter,
    decide,
)
from routing.policy import rank_by_objective


def two_cluster_task(seed: int = 0, n: int = 400) -> tuple[RoutingTask, np.ndarray, np.ndarray]:
    """Two well-separated prompt clusters; model A is right on cluster 0 only, B on cluster 1 only."""
    rng = np.random.default_rng(seed)
    d = 16
    centres = np.zeros((2, d))
    centres[0, 0] = 1.0
    centres[1, 1] = 1.0

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        lab = rng.integers(2, size=m)
        x = centres[lab] + 0.05 * rng.normal(size=(m, d))
        return x / np.linalg.norm(x, axis=1, keepdims=True), lab

    x_tr, l_tr = draw(n)
    x_va, l_va = draw(n // 2)
    x_te, l_te = draw(n // 2)

    def scores(lab: np.ndarray) -> np.ndarray:
        # columns: A (right on cluster 0), B (right on cluster 1), C (40% everywhere, cheap)
        s = np.stack([lab == 0, lab == 1, rng.random(len(lab)) < 0.4], axis=1)
        return s.astype(float)

    s_tr, s_va = scores(l_tr), scores(l_va)
    task = RoutingTask(x_train=x_tr, train_scores=s_tr, train_costs=np.array([5.0, 5.0, 1.0]),
                       x_val=x_va, val_train_scores=s_va, val_scores=s_va,
                       pool_costs=np.array([5.0, 5.0, 1.0]), pool_names=["A", "B", "C"],
                       pool_train_scores=s_tr, seed=seed)
    return task, x_te, l_te


@pytest.mark.parametrize("policy", [UniRouteKMeans(n_clusters=2, prior_strength=1.0),
                                    UniRouteKMeans(n_clusters="auto", k_grid=(2, 4)),
                                    LearnedMap(n_clusters=2, prior_strength=1.0),
                                    KNNRouter(k=5), Clairvoyant(),
                                    LearnedMapKNN(n_clusters=2, prior_strength=1.0)])
def test_two_clusters_split_between_their_experts(policy: RouterEstimator) -> None:
    task, x_te, l_te = two_cluster_task()
    pol = policy.fit(task)
    assert pol is policy
    errors = pol.expected_error(x_te)
    assert errors.shape == (len(x_te), 3)
    assert np.all((errors >= 0) & (errors <= 1))
    chosen = decide(errors, task.pool_costs, 0.0)[:, 0]
    assert np.mean(chosen == l_te) > 0.97  # model A (0) on cluster 0, model B (1) on cluster 1


def test_lambda_extremes() -> None:
    task, x_te, _ = two_cluster_task()
    for pol in (UniRouteKMeans(n_clusters=2).fit(task), LearnedMap(n_clusters=2).fit(task)):
        errors = pol.expected_error(x_te)
        assert np.all(decide(errors, task.pool_costs, 1e6)[:, 0] == 2)  # λ→∞: the cheapest
        best = decide(errors, task.pool_costs, 0.0)[:, 0]
        assert np.all(errors[np.arange(len(best)), best] == errors.min(axis=1))  # λ=0: least error


def test_decide_ties_go_to_the_cheaper_model() -> None:
    ranked = decide(np.array([0.3, 0.3, 0.3]), np.array([3.0, 1.0, 2.0]), 0.0)
    assert ranked.tolist() == [1, 2, 0]


def test_decide_ties_go_to_the_cheaper_model_then_by_name_as_the_gateway_ranks() -> None:
    errors, costs, names = np.array([0.3, 0.3, 0.3, 0.2]), np.array([2.0, 1.0, 2.0, 4.0]), ["b", "c", "a", "d"]
    assert decide(errors, costs, 0.0, names).tolist() == [3, 1, 2, 0]
    assert decide(errors, costs, 0.0).tolist() == [3, 1, 0, 2]  # no names: the pool position
    served = rank_by_objective(names, errors, costs / costs.max(), 0.0, None)
    assert [c.model for c in served.ranked] == ["d", "c", "a", "b"]
    assert decide(np.tile(errors, (2, 1)), costs, 0.0, names)[:, 0].tolist() == [3, 3]


def test_expected_errors_do_not_depend_on_the_batch_or_the_models_position() -> None:
    rng = np.random.default_rng(0)
    psi = rng.random((9, 40))
    psi[7] = psi[2]  # the same profile twice: an exact tie for the tie-break
    z = rng.dirichlet(np.ones(40), size=50)
    batch = expected_errors(z, psi)
    assert np.array_equal(batch[:, 7], batch[:, 2])
    assert np.array_equal(np.stack([expected_errors(row.copy(), psi) for row in z]), batch)
    assert np.allclose(batch, z @ psi.T)


def test_learned_state_and_frozen_theta() -> None:
    task, x_te, _ = two_cluster_task()
    lm = LearnedMap(n_clusters=2).fit(task)
    assert lm.theta_.shape == (17, 2) and lm.psi_.shape == (3, 2)
    z = lm.membership(x_te)
    assert np.allclose(z.sum(1), 1.0)
    theta = lm.theta_.copy()
    lm.expected_error(x_te)
    assert np.array_equal(theta, lm.theta_)


def test_zero_router_hull_and_mixture() -> None:
    costs = np.array([0.1, 0.3, 0.5, 1.0])
    acc = np.array([0.4, 0.5, 0.75, 0.8])  # 0.5 at cost .3 lies under the segment (.1,.4)→(.5,.75)
    assert ZeroRouter._hull(costs, acc) == [0, 2, 3]
    zr = ZeroRouter()
    zr.costs_, zr.hull_ = costs, [0, 2, 3]
    lo, hi, p = zr.mixture(0.3)
    assert (lo, hi) == (0, 2) and p == pytest.approx(0.5)
    assert zr.mixture(0.05)[:2] == (0, 0)


def test_constant_baselines() -> None:
    task, x_te, _ = two_cluster_task()
    s_te = np.ones((len(x_te), 3))
    ma = AlwaysMostAccurate().fit(task)
    ch = AlwaysCheapest().fit(task)
    assert ch.choice_ == 2
    assert ma.curve(x_te, s_te, task.pool_costs)[0].tolist() == [1.0]


def noisy_task(seed: int = 0, n_train: int = 900, n_val: int = 120) -> RoutingTask:
    """Six topics, eight training LLMs and four pool LLMs with topic-dependent accuracy."""
    rng = np.random.default_rng(seed)
    d, topics = 12, 6
    centres = rng.normal(size=(topics, d))

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        lab = rng.integers(topics, size=m)
        x = centres[lab] + 0.5 * rng.normal(size=(m, d))
        return x / np.linalg.norm(x, axis=1, keepdims=True), lab

    acc = rng.uniform(0.1, 0.95, size=(topics, 12))
    x_tr, l_tr = draw(n_train)
    x_va, l_va = draw(n_val)
    s_tr = (rng.random((n_train, 12)) < acc[l_tr]).astype(float)
    s_va = (rng.random((n_val, 12)) < acc[l_va]).astype(float)
    costs = rng.uniform(1, 20, size=12)
    return RoutingTask(x_train=x_tr, train_scores=s_tr[:, :8], train_costs=costs[:8], x_val=x_va,
                       val_train_scores=s_va[:, :8], val_scores=s_va[:, 8:], pool_costs=costs[8:],
                       pool_names=[f"p{j}" for j in range(4)], pool_train_scores=s_tr[:, 8:], seed=seed)


def test_selection_uses_training_llms_and_validation_sized_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: K, τ and m are chosen by profiling the TRAINING LLMs on samples of training prompts as
    large as the validation set (the labels a new model will have), never from the pool LLMs' labels."""
    import routing.estimators as est

    task = noisy_task()
    sizes: list[int] = []
    real = est.shrunk_cluster_errors

    def spy(weights: np.ndarray, errors: np.ndarray, *args: Any, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
        sizes.append(len(weights))
        return real(weights, errors, *args, **kw)

    monkeypatch.setattr(est, "shrunk_cluster_errors", spy)
    sel = est.select_params(task, (2, 4, 8), (None, 0.1), (1.0, 4.0), prior="difficulty")
    assert sel.sample_size == len(task.x_val) == 120
    assert sizes and set(sizes) == {120}  # every simulated profile: 120 prompts, not the 900 training ones
    assert len(sel.areas) == 3 * 2 * 2 and sel.areas[(sel.k, sel.temperature, sel.prior_strength)] == max(
        sel.areas.values())
    # the pool LLMs' labels play no part: garbage in them leaves the selection as it was
    monkeypatch.setattr(est, "shrunk_cluster_errors", real)
    garbage = noisy_task()
    garbage.val_scores = np.random.default_rng(9).random(garbage.val_scores.shape)
    garbage.pool_train_scores = None
    garbage.pool_costs = np.ones(4)
    again = est.select_params(garbage, (2, 4, 8), (None, 0.1), (1.0, 4.0), prior="difficulty")
    assert again.areas == sel.areas
    # a smaller validation set is simulated with smaller samples
    small = noisy_task(n_val=40)
    assert est.select_params(small, (2, 4), (None,), (2.0,)).sample_size == 40


def test_estimators_record_what_the_selection_chose() -> None:
    task = noisy_task()
    km = UniRouteKMeans(temperature="auto", prior="difficulty").fit(task)
    assert km.k_ in (5, 10, 20, 40, 80) and km.temperature_ in (0.05, 0.1, 0.2)
    assert km.difficulty_ is not None and km.difficulty_.shape == (km.k_,)
    lm = LearnedMap(k_grid=(2, 4)).fit(task)
    assert lm.k_ in (2, 4) and lm.prior_strength_ in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    with pytest.raises(ValueError, match="unknown prior"):
        UniRouteKMeans(n_clusters=2, prior="hierarchical").fit(task)


def test_peer_prior_selection_and_fit_never_read_other_pool_models() -> None:
    """The peer prior's selection simulates each training LLM from the other training LLMs (leave one out)
    and never reads the pool LLMs' labels; a pool model's Ψ depends on its own validation labels only."""
    import routing.estimators as est

    task = noisy_task()
    sel = est.select_params(task, (2, 4), (None,), (1.0, 64.0), prior="peer")
    garbage = noisy_task()
    garbage.val_scores = np.random.default_rng(9).random(garbage.val_scores.shape)
    garbage.pool_train_scores = None
    assert est.select_params(garbage, (2, 4), (None,), (1.0, 64.0), prior="peer").areas == sel.areas
    lm = LearnedMap(k_grid=(2, 4), prior="peer").fit(task)
    assert lm.prior_strength_ in est.PEER_M_GRID and lm.peer_psi_ is not None and lm.peer_psi_.shape == (8, lm.k_)
    assert lm.difficulty_ is not None and lm.difficulty_.shape == (4, lm.k_)
    # change pool model 3's labels: the other pool models' Ψ stay bit for bit (K, m and θ fixed)
    fixed = dict(n_clusters=lm.k_, prior_strength=lm.prior_strength_, prior="peer")
    a = LearnedMap(**fixed).fit(noisy_task())  # type: ignore[arg-type]
    other = noisy_task()
    other.val_scores = other.val_scores.copy()
    other.val_scores[:, 3] = 1.0 - other.val_scores[:, 3]
    b = LearnedMap(**fixed).fit(other)  # type: ignore[arg-type]
    assert np.array_equal(a.psi_[:3], b.psi_[:3]) and not np.array_equal(a.psi_[3], b.psi_[3])
