"""Model profiles Ψ(h): a model's expected error per prompt cluster.

Estimator (documented in docs/EVALUATION.md). Given validation prompts with
membership weights w_ik = z_k(x_i) (one-hot for hard K-means, soft otherwise)
and the model's errors e_i = 1 − score_i ∈ [0, 1]:

    n_k   = Σ_i w_ik                          (the cluster's (soft) count)
    ē_k   = Σ_i w_ik e_i / n_k                 (the cluster's empirical error)
    ē     = mean_i e_i                         (the model's overall error)
    Ψ_k   = (n_k ē_k + m ē) / (n_k + m)        (shrunk toward ē)

This is the posterior mean of a Beta prior centred on the model's overall error
with strength m pseudo-prompts (empirical Bayes). Large clusters keep their own
error; a cluster with few validation prompts falls back toward the overall error.
m = 0 is the plain per-cluster mean (an empty cluster then takes ē). Scores may be
anywhere in [0, 1]; Ψ_k ∈ [0, 1] for every k.

Difficulty prior (issue 15). The flat prior centres every cluster on ē. Clusters are not
equally hard, and the training models say by how much: with each training model's per-cluster
and overall errors, δ_k = mean over training models of logit ē_k(h') − logit ē(h')
(:func:`cluster_difficulty`). A new model's prior mean in cluster k is then
π_k = σ(a + δ_k), with a chosen so that Σ_k (n_k/N) π_k = ē (the prior keeps the model's own
overall error on its profiling prompts; :func:`difficulty_prior_means`), and

    Ψ_k   = (n_k ē_k + m π_k) / (n_k + m).

δ is learned once from the training models (it is stored in the router artifact); π_k
depends on the profiled model's own outcomes only through ē, so Ψ(h) still depends on h's
own outcomes only.

Peer prior (issue 15; collaborative filtering over models). The training models' profiles
Ψ_train (M, K), estimated on the many training prompts, carry model-specific patterns (a
math-strong model, one weak at law). A new model h labelled on n profiling prompts, with errors
e_h (n,), is matched to them through their errors E (n, M) on the same prompts: weights w ≥ 0,
Σ_j w_j = 1, fit E·w ≈ e_h by least squares (:func:`peer_weights`); the raw prior mean is
Σ_j w_j Ψ_train[j, k], recalibrated in logits as the difficulty prior is, i.e. the difficulty
prior with a per-model δ_hk = logit(Σ_j w_j Ψ_train[j, k]) (:func:`peer_offsets`):

    π_k   = σ(a_h + δ_hk),  Σ_k (n_k/N) π_k = ē,      Ψ_k = (n_k ē_k + m π_k) / (n_k + m).

Ψ(h) depends on h's own outcomes and on the fixed training models (their errors on the
profiling prompts and their Ψ_train, stored in the router artifact) only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROFILES_FILE = "profiles.json"
PROFILES_FORMAT = 1


PRIORS = ("flat", "difficulty", "peer", "peer-similarity")
#: how each peer prior weighs the training models (:func:`peer_weights`)
PEER_WEIGHTINGS = {"peer": "nnls", "peer-similarity": "similarity"}
#: the similarity weighting's sharpness: w_j ∝ exp(−T · d_hj), d_hj the mean squared difference of the errors
PEER_SIMILARITY_T = 30.0
#: the training models' per-cluster errors the peer prior mixes are shrunk by this many pseudo-prompts
PEER_PSI_STRENGTH = 1.0
#: the weight of the Σ_j w_j = 1 row appended to the least-squares fit of :func:`peer_weights`
_SIMPLEX_ROW = 1e3
_LOGIT_EPS = 1e-3


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _LOGIT_EPS, 1.0 - _LOGIT_EPS)
    return np.asarray(np.log(q) - np.log1p(-q))


def cluster_difficulty(weights: np.ndarray, errors: np.ndarray, *, leave_one_out: bool = False) -> np.ndarray:
    """δ_k: how much harder cluster k is than a model's average, in logits, across the models in ``errors``.

    ``weights`` (n, K) memberships and ``errors`` (n, m) of m (training) models. Each model's
    per-cluster error is shrunk by one pseudo-prompt toward its overall error (an empty cluster
    gets δ = 0 from it). Returns (K,), or with ``leave_one_out`` (m, K): row h is δ computed
    without model h (for simulating a new model with the training models themselves).
    """
    psi, _ = shrunk_cluster_errors(weights, errors, 1.0)  # (m, K)
    e = np.asarray(errors, dtype=np.float64)
    overall = e.reshape(len(e), -1).mean(axis=0)  # (m,)
    d = _logit(psi) - _logit(overall)[:, None]  # (m, K)
    if not leave_one_out:
        return np.asarray(d.mean(axis=0))
    m = len(d)
    if m < 2:
        return np.zeros_like(d)
    return np.asarray((d.sum(axis=0)[None, :] - d) / (m - 1))


def peer_weights(errors: np.ndarray, peer_errors: np.ndarray, *, allowed: np.ndarray | None = None,
                 row_weights: np.ndarray | None = None, method: str = "nnls") -> np.ndarray:
    """w (m, M): for each of m models, the convex combination of the M peers' errors closest to its own.

    ``errors`` (n, m) the profiled models' errors on n prompts, ``peer_errors`` (n, M) the peers' (training
    models') errors on the same prompts. Per model h: minimise ‖E w − e_h‖² over w ≥ 0 with Σ w = 1 (non-negative
    least squares with the sum as a heavily weighted extra row, then normalised). ``allowed`` (m, M) bool: peers
    each model may use (leave-one-out: a training model simulated as new must not use itself); ``row_weights``
    (n,): a weighted fit (importance weights of an uneven sample). Each row of w is computed from that model's
    own errors alone (one NNLS per model), so it does not depend on which other models are profiled with it.
    ``method="similarity"``: instead, w_j ∝ exp(−T · d_hj) with d_hj the (weighted) mean squared difference of
    the two models' errors (:data:`PEER_SIMILARITY_T`).
    """
    from scipy.optimize import nnls

    e = np.asarray(errors, dtype=np.float64)
    if e.ndim == 1:
        e = e[:, None]
    pe = np.asarray(peer_errors, dtype=np.float64)
    n, big_m = pe.shape
    if len(e) != n:
        raise ValueError(f"{len(e)} rows of errors for {n} rows of peer errors")
    ok = np.ones((e.shape[1], big_m), dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    sq = np.ones(n) if row_weights is None else np.sqrt(np.asarray(row_weights, dtype=np.float64).reshape(-1))
    out = np.zeros((e.shape[1], big_m))
    for h in range(e.shape[1]):
        cols = np.flatnonzero(ok[h])
        if len(cols) == 0:
            continue
        if n == 0:
            out[h, cols] = 1.0 / len(cols)
            continue
        if method == "similarity":
            v = sq * sq
            d = np.vecdot(np.ascontiguousarray(((pe[:, cols] - e[:, [h]]) ** 2).T), v) / v.sum()
            z = np.exp(-PEER_SIMILARITY_T * (d - d.min()))
            out[h, cols] = z / z.sum()
            continue
        a = np.vstack([pe[:, cols] * sq[:, None], np.full((1, len(cols)), _SIMPLEX_ROW)])
        b = np.concatenate([e[:, h] * sq, [_SIMPLEX_ROW]])
        w, _ = nnls(a, b, maxiter=50 * len(cols))
        total = w.sum()
        out[h, cols] = w / total if total > 0 else 1.0 / len(cols)
    return out


def peer_offsets(weights: np.ndarray, peer_psi: np.ndarray) -> np.ndarray:
    """δ (m, K) of the peer prior: logit(Σ_j w_hj Ψ_train[j, k]) for each model h (row by row, so each
    model's row depends on its own weights only). Pass it as ``difficulty`` to :func:`shrunk_cluster_errors`."""
    w = np.asarray(weights, dtype=np.float64)
    psi = np.ascontiguousarray(np.asarray(peer_psi, dtype=np.float64).T)  # (K, M)
    mix = np.stack([np.vecdot(psi, np.ascontiguousarray(row)) for row in w]) if len(w) else np.zeros((0, len(psi)))
    return _logit(np.asarray(mix))


def peer_prior_offsets(errors: np.ndarray, peer_errors: np.ndarray, peer_psi: np.ndarray, *,
                       allowed: np.ndarray | None = None, row_weights: np.ndarray | None = None,
                       method: str = "nnls") -> np.ndarray:
    """δ (m, K) of the peer prior for m models with ``errors`` (n, m) on the prompts where the peers have
    ``peer_errors`` (n, M); ``peer_psi`` (M, K) the peers' Ψ (:func:`peer_weights`, :func:`peer_offsets`)."""
    return peer_offsets(peer_weights(errors, peer_errors, allowed=allowed, row_weights=row_weights, method=method),
                        peer_psi)


def difficulty_prior_means(overall: np.ndarray, difficulty: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """π (m, K): σ(a_h + δ_k) with a_h such that Σ_k freq_k π_hk = overall_h (bisection on a_h).

    ``overall`` (m,) each model's overall error; ``difficulty`` (K,) or (m, K); ``freq`` (K,) the
    clusters' share of the profiling prompts (sums to 1).
    """
    ov = np.asarray(overall, dtype=np.float64).reshape(-1)
    delta = np.broadcast_to(np.asarray(difficulty, dtype=np.float64), (len(ov), len(freq)))
    f = np.asarray(freq, dtype=np.float64)
    lo = np.full(len(ov), -40.0)
    hi = np.full(len(ov), 40.0)
    for _ in range(60):  # the implied mean error rises with a: bisect each model's a
        mid = 0.5 * (lo + hi)
        implied = (f[None, :] / (1.0 + np.exp(-(mid[:, None] + delta)))).sum(axis=1)
        up = implied < ov
        lo = np.where(up, mid, lo)
        hi = np.where(up, hi, mid)
    a = 0.5 * (lo + hi)
    return np.asarray(1.0 / (1.0 + np.exp(-(a[:, None] + delta))))


def shrunk_cluster_errors(weights: np.ndarray, errors: np.ndarray, prior_strength: float = 0.0,
                          difficulty: np.ndarray | None = None, row_weights: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Ψ for several models at once.

    ``weights``: (n, K) membership of n validation prompts; ``errors``: (n, m) in [0, 1].
    ``difficulty``: None for the flat prior (shrink toward each model's overall error), else δ
    of :func:`cluster_difficulty`, (K,) or (m, K) (shrink toward :func:`difficulty_prior_means`).
    ``row_weights`` (n,): importance weights of prompts chosen unevenly across clusters
    (:func:`routing.active.importance_weights`): the overall error and each cluster's mean error are
    then weighted means (what a uniform sample estimates), the counts that set the shrinkage stay
    the real Σ_i w_ik. None: every prompt weighs 1 (the plain estimator, bit for bit).
    Returns (psi (m, K), counts (K,)).
    """
    if row_weights is not None:
        return _reweighted_cluster_errors(weights, errors, prior_strength, difficulty, row_weights)
    w = np.asarray(weights, dtype=np.float64)
    e = np.asarray(errors, dtype=np.float64)
    if e.ndim == 1:
        e = e[:, None]
    counts = w.sum(axis=0)  # (K,)
    # each model's sums over its own contiguous row of errors (one dot product per cluster, one mean),
    # not a matrix product or a column reduction, whose summation order depends on the model's column
    # and the number of models: Ψ(h) then depends on h's own outcomes only, bit for bit (profiling h
    # alone, as onboarding does, gives the Ψ a fit over all models gave it; equal outcomes, equal Ψ)
    e_rows = np.ascontiguousarray(e.T)  # (m, n)
    sums = np.vecdot(e_rows[:, None, :], np.ascontiguousarray(w.T))  # (m, K)
    overall = e_rows.mean(axis=1)[:, None] if len(e) else np.full((e.shape[1], 1), 0.5)
    prior = overall
    if difficulty is not None and len(e) and counts.sum() > 0:
        prior = difficulty_prior_means(overall[:, 0], difficulty, counts / counts.sum())
    m = float(prior_strength)
    denom = counts[None, :] + m
    with np.errstate(invalid="ignore", divide="ignore"):
        psi = np.where(denom > 0, (sums + m * prior) / np.where(denom > 0, denom, 1.0), prior)
    return np.clip(psi, 0.0, 1.0), counts


def _reweighted_cluster_errors(weights: np.ndarray, errors: np.ndarray, prior_strength: float,
                               difficulty: np.ndarray | None, row_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64)
    e = np.asarray(errors, dtype=np.float64)
    if e.ndim == 1:
        e = e[:, None]
    v = np.asarray(row_weights, dtype=np.float64).reshape(-1)
    if len(v) != len(w) or np.any(v < 0) or not np.all(np.isfinite(v)):
        raise ValueError(f"row_weights must be {len(w)} finite non-negative numbers")
    counts = w.sum(axis=0)  # the real (soft) counts
    vw = w * v[:, None]
    vcounts = vw.sum(axis=0)
    e_rows = np.ascontiguousarray(e.T)  # (m, n): each model from its own outcomes only
    vsums = np.vecdot(e_rows[:, None, :], np.ascontiguousarray(vw.T))  # (m, K)
    total = v.sum()
    overall = (e_rows @ v / total)[:, None] if len(e) and total > 0 else np.full((e.shape[1], 1), 0.5)
    prior = overall
    if difficulty is not None and len(e) and counts.sum() > 0:
        prior = difficulty_prior_means(overall[:, 0], difficulty, vcounts / vcounts.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(vcounts[None, :] > 0, vsums / np.where(vcounts > 0, vcounts, 1.0)[None, :], prior)
    m = float(prior_strength)
    denom = counts[None, :] + m
    with np.errstate(invalid="ignore", divide="ignore"):
        psi = np.where(denom > 0, (counts[None, :] * means + m * prior) / np.where(denom > 0, denom, 1.0), prior)
    return np.clip(psi, 0.0, 1.0), counts


@dataclass(frozen=True)
class ModelProfile:
    """Ψ(h) of one model on the router's K clusters, with the evidence behind it."""

    model: str
    psi: np.ndarray  # (K,) expected error per cluster, in [0, 1]
    counts: np.ndarray  # (K,) (soft) number of validation prompts per cluster
    overall_error: float
    n_prompts: int
    prior_strength: float
    cost: float | None = None
    variant: str = "kmeans"  # the membership z(x) the profile was estimated with

    def to_json(self) -> dict[str, Any]:
        return {
            "psi": [float(v) for v in self.psi],
            "counts": [float(v) for v in self.counts],
            "overall_error": float(self.overall_error),
            "n_prompts": int(self.n_prompts),
            "prior_strength": float(self.prior_strength),
            "cost": self.cost,
        }

    @classmethod
    def from_json(cls, model: str, obj: Mapping[str, Any], variant: str = "kmeans") -> ModelProfile:
        return cls(model=model, variant=variant, psi=np.asarray(obj["psi"], dtype=np.float64),
                   counts=np.asarray(obj["counts"], dtype=np.float64),
                   overall_error=float(obj["overall_error"]), n_prompts=int(obj["n_prompts"]),
                   prior_strength=float(obj["prior_strength"]),
                   cost=None if obj.get("cost") is None else float(obj["cost"]))


def estimate_profile(model: str, weights: np.ndarray, scores: np.ndarray, *, prior_strength: float,
                     cost: float | None = None, variant: str = "kmeans",
                     difficulty: np.ndarray | None = None, row_weights: np.ndarray | None = None) -> ModelProfile:
    """Profile one model from its scores (in [0, 1]) on validation prompts with memberships ``weights``
    (``difficulty``: δ for the difficulty prior, None for the flat one; ``row_weights``: importance
    weights of prompts chosen by active allocation, :func:`shrunk_cluster_errors`)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(weights):
        raise ValueError(f"{len(s)} scores for {len(weights)} validation prompts")
    if np.any((s < 0) | (s > 1)) or not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite and in [0, 1]")
    psi, counts = shrunk_cluster_errors(weights, 1.0 - s[:, None], prior_strength, difficulty, row_weights)
    overall = float(1.0 - s.mean()) if row_weights is None else float(
        1.0 - np.dot(np.asarray(row_weights, dtype=np.float64), s) / np.sum(row_weights))
    return ModelProfile(model=model, psi=psi[0], counts=counts, overall_error=overall,
                        n_prompts=len(s), prior_strength=float(prior_strength), cost=cost, variant=variant)


def _profiles_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p if p.suffix == ".json" and not p.is_dir() else p / PROFILES_FILE


def _read_doc(p: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
    if doc.get("format") != PROFILES_FORMAT:
        raise ValueError(f"{p}: unsupported profiles format {doc.get('format')!r}; expected {PROFILES_FORMAT}")
    return doc


def save_profiles(path: str | os.PathLike[str], profiles: Sequence[ModelProfile], *,
                  artifact_version: str | None = None) -> Path:
    """Write ``profiles.json`` (in a folder, or at a ``.json`` path), merging with what is there.

    Layout: ``{"format": 1, "artifact_version": ..., "models": {model: {variant: profile}}}``.
    Profiles live apart from the router artifact, so adding a model never refits the router.
    """
    p = _profiles_path(path)
    doc: dict[str, Any] = _read_doc(p) if p.is_file() else {"format": PROFILES_FORMAT, "models": {}}
    if artifact_version is not None:
        if doc.get("artifact_version") not in (None, artifact_version):
            raise ValueError(f"{p}: profiles belong to artifact {doc['artifact_version']}, not {artifact_version}")
        doc["artifact_version"] = artifact_version
    for prof in profiles:
        doc["models"].setdefault(prof.model, {})[prof.variant] = prof.to_json()
    doc["models"] = dict(sorted(doc["models"].items()))
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    tmp.replace(p)
    return p


def load_profiles(path: str | os.PathLike[str], variant: str = "kmeans") -> dict[str, ModelProfile]:
    """The profiles of every model for one variant (models without that variant are left out)."""
    p = _profiles_path(path)
    doc = _read_doc(p)
    return {name: ModelProfile.from_json(name, by_variant[variant], variant)
            for name, by_variant in doc["models"].items() if variant in by_variant}


def profiles_artifact_version(path: str | os.PathLike[str]) -> str | None:
    v = _read_doc(_profiles_path(path)).get("artifact_version")
    return None if v is None else str(v)
