"""Routing estimators behind one interface: what the evaluation fits and measures.

Every estimator follows the scikit-learn contract: ``__init__`` only stores parameters,
``fit(task)`` learns (state in attributes ending ``_``) and returns ``self``.
The expected error is kept apart from the decision:

* ``expected_error(x)`` → expected-error matrix, shape (n_prompts, n_pool_models), in [0, 1];
* ``decide(errors, costs, lam, names)`` → models ranked best first by errors + λ·c/max c.

What is measured is what is served: the UniRoute estimators compute z(x) with
:class:`routing.clusters.Membership` and Σ_k z_k Ψ_k with
:func:`routing.decision.expected_errors`, and ``decide`` and the deferral curves decide
with :class:`routing.decision.Decider` (ties: the cheaper model, then the name) — the
same code the gateway's :class:`routing.artifact.UniRoutePolicy` runs on a fitted
artifact (``tests/test_served_equals_evaluated.py`` checks the two agree).

A :class:`RoutingTask` is what a policy may learn from: the training prompts with the
*training* LLMs' scores, the validation prompts with the training LLMs' and the pool
(test) LLMs' scores. Pool LLMs are seen only through their validation outcomes,
except by :class:`Clairvoyant`, which is an evaluation-only upper bound.

λ: the cost of model h is normalised by the pool's maximum cost, so the objective is
``expected_error(h) + λ · c(h) / max_h' c(h')`` and λ = 0.1 accepts paying the most
expensive model's full cost for 10 percentage points of expected error.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from routing.clusters import ClusterMap, Membership, softmax
from routing.decision import Decider, expected_errors, normalise
from routing.deferral import DEFAULT_LAMS, area, deferral_curve
from routing.profiles import shrunk_cluster_errors


@dataclass
class RoutingTask:
    """The data a policy is fitted on (one evaluation trial, or one deployment fit)."""

    x_train: np.ndarray  # (n_train, d) unit-norm prompt embeddings
    train_scores: np.ndarray  # (n_train, m_train): training LLMs on training prompts
    train_costs: np.ndarray  # (m_train,)
    x_val: np.ndarray  # (n_val, d)
    val_train_scores: np.ndarray  # (n_val, m_train): training LLMs on validation prompts
    val_scores: np.ndarray  # (n_val, m_pool): pool (test) LLMs on validation prompts
    pool_costs: np.ndarray  # (m_pool,)
    pool_names: list[str]
    pool_train_scores: np.ndarray | None = None  # (n_train, m_pool): for Clairvoyant only
    seed: int = 0
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def clusters(self, k: int) -> ClusterMap:
        """K-means on the training prompts, shared by every policy fitted on this task."""
        key = ("kmeans", k)
        if key not in self.cache:
            self.cache[key] = ClusterMap(k, random_state=self.seed).fit(self.x_train)
        cm: ClusterMap = self.cache[key]
        return cm


def decide(errors: np.ndarray, costs: np.ndarray, lam: float, names: Sequence[str] | None = None) -> np.ndarray:
    """Rank models for each prompt by errors + λ·c/max c, as the gateway does (:class:`Decider`):
    ties go to the cheaper model, then by ``names`` (pool position without names).

    ``errors`` (n, m) or (m,); returns indices of the same shape, best first.
    """
    return Decider(costs, names).rank(errors, lam)


class RouterEstimator:
    """Base class: the shared interface and the deferral-curve hook used by the evaluation."""

    name = "base"
    prompt_aware = True

    def fit(self, task: RoutingTask) -> RouterEstimator:
        raise NotImplementedError

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decide(self, errors: np.ndarray, costs: np.ndarray, lam: float,
               names: Sequence[str] | None = None) -> np.ndarray:
        return decide(errors, costs, lam, names)

    def curve(self, x: np.ndarray, true_scores: np.ndarray, costs: np.ndarray,
              lams: np.ndarray = DEFAULT_LAMS, names: Sequence[str] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Deferral curve on prompts ``x`` with known ``true_scores`` (n, m_pool)."""
        return deferral_curve(self.expected_error(x), true_scores, normalise(costs), lams, names)


# --------------------------------------------------------------------------- UniRoute

def _train_area(errors: np.ndarray, scores: np.ndarray, costs: np.ndarray) -> float:
    xs, ys = deferral_curve(errors, scores, normalise(costs), DEFAULT_LAMS[::4])
    return area(xs, ys)


def select_k(task: RoutingTask, grid: Sequence[int], prior_strength: float) -> int:
    """The paper's K selection with training LLMs only.

    For each K: fit Ψ of the training LLMs on the training prompts, route them on the
    validation prompts, and keep the K with the largest deferral area.
    """
    best_k, best = int(grid[0]), -np.inf
    for k in grid:
        cm = task.clusters(int(k))
        psi, _ = shrunk_cluster_errors(cm.weights(task.x_train), 1.0 - task.train_scores, prior_strength)
        a = _train_area(expected_errors(cm.weights(task.x_val), psi), task.val_train_scores, task.train_costs)
        if a > best:
            best_k, best = int(k), a
    return best_k


K_GRID = (5, 10, 20, 40, 80)


class UniRouteKMeans(RouterEstimator):
    """UniRoute with K-means clusters: hard nearest-centroid z(x) (or soft with ``temperature``).

    Ψ(h) of each pool model is its shrunk per-cluster validation error; the expected
    error of h on x is Σ_k z_k(x) Ψ_k(h). ``n_clusters``: an int, ``"auto"`` (the
    paper's selection over ``k_grid`` with training LLMs), or a sequence of ints for an
    ensemble that averages the expected errors over several K.
    """

    name = "uniroute-kmeans"

    def __init__(self, n_clusters: int | str | Sequence[int] = "auto", *, prior_strength: float = 2.0,
                 temperature: float | None = None, k_grid: Sequence[int] = K_GRID) -> None:
        self.n_clusters = n_clusters
        self.prior_strength = prior_strength
        self.temperature = temperature
        self.k_grid = k_grid

    def fit(self, task: RoutingTask) -> UniRouteKMeans:
        if self.n_clusters == "auto":
            ks = [select_k(task, self.k_grid, self.prior_strength)]
        elif isinstance(self.n_clusters, int):
            ks = [self.n_clusters]
        elif isinstance(self.n_clusters, str):
            raise ValueError(f"n_clusters must be an int, 'auto' or a list of ints, got {self.n_clusters!r}")
        else:
            ks = [int(k) for k in self.n_clusters]
        self.maps_ = [task.clusters(k) for k in ks]
        self.k_ = ks[0] if len(ks) == 1 else tuple(ks)
        self.psis_ = []
        for cm in self.maps_:
            psi, counts = shrunk_cluster_errors(cm.weights(task.x_val, self.temperature),
                                                1.0 - task.val_scores, self.prior_strength)
            self.psis_.append(psi)
        self.counts_ = counts
        return self

    @property
    def centroids_(self) -> np.ndarray:
        return self.maps_[0].centroids_

    @property
    def psi_(self) -> np.ndarray:
        return np.asarray(self.psis_[0])

    def membership(self, x: np.ndarray) -> np.ndarray:
        return self.maps_[0].weights(x, self.temperature)

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        errors = [expected_errors(cm.weights(x, self.temperature), psi)
                  for cm, psi in zip(self.maps_, self.psis_, strict=True)]
        return errors[0] if len(errors) == 1 else np.asarray(np.mean(errors, axis=0))


def _features(x: np.ndarray) -> np.ndarray:
    return np.hstack([np.asarray(x, dtype=np.float64), np.ones((len(x), 1))])


class LearnedMap(RouterEstimator):
    """UniRoute LearnedMap: z(x) = softmax(θᵀφ(x)), φ(x) = [x, 1].

    θ is trained by log-loss on the training LLMs' correctness with their Ψ held fixed
    (Ψ from hard K-means on the training prompts):
    P(correct | x, h) = 1 − Σ_k z_k(x) Ψ_k(h). θ starts at the soft K-means map
    softmax(−β‖x − μ_k‖²) and is L2-regularised toward it; it is frozen afterwards.
    Pool models' Ψ are their validation errors weighted by z(x).
    """

    name = "uniroute-learnedmap"

    def __init__(self, n_clusters: int | str = "auto", *, prior_strength: float = 2.0, beta: float = 10.0,
                 l2: float = 1e-3, max_iter: int = 150, k_grid: Sequence[int] = K_GRID) -> None:
        self.n_clusters = n_clusters
        self.prior_strength = prior_strength
        self.beta = beta
        self.l2 = l2
        self.max_iter = max_iter
        self.k_grid = k_grid

    def fit(self, task: RoutingTask) -> LearnedMap:
        from scipy.optimize import minimize

        if self.n_clusters == "auto":
            k = select_k(task, self.k_grid, self.prior_strength)
        elif isinstance(self.n_clusters, int):
            k = self.n_clusters
        else:
            raise ValueError(f"n_clusters must be an int or 'auto', got {self.n_clusters!r}")
        cm = task.clusters(k)
        self.k_ = k
        self.centroids_ = cm.centroids_
        psi_train, _ = shrunk_cluster_errors(cm.weights(task.x_train), 1.0 - task.train_scores,
                                             self.prior_strength)
        acc = 1.0 - psi_train  # (m_train, K)
        phi = _features(task.x_train)
        y = np.asarray(task.train_scores, dtype=np.float64)
        theta0 = self.beta * cm.membership().theta  # (d+1, K): softmax(β(2x·μ − ‖μ‖²)) = soft K-means, τ = 1/β
        shape = theta0.shape
        nm = y.size
        eps = 1e-6

        def loss(flat: np.ndarray) -> tuple[float, np.ndarray]:
            theta = flat.reshape(shape)
            z = softmax(phi @ theta)
            p = np.clip(z @ acc.T, eps, 1 - eps)
            diff = theta - theta0
            val = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum() / nm + 0.5 * self.l2 * (diff * diff).sum()
            g = (-y / p + (1 - y) / (1 - p)) / nm  # dL/dp (n, m)
            ga = g @ acc  # (n, K)
            du = z * (ga - (g * p).sum(1, keepdims=True))
            grad = phi.T @ du + self.l2 * diff
            return float(val), grad.ravel()

        res = minimize(loss, theta0.ravel(), jac=True, method="L-BFGS-B",
                       options={"maxiter": self.max_iter})
        self.theta_ = res.x.reshape(shape)
        self.train_loss_ = float(res.fun)
        self.psi_, self.counts_ = shrunk_cluster_errors(self.membership(task.x_val), 1.0 - task.val_scores,
                                                        self.prior_strength)
        return self

    def membership(self, x: np.ndarray) -> np.ndarray:
        return Membership.learned(self.theta_)(np.atleast_2d(x))

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        return expected_errors(self.membership(x), self.psi_)


class LearnedMapEnsemble(RouterEstimator):
    """The mean expected error of LearnedMap routers fitted with several K (an ensemble over K)."""

    name = "uniroute-learnedmap-ens"

    def __init__(self, ks: Sequence[int] = (10, 20, 40), **params: Any) -> None:
        self.ks = ks
        self.params = params

    def fit(self, task: RoutingTask) -> LearnedMapEnsemble:
        self.members_ = [LearnedMap(n_clusters=int(k), **self.params).fit(task) for k in self.ks]
        return self

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.mean([m.expected_error(x) for m in self.members_], axis=0))


# --------------------------------------------------------------------------- baselines

class KNNRouter(RouterEstimator):
    """Expected error = mean error of the k nearest validation prompts (cosine).

    ``k="auto"`` tunes k on the training LLMs: training prompts query the validation
    prompts, and the k with the largest deferral area of the training LLMs wins.
    """

    name = "knn"

    def __init__(self, k: int | str = "auto", *, k_grid: Sequence[int] = (5, 10, 20, 40, 80, 160),
                 n_tune: int = 2000) -> None:
        self.k = k
        self.k_grid = k_grid
        self.n_tune = n_tune

    @staticmethod
    def _neighbour_means(x: np.ndarray, ref: np.ndarray, errors: np.ndarray, ks: Sequence[int]
                         ) -> dict[int, np.ndarray]:
        kmax = min(max(ks), len(ref))
        sims = np.asarray(x, dtype=np.float32) @ np.asarray(ref, dtype=np.float32).T
        idx = np.argpartition(-sims, kmax - 1, axis=1)[:, :kmax]
        order = np.argsort(-np.take_along_axis(sims, idx, axis=1), axis=1)
        idx = np.take_along_axis(idx, order, axis=1)
        csum = np.cumsum(errors[idx], axis=1)  # (n, kmax, m)
        return {k: csum[:, min(k, kmax) - 1, :] / min(k, kmax) for k in ks}

    def fit(self, task: RoutingTask) -> KNNRouter:
        self.x_val_ = np.asarray(task.x_val, dtype=np.float32)
        self.errors_ = 1.0 - np.asarray(task.val_scores, dtype=np.float64)
        if self.k == "auto":
            rng = np.random.default_rng(task.seed)
            n = len(task.x_train)
            rows = rng.choice(n, size=min(self.n_tune, n), replace=False)
            means = self._neighbour_means(task.x_train[rows], task.x_val, 1.0 - task.val_train_scores,
                                          self.k_grid)
            areas = {k: _train_area(e, task.train_scores[rows], task.train_costs) for k, e in means.items()}
            self.k_ = max(areas, key=lambda k: areas[k])
        elif isinstance(self.k, int):
            self.k_ = self.k
        else:
            raise ValueError(f"k must be an int or 'auto', got {self.k!r}")
        return self

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        return self._neighbour_means(np.atleast_2d(x), self.x_val_, self.errors_, [self.k_])[self.k_]


class ZeroRouter(RouterEstimator):
    """Prompt-agnostic: the upper convex hull of (cost, validation accuracy) of the pool.

    A budget between two hull points is met by randomising between them; its deferral
    curve is therefore the hull itself, which the λ sweep over constant errors traces
    (vertices) and the Area's linear interpolation joins (the randomised mixtures).
    """

    name = "zero-router"
    prompt_aware = False

    def fit(self, task: RoutingTask) -> ZeroRouter:
        self.errors_ = 1.0 - np.asarray(task.val_scores, dtype=np.float64).mean(axis=0)
        self.costs_ = normalise(task.pool_costs)
        self.hull_ = self._hull(self.costs_, 1.0 - self.errors_)
        return self

    @staticmethod
    def _hull(costs: np.ndarray, acc: np.ndarray) -> list[int]:
        """Indices of the upper-left convex hull vertices, by increasing cost."""
        order = sorted(range(len(costs)), key=lambda j: (costs[j], -acc[j]))
        hull: list[int] = []
        for j in order:
            if hull and acc[j] <= acc[hull[-1]]:
                continue
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                cross = (costs[b] - costs[a]) * (acc[j] - acc[a]) - (acc[b] - acc[a]) * (costs[j] - costs[a])
                if cross >= 0:  # b lies on or below the segment a→j
                    hull.pop()
                else:
                    break
            hull.append(j)
        return hull

    def mixture(self, budget: float) -> tuple[int, int, float]:
        """(cheaper hull model, dearer hull model, probability of the dearer) meeting ``budget``."""
        h = self.hull_
        c = self.costs_
        if budget <= c[h[0]]:
            return h[0], h[0], 0.0
        for a, b in itertools.pairwise(h):
            if budget <= c[b]:
                return a, b, float((budget - c[a]) / (c[b] - c[a]))
        return h[-1], h[-1], 1.0

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.errors_, (len(x), len(self.errors_))).copy()


class Clairvoyant(RouterEstimator):
    """Evaluation-only upper bound: per-pool-model L2-regularised logistic regressions on the
    embedding, trained with the pool models' OWN labels on the training and validation prompts
    (which a real router never sees). All models are fitted jointly by L-BFGS (one matrix)."""

    name = "clairvoyant"

    def __init__(self, l2: float = 1e-3, max_iter: int = 200) -> None:
        self.l2 = l2
        self.max_iter = max_iter

    def fit(self, task: RoutingTask) -> Clairvoyant:
        from scipy.optimize import minimize

        if task.pool_train_scores is None:
            raise ValueError("Clairvoyant needs the pool models' training labels (pool_train_scores)")
        phi = _features(np.vstack([task.x_train, task.x_val]))
        y = np.vstack([task.pool_train_scores, task.val_scores]).astype(np.float64)
        n = len(phi)
        shape = (phi.shape[1], y.shape[1])
        p0 = np.clip(y.mean(0), 1e-3, 1 - 1e-3)
        w0 = np.zeros(shape)
        w0[-1] = np.log(p0 / (1 - p0))

        def loss(flat: np.ndarray) -> tuple[float, np.ndarray]:
            w = flat.reshape(shape)
            u = phi @ w
            val = (np.logaddexp(0.0, u) - y * u).sum() / n + 0.5 * self.l2 * (w[:-1] ** 2).sum()
            g = phi.T @ (1.0 / (1.0 + np.exp(-u)) - y) / n
            g[:-1] += self.l2 * w[:-1]
            return float(val), g.ravel()

        res = minimize(loss, w0.ravel(), jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter})
        self.coef_ = res.x.reshape(shape)
        return self

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        u = _features(np.atleast_2d(x)) @ self.coef_
        return np.asarray(1.0 - 1.0 / (1.0 + np.exp(-u)))


class RandomRouter(RouterEstimator):
    """Random expected errors (uniform in [0,1], fresh per prompt); λ trades them against cost."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, task: RoutingTask) -> RandomRouter:
        self.m_ = len(task.pool_names)
        self.rng_ = np.random.default_rng(self.seed + task.seed)
        return self

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        return self.rng_.uniform(size=(len(x), self.m_))


class AlwaysMostAccurate(RouterEstimator):
    """Always the pool model with the best validation accuracy (one point)."""

    name = "most-accurate"
    prompt_aware = False

    def fit(self, task: RoutingTask) -> AlwaysMostAccurate:
        acc = np.asarray(task.val_scores).mean(axis=0)
        self.choice_ = int(np.argmax(acc))
        self.m_ = len(acc)
        return self

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        e = np.ones((len(x), self.m_))
        e[:, self.choice_] = 0.0
        return e

    def curve(self, x: np.ndarray, true_scores: np.ndarray, costs: np.ndarray,
              lams: np.ndarray = DEFAULT_LAMS, names: Sequence[str] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray([normalise(costs)[self.choice_]]),
                np.asarray([np.asarray(true_scores)[:, self.choice_].mean()]))


class AlwaysCheapest(AlwaysMostAccurate):
    """Always the cheapest pool model (one point)."""

    name = "cheapest"

    def fit(self, task: RoutingTask) -> AlwaysCheapest:
        acc = np.asarray(task.val_scores).mean(axis=0)
        c = np.asarray(task.pool_costs)
        self.choice_ = int(min(range(len(c)), key=lambda j: (c[j], -acc[j])))
        self.m_ = len(c)
        return self


def make_policy(name: str, **params: Any) -> RouterEstimator:
    """Build a policy by its evaluation name (see :data:`POLICIES`)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(POLICIES)}") from None
    return factory(**params)


POLICIES: dict[str, Any] = {
    "zero-router": ZeroRouter,
    "knn": KNNRouter,
    "uniroute-kmeans": UniRouteKMeans,
    "uniroute-learnedmap": LearnedMap,
    "uniroute-learnedmap-ens": LearnedMapEnsemble,
    "clairvoyant": Clairvoyant,
    "random": RandomRouter,
    "most-accurate": AlwaysMostAccurate,
    "cheapest": AlwaysCheapest,
}
