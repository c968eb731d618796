"""Prompt clusters: K-means on the unit-norm embeddings of the training prompts.

:class:`ClusterMap` holds the centroids and maps a prompt embedding to
cluster-membership weights z(x): hard nearest-centroid (one-hot), or soft with a
temperature τ, z_k(x) ∝ exp(−‖x − μ_k‖² / τ).
"""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def sq_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances, shape (n, K)."""
    x = np.atleast_2d(x)
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return np.maximum(d, 0.0)


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

    def assign(self, x: np.ndarray) -> np.ndarray:
        """Nearest centroid of each row, shape (n,)."""
        return np.asarray(sq_distances(x, self.centroids_).argmin(axis=1))

    def weights(self, x: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """z(x), shape (n, K): one-hot when ``temperature`` is None, else a softmax of −d²/τ."""
        d = sq_distances(x, self.centroids_)
        if temperature is None:
            z = np.zeros_like(d)
            z[np.arange(len(d)), d.argmin(axis=1)] = 1.0
            return z
        return softmax(-d / float(temperature))
