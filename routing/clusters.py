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

    def __init__(self, n_clusters: int = 20, *, random_state: int = 0, n_init: int = 2,
                 max_iter: int = 100) -> None:
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.n_init = n_init
        self.max_iter = max_iter

    def fit(self, x: np.ndarray) -> ClusterMap:
        from sklearn.cluster import KMeans

        k = min(self.n_clusters, len(x))
        km = KMeans(n_clusters=k, n_init=self.n_init, max_iter=self.max_iter, random_state=self.random_state)
        km.fit(np.asarray(x, dtype=np.float64))
        self.centroids_ = np.asarray(km.cluster_centers_, dtype=np.float64)
        return self

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
