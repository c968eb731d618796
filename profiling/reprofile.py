"""Re-estimating a model's profile Ψ from validation outcomes plus logged feedback.

The estimator, per model h and cluster k, is a Beta–Bernoulli update in which the
validation set is the prior:

* the validation profile gives an error rate ψ_k measured on n_k prompts (after the
  router's shrinkage). It is read as a Beta prior with ``n_k`` pseudo-observations,
  ``n_k·ψ_k`` of them errors;
* feedback on requests that ``h`` served in cluster ``k`` adds f_k observations with
  scores s_i ∈ [0, 1], i.e. Σ(1 − s_i) errors, each weighted by ``feedback_weight``
  (w ≤ 1 discounts noisy thumbs);
* the new error is the posterior mean
  ``ψ'_k = (n_k·ψ_k + w·Σ(1 − s_i)) / (n_k + w·f_k)``.

With no feedback ψ' = ψ; as feedback grows it dominates. ``max_feedback_weight_ratio``
caps w·f_k at a multiple of n_k, so that a flood of biased feedback cannot erase the
validation evidence completely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClusterFeedback:
    cluster: int
    score: float  # in [0, 1], 1 = good


@dataclass(frozen=True)
class Reprofiled:
    psi: np.ndarray  # new per-cluster error
    counts: np.ndarray  # effective observation count per cluster (prior + weighted feedback)
    feedback_counts: np.ndarray  # raw feedback rows per cluster


def reprofile(
    psi_prior: np.ndarray,
    prior_counts: np.ndarray,
    feedback: Sequence[ClusterFeedback],
    *,
    feedback_weight: float = 1.0,
    max_feedback_weight_ratio: float = 4.0,
) -> Reprofiled:
    """Posterior-mean per-cluster error from the validation prior and feedback."""
    psi_prior = np.asarray(psi_prior, dtype=np.float64)
    n = np.asarray(prior_counts, dtype=np.float64)
    if psi_prior.shape != n.shape:
        raise ValueError(f"psi has shape {psi_prior.shape} but counts have {n.shape}")
    k = psi_prior.shape[0]
    f = np.zeros(k)
    errors = np.zeros(k)
    for fb in feedback:
        if not 0 <= fb.cluster < k:
            raise ValueError(f"feedback cluster {fb.cluster} out of range 0..{k - 1}")
        if not 0.0 <= fb.score <= 1.0:
            raise ValueError(f"feedback score {fb.score} not in [0, 1]")
        f[fb.cluster] += 1
        errors[fb.cluster] += 1.0 - fb.score
    w = np.full(k, float(feedback_weight))
    # cap the feedback's total weight at max_feedback_weight_ratio × the prior count
    cap = max_feedback_weight_ratio * np.maximum(n, 1.0)
    heavy = w * f > cap
    w[heavy] = cap[heavy] / f[heavy]
    denom = n + w * f
    new = np.where(denom > 0, (n * psi_prior + w * errors) / np.where(denom > 0, denom, 1.0), psi_prior)
    return Reprofiled(psi=np.clip(new, 0.0, 1.0), counts=denom, feedback_counts=f)


@dataclass(frozen=True)
class Drift:
    model: str
    cluster: int
    before: float
    after: float
    feedback: int

    @property
    def change(self) -> float:
        return self.after - self.before


def drift_report(
    changes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], top: int = 10, min_change: float = 0.0
) -> list[Drift]:
    """Rank (model, cluster) pairs by |Δψ|. ``changes[model] = (before, after, feedback_counts)``."""
    rows: list[Drift] = []
    for model, (before, after, fb) in changes.items():
        for k in range(len(before)):
            d = Drift(model, k, float(before[k]), float(after[k]), int(fb[k]))
            if abs(d.change) > min_change:
                rows.append(d)
    rows.sort(key=lambda d: (-abs(d.change), d.model, d.cluster))
    return rows[:top]


def format_drift(rows: Sequence[Drift]) -> str:
    if not rows:
        return "no profile changed"
    lines = ["| model | cluster | error before | error after | change | feedback |", "|---|---|---|---|---|---|"]
    lines += [f"| {d.model} | {d.cluster} | {d.before:.3f} | {d.after:.3f} | {d.change:+.3f} | {d.feedback} |"
              for d in rows]
    return "\n".join(lines)
