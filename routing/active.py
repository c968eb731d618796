"""Which validation prompts a new model is profiled on, and when profiling may stop (issue 15).

A new model's profile Ψ_k is a per-cluster error rate; by default it is estimated from a uniform
random sample of validation prompts, so cluster k gets about n·f_k labels (f_k: the cluster's share
of the prompts, i.e. of the traffic). **Active allocation** spends the same n labels where they
reduce the traffic-weighted uncertainty of Ψ most, in rounds, using the model's own labels from the
rounds before:

* each candidate prompt belongs to the cluster of its largest membership z_k(x);
* the posterior of cluster k after n_k labels with prior strength m has variance about
  v_k / (n_k + m), v_k = Ψ̂_k(1 − Ψ̂_k) from the current posterior mean (0.25 before any label);
* the next label goes to the cluster with the largest gain
  w_k · v_k · (1/(n_k + m) − 1/(n_k + m + 1)), w_k = f_k (``weight="traffic"``) or
  f_k · d_k² / mean(d²) (``weight="disagreement"``, d_k: the spread of the known models' Ψ_k);
  within a cluster the prompts are taken in a seeded random order. Greedy on this gain gives
  n_k + m ∝ √(w_k v_k): more labels than uniform sampling for small clusters and uncertain ones,
  fewer for large, settled ones.

Sampling clusters unevenly biases the model's overall error ē (the prior's centre) and, with soft
memberships, the mix of prompts behind each Ψ_k. :func:`importance_weights` undoes it: each labelled
prompt of cluster c weighs f_c / (n_c/n), the weighted means estimate what a uniform sample would
(``routing.profiles.shrunk_cluster_errors(row_weights=...)``), while the counts that set the
shrinkage stay the real ones.

**Sequential profiling** stops when every cluster's posterior is tight: :func:`cluster_posteriors`
gives, per cluster, the Beta posterior of its error with the artifact's prior (mean
(Σ w e + m π)/(Σ w + m), the Ψ_k that is stored) and its normal-approximation 95 % half-width
1.96·√(ab/((a+b)²(a+b+1))); :func:`tight_enough` accepts when every cluster's half-width is at most
the target, or the cluster has no unlabelled candidate left. :class:`SequentialProfile` centres that
prior on the model's overall error with one error and one success added ((Σe + 1)/(n + 2)): with the
raw overall error, a model that has answered every prompt so far correctly would have half-width 0 in
every cluster and stop after its first round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

#: ways of weighting clusters in the allocation (module docstring)
WEIGHTS = ("traffic", "disagreement")
#: normal quantile of the reported half-widths (95 % two-sided)
Z95 = 1.959963984540054
DEFAULT_ROUNDS = 4


def hard_clusters(weights: np.ndarray) -> np.ndarray:
    """The cluster of each prompt: the argmax of its membership row."""
    return np.asarray(np.argmax(np.atleast_2d(weights), axis=1), dtype=np.int64)


def traffic_shares(clusters: np.ndarray, k: int) -> np.ndarray:
    """f_k: each cluster's share of the candidate prompts (the traffic they stand for)."""
    counts = np.bincount(np.asarray(clusters, dtype=np.int64), minlength=k).astype(np.float64)
    return counts / max(1.0, counts.sum())


def disagreement(psi_known: np.ndarray | None) -> np.ndarray | None:
    """d_k: the standard deviation over the known models' Ψ_k ((m, K) → (K,)); None with fewer than 2 models."""
    if psi_known is None:
        return None
    p = np.atleast_2d(np.asarray(psi_known, dtype=np.float64))
    return None if len(p) < 2 else np.asarray(p.std(axis=0))


def cluster_weights(shares: np.ndarray, weight: str = "traffic", spread: np.ndarray | None = None,
                    power: float = 2.0) -> np.ndarray:
    """w_k of the allocation (module docstring): f_k^power, times d_k²/mean(d²) for ``"disagreement"``."""
    if weight not in WEIGHTS:
        raise ValueError(f"unknown allocation weight {weight!r}; valid: {', '.join(WEIGHTS)}")
    f = np.asarray(shares, dtype=np.float64) ** float(power)
    if weight == "traffic":
        return f
    if spread is None:
        raise ValueError("weight 'disagreement' needs the known models' profiles (at least two)")
    d2 = np.asarray(spread, dtype=np.float64) ** 2
    scale = float(d2[f > 0].mean()) if np.any(f > 0) else 0.0
    return f * (d2 / scale if scale > 0 else np.ones_like(d2))


def importance_weights(clusters_labelled: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Per labelled prompt, f_c / (n_c / n): a uniform sample gets weights near 1. Clusters with no
    label cannot be reweighted; the weights are scaled so that they sum to the number of labels."""
    c = np.asarray(clusters_labelled, dtype=np.int64)
    n = len(c)
    if n == 0:
        return np.zeros(0)
    counts = np.bincount(c, minlength=len(shares)).astype(np.float64)
    v = np.asarray(shares, dtype=np.float64)[c] / (counts[c] / n)
    total = v.sum()
    return v * (n / total) if total > 0 else np.ones(n)


def cluster_posteriors(weights: np.ndarray, errors: np.ndarray, prior_strength: float,
                       prior_mean: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(posterior mean (K,), 95 % half-width (K,)) of each cluster's error for one model.

    ``weights`` (n, K) memberships of its labelled prompts, ``errors`` (n,) in [0, 1], the Beta prior
    of strength m centred on ``prior_mean`` (a scalar or per cluster). a_k = Σ w e + m π_k,
    b_k = Σ w (1 − e) + m (1 − π_k). A cluster with a + b = 0 (no label, m = 0) has half-width inf.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    e = np.asarray(errors, dtype=np.float64).reshape(-1)
    if len(e) != len(w):
        raise ValueError(f"{len(e)} errors for {len(w)} membership rows")
    k = w.shape[1]
    pi = np.broadcast_to(np.asarray(prior_mean, dtype=np.float64), (k,))
    m = float(prior_strength)
    a = w.T @ e + m * pi
    b = w.T @ (1.0 - e) + m * (1.0 - pi)
    s = a + b
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(s > 0, a / np.where(s > 0, s, 1.0), pi)
        var = np.where(s > 0, a * b / (np.where(s > 0, s, 1.0) ** 2 * (s + 1.0)), np.inf)
    return np.asarray(mean), np.asarray(Z95 * np.sqrt(var))


def tight_enough(halfwidths: np.ndarray, target: float, exhausted: np.ndarray | None = None) -> bool:
    """True when every cluster's half-width is at most ``target`` or the cluster has nothing left to label."""
    hw = np.asarray(halfwidths, dtype=np.float64)
    ok = hw <= target
    if exhausted is not None:
        ok |= np.asarray(exhausted, dtype=bool)
    return bool(ok.all())


def allocate(have: np.ndarray, capacity: np.ndarray, batch: int, w: np.ndarray, v: np.ndarray,
             prior_strength: float) -> np.ndarray:
    """How many more labels each cluster gets in this round (greedy on the gain of the module docstring).

    ``have`` (K,) labels so far, ``capacity`` (K,) unlabelled candidates left, ``w`` cluster weights,
    ``v`` Ψ̂(1 − Ψ̂) per cluster. Never more than ``capacity``; in total min(batch, Σ capacity).
    """
    n = np.asarray(have, dtype=np.float64).copy()
    cap = np.asarray(capacity, dtype=np.int64)
    wv = np.asarray(w, dtype=np.float64) * np.maximum(np.asarray(v, dtype=np.float64), 1e-6)
    m = max(float(prior_strength), 1e-3)  # a cluster with no label and m = 0 still gets a finite gain
    extra = np.zeros(len(n), dtype=np.int64)
    for _ in range(min(int(batch), int(cap.sum()))):
        gain = wv * (1.0 / (n + m) - 1.0 / (n + m + 1.0))
        gain[extra >= cap] = -np.inf
        j = int(np.argmax(gain))  # ties: the lowest cluster index
        extra[j] += 1
        n[j] += 1.0
    return extra


@dataclass
class ActiveResult:
    rows: np.ndarray  # candidate positions labelled, in the order asked
    errors: np.ndarray  # the model's errors on them
    rounds: int


def choose_and_label(weights: np.ndarray, budget: int, label: Callable[[np.ndarray], np.ndarray], *,
                     prior_strength: float, seed: int | Sequence[int], rounds: int = DEFAULT_ROUNDS,
                     weight: str = "traffic", spread: np.ndarray | None = None,
                     shares: np.ndarray | None = None, power: float = 2.0) -> ActiveResult:
    """Active allocation of ``budget`` labels among the candidates with memberships ``weights`` (N, K).

    ``label(rows)`` returns the model's errors on those candidate positions; it is called once per
    round with prompts not asked before, ``budget`` of them in all (all candidates when fewer). The
    posterior between rounds uses the importance-weighted overall error as the prior's centre.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n_cand, k = w.shape
    budget = min(int(budget), n_cand)
    if budget < 1:
        raise ValueError(f"label budget must be at least 1, got {budget}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    clusters = hard_clusters(w)
    f = traffic_shares(clusters, k) if shares is None else np.asarray(shares, dtype=np.float64)
    cw = cluster_weights(f, weight, spread, power)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_cand)
    queues = [list(order[clusters[order] == c]) for c in range(k)]  # each cluster's candidates, seeded order
    rows: list[int] = []
    errs: list[float] = []
    have = np.zeros(k, dtype=np.int64)
    v = np.full(k, 0.25)
    done_rounds = 0
    for r in range(rounds):
        left = budget - len(rows)
        if left <= 0:
            break
        batch = math.ceil(left / (rounds - r))
        cap = np.asarray([len(q) for q in queues], dtype=np.int64)
        extra = allocate(have, cap, batch, cw, v, prior_strength)
        new = [int(queues[c].pop(0)) for c in range(k) for _ in range(int(extra[c]))]
        if not new:
            break
        got = np.asarray(label(np.asarray(new, dtype=np.int64)), dtype=np.float64).reshape(-1)
        if len(got) != len(new):
            raise ValueError(f"label() returned {len(got)} errors for {len(new)} prompts")
        rows += new
        errs += got.tolist()
        have += extra
        done_rounds += 1
        r_arr = np.asarray(rows)
        e_arr = np.asarray(errs)
        iw = importance_weights(clusters[r_arr], f)
        overall = float(np.dot(iw, e_arr) / iw.sum())
        mean, _ = cluster_posteriors(w[r_arr], e_arr, prior_strength, overall)
        v = mean * (1.0 - mean)
    return ActiveResult(rows=np.asarray(rows, dtype=np.int64), errors=np.asarray(errs, dtype=np.float64),
                        rounds=done_rounds)


# ----------------------------------------------------------------------------- sequential profiling

#: how the next prompts of a sequential profile are chosen: a seeded uniform random order (every
#: cluster in proportion to its traffic), or the active allocation above (weights ``traffic``)
ALLOCATIONS = ("uniform", "active")


@dataclass(frozen=True)
class SequentialState:
    """Where a sequential profile stands after the labels so far."""

    used: int  # prompts asked (graded or not)
    graded: int
    means: np.ndarray  # (K,) posterior mean error per cluster (≈ Ψ_k; the centre is smoothed, prior_mean)
    half_widths: np.ndarray  # (K,) 95 % half-widths
    exhausted: np.ndarray  # (K,) bool: no candidate of the cluster left to ask
    stop: str | None  # why to stop now (None: go on)

    def as_dict(self) -> dict[str, object]:
        return {"used": self.used, "graded": self.graded,
                "max_half_width": float(np.max(self.half_widths)) if len(self.half_widths) else 0.0,
                "half_widths": [round(float(h), 4) for h in self.half_widths],
                "stop": self.stop}


class SequentialProfile:
    """Profiling one model in rounds until every cluster's posterior is tight (or the budget is spent).

    ``weights`` (N, K): the candidates' memberships for the variant profiled; ``prior_strength`` m and
    ``difficulty`` δ (or None): the prior the router artifact records, so the posterior mean of each
    cluster is the Ψ_k that activation stores. ``target_ci``: stop when every cluster's 95 %
    half-width is at most this (a cluster with no candidate left counts as done); ``max_prompts``:
    stop after asking this many (None: every candidate). ``batch``: prompts per round (default:
    max(K, a tenth of the budget)). ``allocation``: :data:`ALLOCATIONS`.
    """

    def __init__(self, weights: np.ndarray, *, prior_strength: float, difficulty: np.ndarray | None = None,
                 target_ci: float | None = None, max_prompts: int | None = None, allocation: str = "uniform",
                 batch: int | None = None, seed: int | Sequence[int] = 0, power: float = 2.0) -> None:
        self.w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        n, k = self.w.shape
        if target_ci is not None and not 0 < target_ci < 1:
            raise ValueError(f"target_ci must be in (0, 1) (a half-width in error units), got {target_ci}")
        if max_prompts is not None and max_prompts < 1:
            raise ValueError(f"max_prompts must be at least 1, got {max_prompts}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {allocation!r}; valid: {', '.join(ALLOCATIONS)}")
        self.m = float(prior_strength)
        self.difficulty = difficulty
        self.target = target_ci
        self.budget = n if max_prompts is None else min(int(max_prompts), n)
        self.allocation = allocation
        self.batch = int(batch) if batch else max(k, math.ceil(self.budget / 10))
        self.power = power
        self.clusters = hard_clusters(self.w)
        self.shares = traffic_shares(self.clusters, k)
        self.order = np.random.default_rng(seed).permutation(n)  # the seeded order prompts are taken in

    def prior_mean(self, rows: np.ndarray, errors: np.ndarray) -> float | np.ndarray:
        """The prior's centre from the labels so far: the (importance-weighted) overall error with one
        error and one success added (a model with no error yet is not taken for certain: with the raw
        overall error 0 every posterior would have half-width 0), or with δ the difficulty prior's π_k
        (routing.profiles.difficulty_prior_means) around it."""
        if len(rows) == 0:
            return 0.5
        iw = importance_weights(self.clusters[rows], self.shares) if self.allocation == "active" else np.ones(len(rows))
        overall = float((np.dot(iw, errors) + 1.0) / (iw.sum() + 2.0))
        if self.difficulty is None:
            return overall
        from routing.profiles import difficulty_prior_means

        counts = self.w[rows].sum(axis=0)
        return np.asarray(difficulty_prior_means(np.asarray([overall]), self.difficulty, counts / counts.sum())[0])

    def state(self, asked: Collection[int], graded_rows: Sequence[int] | np.ndarray,
              errors: Sequence[float] | np.ndarray) -> SequentialState:
        """The posterior after ``graded_rows`` (candidate positions) with ``errors``; ``asked``: every
        position asked so far, graded or failed (a failed prompt is not asked again)."""
        rows = np.asarray(graded_rows, dtype=np.int64)
        e = np.asarray(errors, dtype=np.float64)
        means, hw = cluster_posteriors(self.w[rows], e, self.m, self.prior_mean(rows, e))
        left = np.ones(len(self.w), dtype=bool)
        left[np.asarray(list(asked), dtype=np.int64)] = False
        exhausted = np.bincount(self.clusters[left], minlength=self.w.shape[1]) == 0
        used = len(set(int(i) for i in asked))
        stop = None
        if self.target is not None and len(rows) and tight_enough(hw, self.target, exhausted):
            stop = "target"
        elif used >= self.budget:
            stop = "max_prompts" if used < len(self.w) else "all_prompts"
        elif not left.any():
            stop = "all_prompts"
        return SequentialState(used=used, graded=len(rows), means=means, half_widths=hw, exhausted=exhausted,
                               stop=stop)

    def next_rows(self, st: SequentialState, asked: Collection[int]) -> np.ndarray:
        """The candidate positions to ask next (none once ``st.stop`` is set)."""
        if st.stop is not None:
            return np.zeros(0, dtype=np.int64)
        done = set(int(i) for i in asked)
        size = min(self.batch, self.budget - st.used)
        todo = [int(i) for i in self.order if int(i) not in done]
        if self.allocation == "uniform":
            return np.asarray(todo[:size], dtype=np.int64)
        k = self.w.shape[1]
        have = np.bincount(self.clusters[np.asarray(sorted(done), dtype=np.int64)], minlength=k)
        queues: list[list[int]] = [[] for _ in range(k)]
        for i in todo:
            queues[int(self.clusters[i])].append(i)
        extra = allocate(have, np.asarray([len(q) for q in queues]), size,
                         cluster_weights(self.shares, "traffic", power=self.power), st.means * (1.0 - st.means), self.m)
        return np.asarray([queues[c][j] for c in range(k) for j in range(int(extra[c]))], dtype=np.int64)


# ----------------------------------------------------------------- a shared design: informative prompts

def informativeness(train_scores: np.ndarray, floor: float = 0.05) -> np.ndarray:
    """q_i = √(p_i(1 − p_i)) + floor, p_i the known (training) models' mean score on candidate i: a prompt
    every known model gets right, or every one wrong, says little about how a new model compares."""
    p = np.asarray(train_scores, dtype=np.float64).mean(axis=1)
    return np.asarray(np.sqrt(np.clip(p * (1.0 - p), 0.0, None)) + float(floor))


def inclusion_probabilities(q: np.ndarray, n: int) -> np.ndarray:
    """π_i = min(1, c·q_i) with c such that Σ π_i = n (those capped at 1 are taken for sure)."""
    q = np.asarray(q, dtype=np.float64)
    if not 0 < n <= len(q):
        raise ValueError(f"sample size {n} is not in 1..{len(q)}")
    pi = np.zeros(len(q))
    sure = np.zeros(len(q), dtype=bool)
    for _ in range(len(q)):
        rest = n - sure.sum()
        free = ~sure
        pi[free] = rest * q[free] / q[free].sum()
        pi[sure] = 1.0
        over = free & (pi >= 1.0)
        if not over.any():
            break
        sure |= over
    return np.clip(pi, 0.0, 1.0)


def systematic_sample(pi: np.ndarray, seed: int | Sequence[int]) -> np.ndarray:
    """Exactly round(Σπ) positions, position i with probability π_i (systematic sampling in a seeded random
    order); sorted."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pi))
    cum = np.cumsum(np.asarray(pi, dtype=np.float64)[order])
    n = round(float(cum[-1]))
    points = rng.random() + np.arange(n)
    picked = order[np.searchsorted(cum, points, side="right")]
    return np.sort(np.unique(picked))
