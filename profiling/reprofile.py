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

``max_key_share`` s bounds what ONE key can do (docs/security/tenants.md): in every cluster
the weight W_j of key j's feedback is cut so that W_j ≤ s·(n_k + Σ_{i≠j} W_i), i.e. its share of
the posterior's weight n_k + Σ_i W_i is at most s. In two steps: every key is first capped
against the prior alone, R_i = min(w·f_ik, c·n_k) with c = s/(1−s); then
W_j = min(w·f_jk, c·(n_k + Σ_{i≠j} R_i)). Since W_i ≥ R_i, key j's share is at most s, so
its feedback moves ψ'_k by at most s (in error units) against the estimate from all the other
evidence of the pass (alone: against the validation ψ_k), however many rows it sends. Many keys together still count (each up to its share), which a
cap on the prior alone would not allow. The total cap above then scales every key's weight
by the same factor, which keeps each share ≤ s. s = 1 turns the per-key cap off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClusterFeedback:
    cluster: int
    score: float  # in [0, 1], 1 = good
    key: int | None = None  # the API key that sent it (None: anonymous); max_key_share is per key


@dataclass(frozen=True)
class Reprofiled:
    psi: np.ndarray  # new per-cluster error
    counts: np.ndarray  # effective observation count per cluster (prior + weighted feedback)
    feedback_counts: np.ndarray  # raw feedback rows per cluster
    capped_keys: np.ndarray | None = None  # per cluster: keys whose weight max_key_share cut


def _key_weights(n_k: float, raw: dict[int | None, float], share: float) -> dict[int | None, float]:
    """Each key's weight in one cluster after the per-key cap (see the module docstring)."""
    if share >= 1.0:
        return raw
    c = share / (1.0 - share)
    first = {key: min(v, c * n_k) for key, v in raw.items()}
    total = sum(first.values())
    return {key: min(v, c * (n_k + total - first[key])) for key, v in raw.items()}


def reprofile(
    psi_prior: np.ndarray,
    prior_counts: np.ndarray,
    feedback: Sequence[ClusterFeedback],
    *,
    feedback_weight: float = 1.0,
    max_feedback_weight_ratio: float = 4.0,
    max_key_share: float = 1.0,
) -> Reprofiled:
    """Posterior-mean per-cluster error from the validation prior and feedback."""
    psi_prior = np.asarray(psi_prior, dtype=np.float64)
    n = np.asarray(prior_counts, dtype=np.float64)
    if psi_prior.shape != n.shape:
        raise ValueError(f"psi has shape {psi_prior.shape} but counts have {n.shape}")
    if not 0.0 < max_key_share <= 1.0:
        raise ValueError(f"max_key_share must be in (0, 1], got {max_key_share}")
    k = psi_prior.shape[0]
    f = np.zeros(k)
    # per (cluster, key): [rows, Σ(1 − s)]
    per_key: dict[int, dict[int | None, list[float]]] = {}
    for fb in feedback:
        if not 0 <= fb.cluster < k:
            raise ValueError(f"feedback cluster {fb.cluster} out of range 0..{k - 1}")
        if not 0.0 <= fb.score <= 1.0:
            raise ValueError(f"feedback score {fb.score} not in [0, 1]")
        f[fb.cluster] += 1
        acc = per_key.setdefault(fb.cluster, {}).setdefault(fb.key, [0.0, 0.0])
        acc[0] += 1
        acc[1] += 1.0 - fb.score
    weight = np.zeros(k)  # Σ_j W_j: the feedback's weight per cluster
    weighted_errors = np.zeros(k)  # Σ_j W_j · (key j's mean error)
    capped = np.zeros(k, dtype=np.int64)
    for cluster, keys in per_key.items():
        raw = {key: float(feedback_weight) * rows for key, (rows, _) in keys.items()}
        cut = _key_weights(float(n[cluster]), raw, max_key_share)
        weight[cluster] = sum(cut.values())
        weighted_errors[cluster] = sum(cut[key] * err / rows for key, (rows, err) in keys.items())
        capped[cluster] = sum(1 for key in raw if cut[key] < raw[key])
    # cap the feedback's total weight at max_feedback_weight_ratio × the prior count (every key alike)
    cap = max_feedback_weight_ratio * np.maximum(n, 1.0)
    heavy = weight > cap
    scale = np.where(heavy, cap / np.where(heavy, weight, 1.0), 1.0)
    weight, weighted_errors = weight * scale, weighted_errors * scale
    denom = n + weight
    new = np.where(denom > 0, (n * psi_prior + weighted_errors) / np.where(denom > 0, denom, 1.0), psi_prior)
    return Reprofiled(psi=np.clip(new, 0.0, 1.0), counts=denom, feedback_counts=f, capped_keys=capped)


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


# ----------------------------------------------------------------------- per-cluster drift (issue #13 point 3)
@dataclass(frozen=True)
class ClusterDrift:
    """Realised error of one (model, cluster) against the Ψ routing uses, with a confidence bound.

    ``realised`` is the mean of 1 − s over the ``feedback`` rows; ``drift = realised − psi``; ``bound`` is
    Hoeffding's half-width sqrt(ln(2/δ) / 2n) at confidence 1 − δ (scores in [0, 1], no other assumption), so
    ``drift > bound`` says, at that confidence, that the model does worse on the cluster than its profile.
    ``demoted_to`` is the Ψ the pass stored instead (``profiling.drift_demote``), else None.
    """

    model: str
    cluster: int
    feedback: int
    keys: int
    realised: float
    psi: float
    bound: float
    demoted_to: float | None = None

    @property
    def drift(self) -> float:
        return self.realised - self.psi

    @property
    def alert(self) -> bool:
        return self.drift > self.bound

    def as_dict(self) -> dict[str, object]:
        return {"model": self.model, "cluster": self.cluster, "feedback": self.feedback, "keys": self.keys,
                "realised_error": self.realised, "psi": self.psi, "drift": self.drift, "bound": self.bound,
                "alert": self.alert, "demoted_to": self.demoted_to}


def hoeffding_bound(n: int, confidence: float) -> float:
    """Half-width of a two-sided Hoeffding interval for a mean of ``n`` values in [0, 1]."""
    if n <= 0:
        return float("inf")
    return float(np.sqrt(np.log(2.0 / (1.0 - confidence)) / (2.0 * n)))


def cluster_drift(model: str, psi: np.ndarray, feedback: Sequence[ClusterFeedback], *, min_feedback: int,
                  confidence: float, demote: bool = False) -> tuple[list[ClusterDrift], np.ndarray]:
    """Every cluster of ``model`` with at least ``min_feedback`` feedback rows, against ``psi`` (the Ψ routing uses).

    With ``demote``, a cluster in alert gets Ψ_k := the lower confidence bound of its realised error — but
    only when the drift holds without the feedback of the key that sent the most rows there (that key's
    rows left out, the rest still has ``min_feedback`` rows and drifts beyond its own bound), so no one key
    can demote a model (docs/security/tenants.md); the lower of the two bounds is stored. Returns the rows and
    the (possibly demoted) Ψ.
    """
    psi = np.asarray(psi, dtype=np.float64).copy()
    by_cluster: dict[int, list[ClusterFeedback]] = {}
    for fb in feedback:
        by_cluster.setdefault(fb.cluster, []).append(fb)
    rows: list[ClusterDrift] = []
    for k in sorted(by_cluster):
        fbs = by_cluster[k]
        if len(fbs) < min_feedback or not 0 <= k < len(psi):
            continue
        n = len(fbs)
        realised = float(np.mean([1.0 - f.score for f in fbs]))
        keys: dict[int | None, list[float]] = {}
        for f in fbs:
            keys.setdefault(f.key, []).append(1.0 - f.score)
        row = ClusterDrift(model, k, n, len(keys), realised, float(psi[k]), hoeffding_bound(n, confidence))
        if demote and row.alert:
            top = max(keys, key=lambda key: len(keys[key]))
            rest = [e for key, errs in keys.items() if key != top for e in errs]
            if len(rest) >= min_feedback:
                rest_realised, rest_bound = float(np.mean(rest)), hoeffding_bound(len(rest), confidence)
                if rest_realised - psi[k] > rest_bound:
                    target = min(realised - row.bound, rest_realised - rest_bound)
                    psi[k] = target
                    row = ClusterDrift(model, k, n, len(keys), realised, row.psi, row.bound, target)
        rows.append(row)
    return rows, psi
