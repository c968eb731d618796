"""Prompt clusters and the membership map z(x).

:class:`Membership` is the one implementation of z(x), for the estimators, the router
artifact and the gateway: hard nearest K-means centroid (one-hot), soft K-means
z_k(x) ∝ exp(−‖x − μ_k‖² / τ), and LearnedMap softmax(θᵀ[x, 1]).

:class:`ClusterMap` fits K-means on the unit-norm embeddings of the training prompts
and maps prompts through :meth:`Membership.kmeans`.
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class Membership:
    """z(x): an affine map of the embedding to K logits, then one-hot or softmax.

    * ``temperature=None``: z is the one-hot of the largest logit (ties: the lowest k);
    * otherwise z = softmax(logits / temperature).

    K-means (:meth:`kmeans`) has logits 2x·μ_k − ‖μ_k‖² = ‖x‖² − ‖x − μ_k‖²: the largest is
    the nearest centroid, and softmax(logits/τ) = softmax(−‖x − μ_k‖²/τ) since the ‖x‖²
    shift cancels. LearnedMap (:meth:`learned`) has logits θᵀ[x, 1] and temperature 1.

    ``x`` is one embedding (d,) → z (K,), or a batch (n, d) → (n, K). The logits are a
    matrix product, so a prompt's z alone and in a batch may differ in the last bits.
    """

    __slots__ = ("bias", "temperature", "weight")

    def __init__(self, weight: np.ndarray, bias: np.ndarray, temperature: float | None = None) -> None:
        self.weight = np.ascontiguousarray(weight, dtype=np.float64)  # (d, K)
        self.bias = np.ascontiguousarray(bias, dtype=np.float64).reshape(-1)  # (K,)
        self.temperature = None if temperature is None else float(temperature)
        if self.weight.ndim != 2 or self.weight.shape[1] != len(self.bias):
            raise ValueError(f"weight {self.weight.shape} and bias {self.bias.shape} do not make K logits")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 or None, got {temperature!r}")

    @classmethod
    def kmeans(cls, centroids: np.ndarray, temperature: float | None = None) -> Membership:
        """Nearest centroid (``temperature=None``) or soft K-means with temperature τ."""
        mu = np.asarray(centroids, dtype=np.float64)
        return cls(2.0 * mu.T, -(mu * mu).sum(1), temperature)

    @classmethod
    def learned(cls, theta: np.ndarray) -> Membership:
        """LearnedMap: z(x) = softmax(θᵀ[x, 1]), θ of shape (d + 1, K)."""
        theta = np.asarray(theta, dtype=np.float64)
        return cls(theta[:-1], theta[-1], 1.0)

    @property
    def k(self) -> int:
        return len(self.bias)

    @property
    def theta(self) -> np.ndarray:
        """The logits' parameters as one (d + 1, K) matrix: logits = θᵀ[x, 1]."""
        return np.vstack([self.weight, self.bias[None, :]])

    def logits(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.asarray(x, dtype=np.float64) @ self.weight
        out += self.bias
        return out

    def nearest(self, x: np.ndarray) -> np.ndarray:
        """The most likely cluster: the argmax of z, (n,) or a 0-d array for one embedding."""
        return np.asarray(self.logits(x).argmax(axis=-1))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        logits = self.logits(x)
        if self.temperature is None:
            idx = logits.argmax(axis=-1)
            z = np.zeros_like(logits)
            if z.ndim == 1:
                z[idx] = 1.0
            else:
                z[np.arange(len(z)), idx] = 1.0
            return z
        if self.temperature != 1.0:
            logits /= self.temperature
        if logits.ndim == 1:  # one prompt (the gateway): the same steps as softmax() without keepdims
            logits -= logits.max()
            np.exp(logits, out=logits)
            logits /= logits.sum()
            return logits
        return softmax(logits)


class ClusterMap:
    """K-means clusters of prompt embeddings (scikit-learn estimator contract)."""

    def __init__(self, n_clusters: int = 20, *, random_state: int = 0, n_init: int = 1,
                 max_iter: int = 30, tol: float = 1e-3) -> None:
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, x: np.ndarray) -> ClusterMap:
        """k-means++ seeding (scikit-learn, plain: one local trial) and Lloyd iterations as
        float32 matrix products (at most ``max_iter``, stopping when the inertia improves by
        less than ``tol`` relative).

        scikit-learn's ``KMeans`` gives the same clusters but is several times slower on
        this 2-core machine; the evaluation fits dozens of these per run.
        """
        from sklearn.cluster import kmeans_plusplus

        x32 = np.ascontiguousarray(x, dtype=np.float32)
        k = min(self.n_clusters, len(x32))
        rng = np.random.default_rng(self.random_state)
        best: tuple[float, np.ndarray] | None = None
        for _ in range(self.n_init):
            seed = int(rng.integers(2**31 - 1))
            centres, _ = kmeans_plusplus(x32, k, random_state=seed, n_local_trials=1)
            inertia, centres = self._lloyd(x32, np.asarray(centres, dtype=np.float32))
            if best is None or inertia < best[0]:
                best = (inertia, centres)
        assert best is not None
        self.centroids_ = best[1].astype(np.float64)
        self.inertia_ = best[0]
        return self

    def _lloyd(self, x: np.ndarray, centres: np.ndarray) -> tuple[float, np.ndarray]:
        xx = (x * x).sum(1)
        prev = np.inf
        inertia = np.inf
        for _ in range(self.max_iter):
            d = xx[:, None] - 2.0 * (x @ centres.T) + (centres * centres).sum(1)[None, :]
            lab = d.argmin(1)
            inertia = float(np.maximum(d[np.arange(len(x)), lab], 0).sum())
            counts = np.bincount(lab, minlength=len(centres)).astype(np.float32)
            onehot = np.zeros((len(x), len(centres)), dtype=np.float32)
            onehot[np.arange(len(x)), lab] = 1.0
            sums = onehot.T @ x
            empty = counts == 0
            centres = np.where(empty[:, None], centres, sums / np.maximum(counts, 1)[:, None])
            if prev - inertia <= self.tol * max(prev, 1e-12) and np.isfinite(prev):
                break
            prev = inertia
        return inertia, centres

    @classmethod
    def from_centroids(cls, centroids: np.ndarray) -> ClusterMap:
        cm = cls(n_clusters=len(centroids))
        cm.centroids_ = np.asarray(centroids, dtype=np.float64)
        return cm

    @property
    def k(self) -> int:
        return int(self.centroids_.shape[0])

    def membership(self, temperature: float | None = None) -> Membership:
        """z(x) of these clusters: nearest centroid, or soft with ``temperature``."""
        return Membership.kmeans(self.centroids_, temperature)

    def assign(self, x: np.ndarray) -> np.ndarray:
        """Nearest centroid of each row, shape (n,)."""
        return self.membership().nearest(np.atleast_2d(x))

    def weights(self, x: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """z(x), shape (n, K): one-hot when ``temperature`` is None, else a softmax of −d²/τ."""
        return self.membership(temperature)(np.atleast_2d(x))
