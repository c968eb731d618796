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
from typing import Any, Self

import numpy as np

from routing.clusters import ClusterMap, Membership, softmax
from routing.decision import Decider, expected_errors, normalise
from routing.deferral import DEFAULT_LAMS, area, deferral_curve
from routing.profiles import (
    PEER_PSI_STRENGTH,
    PEER_WEIGHTINGS,
    PRIORS,
    cluster_difficulty,
    peer_offsets,
    peer_prior_offsets,
    peer_weights,
    shrunk_cluster_errors,
)


class LabelOracle:
    """The pool (new) models' labels on the candidate validation prompts, revealed only on request.

    Active profiling (:class:`LearnedMapActive`) asks for the labels of the prompts it chooses, at
    most ``budget`` per model; every position asked is recorded in ``asked`` (the evaluation's
    honesty check: labels never asked cannot change the result)."""

    def __init__(self, scores: np.ndarray, budget: int) -> None:
        self._scores = np.asarray(scores, dtype=np.float64)
        if budget < 1:
            raise ValueError(f"label budget must be at least 1, got {budget}")
        self.budget = int(budget)
        self.asked: list[list[int]] = [[] for _ in range(self._scores.shape[1])]

    @property
    def n_models(self) -> int:
        return int(self._scores.shape[1])

    def ask(self, model: int, rows: np.ndarray) -> np.ndarray:
        """Scores of pool model ``model`` on candidate positions ``rows`` (each at most once, within the budget)."""
        r = [int(i) for i in np.asarray(rows).reshape(-1)]
        seen = set(self.asked[model])
        if len(set(r)) != len(r) or seen.intersection(r):
            raise ValueError("a candidate prompt was asked twice")
        if len(seen) + len(r) > self.budget:
            raise ValueError(f"label budget {self.budget} exceeded for pool model {model}")
        self.asked[model] += r
        return self._scores[r, model].copy()


@dataclass
class ActivePool:
    """What active profiling chooses from: every candidate validation prompt, the training LLMs' labels
    on them (known), and the pool models' labels behind a :class:`LabelOracle` with the label budget."""

    x: np.ndarray  # (n_candidates, d)
    train_scores: np.ndarray  # (n_candidates, m_train)
    oracle: LabelOracle


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
    #: for active profiling: all candidate validation prompts and the pool's labels behind an oracle
    #: (x_val / val_scores above are then the uniform random subset of the same size, for the others)
    candidates: ActivePool | None = None
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
              lams: np.ndarray | None = None, names: Sequence[str] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Deferral curve on prompts ``x`` with known ``true_scores`` (n, m_pool).

        Without ``lams``: the evaluation's sweep, :data:`DEFAULT_LAMS` with both ends of the curve
        made exact (:func:`routing.deferral.sweep`). With ``lams``: one point per given λ, in order.
        """
        ends = lams is None
        return deferral_curve(self.expected_error(x), true_scores, normalise(costs),
                              DEFAULT_LAMS if lams is None else lams, names, ends=ends)


# --------------------------------------------------------------------------- UniRoute

def _train_area(errors: np.ndarray, scores: np.ndarray, costs: np.ndarray) -> float:
    xs, ys = deferral_curve(errors, scores, normalise(costs), DEFAULT_LAMS[::4])
    return area(xs, ys)


K_GRID = (5, 10, 20, 40, 80)
#: soft K-means temperatures and prior strengths the selection chooses from ("auto")
TAU_GRID = (0.05, 0.1, 0.2)
M_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
#: the peer prior's strengths: its centre is model-specific, so the selection may trust it more
PEER_M_GRID = (*M_GRID, 64.0, 128.0)
#: the profile prior of the UniRoute estimators, ``router fit`` and ``uniroute profile`` (issue 15)
DEFAULT_PRIOR = "flat"
SELECTION_REPEATS = 4
#: the (fixed) shrinkage of the training LLMs' hard K-means Ψ that LearnedMap's θ is trained against
THETA_PRIOR_STRENGTH = 2.0


@dataclass(frozen=True)
class Selection:
    """What :func:`select_params` chose, and the evidence: the mean simulated Area of each candidate."""

    k: int
    temperature: float | None
    prior_strength: float
    sample_size: int  # prompts per simulated profile (= the validation set's size)
    repeats: int
    areas: dict[tuple[int, float | None, float], float]


def select_params(task: RoutingTask, ks: Sequence[int], temperatures: Sequence[float | None] = (None,),
                  strengths: Sequence[float] = (2.0,), *, prior: str = DEFAULT_PRIOR,
                  repeats: int = SELECTION_REPEATS) -> Selection:
    """Choose K, the soft K-means temperature τ and the prior strength m at the validation noise level,
    with the training LLMs only.

    A new model is profiled on the ``len(task.x_val)`` validation prompts, so each candidate is scored
    the same way: the training LLMs' Ψ are estimated from ``repeats`` random samples of that many
    *training* prompts (the same samples for every candidate), and those noisy profiles route the
    training LLMs on the validation prompts; the candidate with the largest mean deferral Area wins
    (ties: the first in grid order). The difficulty prior's δ is computed, for each training LLM,
    without that LLM (leave one out), as it would be for a model the router has never seen. The peer
    prior of a simulated training LLM mixes the *other* training LLMs only (leave one out), weighted by
    their errors on the same sampled prompts, with their Ψ from the training prompts outside the sample.
    Pool (test) LLMs' labels are never read.
    """
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; valid: {', '.join(PRIORS)}")
    n_val, n_train = len(task.x_val), len(task.x_train)
    size = min(n_val, n_train)
    rng = np.random.default_rng([task.seed, 15])
    samples = [np.sort(rng.choice(n_train, size=size, replace=False)) for _ in range(repeats)]
    e_train = 1.0 - np.asarray(task.train_scores, dtype=np.float64)
    n_models = e_train.shape[1]
    rests = [np.setdiff1d(np.arange(n_train), rows) for rows in samples]
    peer_w = ([peer_weights(e_train[rows], e_train[rows], allowed=~np.eye(n_models, dtype=bool),
                            method=PEER_WEIGHTINGS[prior]) for rows in samples]
              if prior in PEER_WEIGHTINGS else [])
    areas: dict[tuple[int, float | None, float], float] = {}
    for k in ks:
        cm = task.clusters(int(k))
        for tau in temperatures:
            w_tr, w_va = cm.weights(task.x_train, tau), cm.weights(task.x_val, tau)
            delta = cluster_difficulty(w_tr, e_train, leave_one_out=True) if prior == "difficulty" else None
            deltas = [delta] * len(samples)
            if prior in PEER_WEIGHTINGS:  # each sample's δ: the other LLMs' Ψ from the prompts outside the sample
                deltas = [peer_offsets(pw, shrunk_cluster_errors(w_tr[rest], e_train[rest], PEER_PSI_STRENGTH)[0])
                          for pw, rest in zip(peer_w, rests, strict=True)]
            for m in strengths:
                vals = []
                for rows, d in zip(samples, deltas, strict=True):
                    psi, _ = shrunk_cluster_errors(w_tr[rows], e_train[rows], m, d)
                    vals.append(_train_area(expected_errors(w_va, psi), task.val_train_scores, task.train_costs))
                areas[(int(k), tau, float(m))] = float(np.mean(vals))
    best = max(areas, key=lambda key: areas[key])  # first maximum in grid order
    return Selection(k=best[0], temperature=best[1], prior_strength=best[2], sample_size=size, repeats=repeats,
                     areas=areas)


def select_k(task: RoutingTask, grid: Sequence[int], prior_strength: float, temperature: float | None = None,
             *, prior: str = DEFAULT_PRIOR) -> int:
    """K alone, by :func:`select_params` (validation-sized profiles of the training LLMs)."""
    return select_params(task, grid, (temperature,), (prior_strength,), prior=prior).k


def _candidates(value: Any, auto: Sequence[Any]) -> list[Any]:
    return list(auto) if isinstance(value, str) and value == "auto" else [value]


def _check_prior(prior: str) -> str:
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; valid: {', '.join(PRIORS)}")
    return prior


def _strength_grid(prior: str) -> tuple[float, ...]:
    return PEER_M_GRID if prior in PEER_WEIGHTINGS else M_GRID


def _pool_offsets(task: RoutingTask, w_train: np.ndarray, prior: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(δ, peer Ψ): δ (K,) of the difficulty prior, or (m_pool, K) of the peer prior for the pool models; the
    training LLMs' Ψ (m_train, K) the peer prior mixes (None for the other priors)."""
    e_train = 1.0 - np.asarray(task.train_scores, dtype=np.float64)
    if prior == "difficulty":
        return cluster_difficulty(w_train, e_train), None
    if prior in PEER_WEIGHTINGS:
        peer_psi, _ = shrunk_cluster_errors(w_train, e_train, PEER_PSI_STRENGTH)
        return peer_prior_offsets(1.0 - np.asarray(task.val_scores, dtype=np.float64),
                                  1.0 - np.asarray(task.val_train_scores, dtype=np.float64), peer_psi,
                                  method=PEER_WEIGHTINGS[prior]), peer_psi
    return None, None


class UniRouteKMeans(RouterEstimator):
    """UniRoute with K-means clusters: hard nearest-centroid z(x) (or soft with ``temperature``).

    Ψ(h) of each pool model is its shrunk per-cluster validation error; the expected
    error of h on x is Σ_k z_k(x) Ψ_k(h). ``n_clusters``: an int, ``"auto"`` (chosen over
    ``k_grid`` with training LLMs, :func:`select_params`), or a sequence of ints for an
    ensemble that averages the expected errors over several K. ``temperature`` (None = hard,
    a float, or ``"auto"`` over :data:`TAU_GRID`) and ``prior_strength`` (a float or ``"auto"``
    over :data:`M_GRID`) are chosen the same way, with K (per member for an ensemble).
    ``prior``: ``"flat"``, ``"difficulty"``, or (evaluation only) ``"peer"`` / ``"peer-similarity"`` (:mod:`routing.profiles`).
    """

    name = "uniroute-kmeans"

    def __init__(self, n_clusters: int | str | Sequence[int] = "auto", *, prior_strength: float | str = "auto",
                 temperature: float | str | None = None, k_grid: Sequence[int] = K_GRID,
                 prior: str = DEFAULT_PRIOR) -> None:
        self.n_clusters = n_clusters
        self.prior_strength = prior_strength
        self.temperature = temperature
        self.k_grid = k_grid
        self.prior = prior

    def fit(self, task: RoutingTask) -> UniRouteKMeans:
        prior = _check_prior(self.prior)
        taus = _candidates(self.temperature, TAU_GRID)
        ms = _candidates(self.prior_strength, _strength_grid(prior))
        if self.n_clusters == "auto":
            groups = [list(self.k_grid)]
        elif isinstance(self.n_clusters, int):
            groups = [[self.n_clusters]]
        elif isinstance(self.n_clusters, str):
            raise ValueError(f"n_clusters must be an int, 'auto' or a list of ints, got {self.n_clusters!r}")
        else:
            groups = [[int(k)] for k in self.n_clusters]
        params: list[tuple[int, float | None, float]] = []
        for ks in groups:
            if len(ks) * len(taus) * len(ms) == 1:
                params.append((ks[0], taus[0], float(ms[0])))
            else:
                sel = select_params(task, ks, taus, ms, prior=prior)
                self.selection_ = sel
                params.append((sel.k, sel.temperature, sel.prior_strength))
        self.params_ = params
        self.maps_ = [task.clusters(k) for k, _, _ in params]
        self.k_ = params[0][0] if len(params) == 1 else tuple(k for k, _, _ in params)
        self.temperature_ = params[0][1]
        self.prior_strength_ = params[0][2]
        self.psis_ = []
        self.difficulties_: list[np.ndarray | None] = []
        self.peer_psis_: list[np.ndarray | None] = []
        for cm, (_, tau, m) in zip(self.maps_, params, strict=True):
            delta, peer_psi = _pool_offsets(task, cm.weights(task.x_train, tau), prior)
            psi, counts = shrunk_cluster_errors(cm.weights(task.x_val, tau), 1.0 - task.val_scores, m, delta)
            self.psis_.append(psi)
            self.difficulties_.append(delta)
            self.peer_psis_.append(peer_psi)
        self.counts_ = counts
        return self

    @property
    def centroids_(self) -> np.ndarray:
        return self.maps_[0].centroids_

    @property
    def psi_(self) -> np.ndarray:
        return np.asarray(self.psis_[0])

    @property
    def difficulty_(self) -> np.ndarray | None:
        """δ of the difficulty prior (K,), or of the peer prior for the pool models (m_pool, K); None if flat."""
        return self.difficulties_[0]

    @property
    def peer_psi_(self) -> np.ndarray | None:
        """The training LLMs' Ψ (m_train, K) the peer prior mixes; None for the other priors."""
        return self.peer_psis_[0]

    def membership(self, x: np.ndarray) -> np.ndarray:
        return self.maps_[0].weights(x, self.temperature_)

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        errors = [expected_errors(cm.weights(x, tau), psi)
                  for cm, (_, tau, _), psi in zip(self.maps_, self.params_, self.psis_, strict=True)]
        return errors[0] if len(errors) == 1 else np.asarray(np.mean(errors, axis=0))


def _features(x: np.ndarray) -> np.ndarray:
    return np.hstack([np.asarray(x, dtype=np.float64), np.ones((len(x), 1))])


class LearnedMap(RouterEstimator):
    """UniRoute LearnedMap: z(x) = softmax(θᵀφ(x)), φ(x) = [x, 1].

    θ is trained by log-loss on the training LLMs' correctness with their Ψ held fixed
    (Ψ from hard K-means on the training prompts):
    P(correct | x, h) = 1 − Σ_k z_k(x) Ψ_k(h). θ starts at the soft K-means map
    softmax(−β‖x − μ_k‖²) and is L2-regularised toward it; it is frozen afterwards.
    Pool models' Ψ are their validation errors weighted by z(x), shrunk with ``prior``
    (``"flat"``, ``"difficulty"``, ``"peer"`` or ``"peer-similarity"``) and strength ``prior_strength`` (a float or
    ``"auto"``; over :data:`PEER_M_GRID` for the peer priors).
    K and m are chosen by :func:`select_params` with θ's starting map (soft K-means, τ = 1/β).
    """

    name = "uniroute-learnedmap"

    def __init__(self, n_clusters: int | str = "auto", *, prior_strength: float | str = "auto", beta: float = 10.0,
                 l2: float = 1e-3, max_iter: int = 150, k_grid: Sequence[int] = K_GRID,
                 prior: str = DEFAULT_PRIOR) -> None:
        self.n_clusters = n_clusters
        self.prior_strength = prior_strength
        self.beta = beta
        self.l2 = l2
        self.max_iter = max_iter
        self.k_grid = k_grid
        self.prior = prior

    def fit(self, task: RoutingTask) -> Self:
        prior = _check_prior(self.prior)
        if self.n_clusters == "auto":
            ks = list(self.k_grid)
        elif isinstance(self.n_clusters, int):
            ks = [self.n_clusters]
        else:
            raise ValueError(f"n_clusters must be an int or 'auto', got {self.n_clusters!r}")
        ms = _candidates(self.prior_strength, _strength_grid(prior))
        if len(ks) * len(ms) == 1:
            k, m = ks[0], float(ms[0])
        else:
            # K and m are chosen with θ's starting map, soft K-means at τ = 1/β (training θ for every K
            # would cost K-grid times the fit); θ is then trained for the chosen K only
            sel = select_params(task, ks, (1.0 / self.beta,), ms, prior=prior)
            self.selection_ = sel
            k, m = sel.k, sel.prior_strength
        self.k_ = k
        self.prior_strength_ = m
        cm = task.clusters(k)
        self.centroids_ = cm.centroids_
        key = ("learnedmap-theta", k, self.beta, self.l2, self.max_iter)
        if key not in task.cache:  # θ depends on the training prompts and LLMs only: shared across val sizes
            task.cache[key] = self._train_theta(task, cm)
        self.theta_, self.train_loss_ = task.cache[key]
        z_train = self.membership(task.x_train)
        # δ (K,) of the difficulty prior, or (m_pool, K) of the peer prior; the training LLMs' Ψ it mixes
        self.difficulty_, self.peer_psi_ = _pool_offsets(task, z_train, prior)
        self._profile_pool(task, m)
        return self

    def _profile_pool(self, task: RoutingTask, m: float) -> None:
        """Ψ of the pool models from their validation labels (the uniform sample ``task.val_scores``)."""
        self.psi_, self.counts_ = shrunk_cluster_errors(self.membership(task.x_val), 1.0 - task.val_scores,
                                                        m, self.difficulty_)

    def _train_theta(self, task: RoutingTask, cm: ClusterMap) -> tuple[np.ndarray, float]:
        from scipy.optimize import minimize

        psi_train, _ = shrunk_cluster_errors(cm.weights(task.x_train), 1.0 - task.train_scores,
                                             THETA_PRIOR_STRENGTH)
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
        return res.x.reshape(shape), float(res.fun)

    def membership(self, x: np.ndarray) -> np.ndarray:
        return Membership.learned(self.theta_)(np.atleast_2d(x))

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        return expected_errors(self.membership(x), self.psi_)


#: how :class:`LearnedMapActive` chooses each new model's labels
LEARNEDMAP_ALLOCATIONS = ("active", "uniform", "shared", "informative")


class LearnedMapActive(LearnedMap):
    """LearnedMap whose pool models are profiled by active allocation (:mod:`routing.active`).

    Everything but Ψ is LearnedMap's (θ, K, m). Each pool model gets the same number of labels as
    the uniform sample would give it (the oracle's budget), chosen among all candidate validation
    prompts by ``allocation``:

    * ``"active"``: per model, by cluster, in ``rounds`` rounds, from its own labels so far
      (:func:`routing.active.choose_and_label`; ``power`` p, ``weight`` ``"traffic"`` or
      ``"disagreement"``: the spread of the training LLMs' Ψ on the candidates);
    * ``"uniform"``: per model, a seeded uniform sample (the control of ``"active"``);
    * ``"shared"``: one cluster allocation for every model, from the training LLMs' Ψ only;
    * ``"informative"``: one sample for every model, prompts drawn by the training LLMs' disagreement on
      them (:func:`routing.active.informativeness`).

    Ψ is estimated with importance weights (``reweight``; inverse inclusion probabilities for
    ``"informative"``; none for ``"uniform"``). Without ``task.candidates`` it is plain LearnedMap.
    """

    name = "uniroute-learnedmap-active"

    def __init__(self, n_clusters: int | str = "auto", *, weight: str = "traffic", rounds: int = 4,
                 power: float = 2.0, reweight: bool = True, allocation: str = "active", **params: Any) -> None:
        super().__init__(n_clusters, **params)
        self.allocation = allocation
        self.weight = weight
        self.rounds = rounds
        self.power = power
        self.reweight = reweight

    def _profile_pool(self, task: RoutingTask, m: float) -> None:
        from routing.active import (
            choose_and_label,
            disagreement,
            hard_clusters,
            importance_weights,
            traffic_shares,
        )

        if self.allocation not in LEARNEDMAP_ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; valid: {', '.join(LEARNEDMAP_ALLOCATIONS)}")
        if self.prior in PEER_WEIGHTINGS and task.candidates is not None:
            raise ValueError("active allocation is not implemented with the peer prior")
        pool = task.candidates
        if pool is None:
            super()._profile_pool(task, m)
            return
        z = self.membership(pool.x)
        k = z.shape[1]
        spread = None
        if self.weight == "disagreement":
            psi_known, _ = shrunk_cluster_errors(z, 1.0 - np.asarray(pool.train_scores, dtype=np.float64), m)
            spread = disagreement(psi_known)
        clusters = hard_clusters(z)
        shares = traffic_shares(clusters, k)
        psis: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        asked: list[int] = []
        shared: tuple[np.ndarray, np.ndarray] | None = None
        if self.allocation == "informative":  # one design for every new model, from the known models' labels only
            from routing.active import inclusion_probabilities, informativeness, systematic_sample

            pi = inclusion_probabilities(informativeness(pool.train_scores), pool.oracle.budget)
            rows_shared = systematic_sample(pi, [task.seed, 16])
            shared = (rows_shared, 1.0 / pi[rows_shared])
        elif self.allocation == "shared":  # one cluster allocation for every new model, from the known models
            from routing.active import allocate, cluster_weights

            psi_known, _ = shrunk_cluster_errors(z, 1.0 - np.asarray(pool.train_scores, dtype=np.float64), m)
            extra = allocate(np.zeros(k), np.bincount(clusters, minlength=k), pool.oracle.budget,
                             cluster_weights(shares, self.weight, disagreement(psi_known), self.power),
                             (psi_known * (1.0 - psi_known)).mean(axis=0), m)
            order = np.random.default_rng([task.seed, 17]).permutation(len(z))
            rows_shared = np.sort(np.concatenate([order[clusters[order] == c][:extra[c]] for c in range(k)]))
            shared = (rows_shared, importance_weights(clusters[rows_shared], shares))
        for j in range(pool.oracle.n_models):
            if shared is not None:
                rows, v = shared
                psi, cnt = shrunk_cluster_errors(z[rows], 1.0 - pool.oracle.ask(j, rows)[:, None], m, self.difficulty_,
                                                 v * (len(v) / v.sum()))
                psis.append(psi[0])
                counts.append(cnt)
                asked.append(len(rows))
                continue
            if self.allocation == "uniform":  # the control: a fresh uniform sample of the same size, via the oracle
                rows = np.sort(np.random.default_rng([task.seed, 15, j]).permutation(len(z))[:pool.oracle.budget])
                psi, cnt = shrunk_cluster_errors(z[rows], 1.0 - pool.oracle.ask(j, rows)[:, None], m, self.difficulty_)
                psis.append(psi[0])
                counts.append(cnt)
                asked.append(len(rows))
                continue
            oracle = pool.oracle

            def label(rows: np.ndarray, j: int = j, oracle: LabelOracle = oracle) -> np.ndarray:
                return 1.0 - oracle.ask(j, rows)

            res = choose_and_label(z, pool.oracle.budget, label,
                                   prior_strength=m, seed=[task.seed, 15, j], rounds=self.rounds,
                                   weight=self.weight, spread=spread, shares=shares, power=self.power)
            iw = importance_weights(clusters[res.rows], shares) if self.reweight else None
            psi, cnt = shrunk_cluster_errors(z[res.rows], res.errors[:, None], m, self.difficulty_, iw)
            psis.append(psi[0])
            counts.append(cnt)
            asked.append(len(res.rows))
        self.psi_ = np.stack(psis)
        self.counts_ = np.stack(counts)
        self.labels_used_ = asked


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


class LearnedMapKNN(RouterEstimator):
    """LearnedMap's expected error averaged with K-NN's: the cluster profile Ψ(h) and the new model's errors on
    the nearest validation prompts (evaluation only: measured against the headline, not adopted)."""

    name = "uniroute-learnedmap-knn"

    def __init__(self, weight: float = 0.5, **params: Any) -> None:
        self.weight = weight
        self.params = params

    def fit(self, task: RoutingTask) -> LearnedMapKNN:
        self.learnedmap_ = LearnedMap(**self.params).fit(task)
        self.knn_ = KNNRouter().fit(task)
        return self

    def expected_error(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.weight * self.learnedmap_.expected_error(x)
                          + (1.0 - self.weight) * self.knn_.expected_error(x))


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
              lams: np.ndarray | None = None, names: Sequence[str] | None = None
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
    "uniroute-learnedmap-knn": LearnedMapKNN,
    "uniroute-learnedmap-active": LearnedMapActive,
    "clairvoyant": Clairvoyant,
    "random": RandomRouter,
    "most-accurate": AlwaysMostAccurate,
    "cheapest": AlwaysCheapest,
}
