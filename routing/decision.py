"""The routing decision: one implementation for the evaluation and the gateway.

UniRoute routes prompt x to argmin_h  expected_error(x, h) + λ · c(h) / max_h' c(h'), with
expected_error(x, h) = Σ_k z_k(x) Ψ_k(h) (z(x): :class:`routing.clusters.Membership`).
The estimators (``decide``, the deferral curves, K selection), the λ calibration and the
gateway's :class:`routing.artifact.UniRoutePolicy` all decide through this module:

* :func:`expected_errors` computes Σ_k z_k Ψ_k(h);
* :class:`Decider` holds one pool's normalised costs and tie-break order and turns
  expected errors into the objective, the best model (``choose``) or the full ranking
  (``rank``, best first; the gateway falls back down it).

Tie-break (one rule): among models with the same objective the cheaper one comes
first, then the one whose name sorts first. Without names (a bare error matrix) the
pool position stands in for the name. Ties are exact float equality: no tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def normalise(costs: np.ndarray | Sequence[float]) -> np.ndarray:
    """c(h) / max c: λ then means the same in any cost unit."""
    c = np.asarray(costs, dtype=np.float64)
    return c / c.max()


def expected_errors(z: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """Σ_k z_k(x) Ψ_k(h): memberships ``z`` (n, K) or (K,), profiles ``psi`` (m, K) → (n, m) or (m,).

    One dot product of two length-K vectors per (prompt, model) pair (``np.vecdot``), not a
    matrix product: a matrix product sums in an order that depends on the row's position
    and on the batch's shape, so two models with identical Ψ could get expected errors an
    ulp apart (the tie-break would never see their tie), and one prompt would get different
    values alone (the gateway) and in a batch (the evaluation). A pair's dot product is the
    same call whatever the batch.
    """
    z = np.asarray(z, dtype=np.float64)
    psi = np.asarray(psi, dtype=np.float64)
    return np.asarray(np.vecdot(z[..., None, :], psi))


def tie_order(costs: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
    """Pool indices in tie-break order: cheaper first, then by name (by pool position without names)."""
    c = np.asarray(costs, dtype=np.float64)
    if names is None:
        second = np.arange(len(c))
    else:
        if len(names) != len(c):
            raise ValueError(f"{len(names)} names for {len(c)} costs")
        by_name = sorted(range(len(c)), key=lambda j: names[j])
        second = np.empty(len(c), dtype=np.int64)
        second[by_name] = np.arange(len(c))
    return np.lexsort((second, c))


class Decider:
    """Decisions over one pool: objective = expected error + λ · c / max c, ties by :func:`tie_order`.

    Build it once per pool (the gateway: once per registry snapshot). Errors are (n, m) or
    (m,) in pool order; returned indices are pool positions. Looking at the columns in
    tie-break order makes numpy's first-occurrence rule (``argmin``, stable ``argsort``)
    the tie-break.
    """

    __slots__ = ("costs", "order")

    def __init__(self, costs: np.ndarray | Sequence[float], names: Sequence[str] | None = None) -> None:
        self.costs = normalise(costs)  # pool order
        self.order = tie_order(self.costs, names)

    def objective(self, errors: np.ndarray, lam: float) -> np.ndarray:
        return np.asarray(errors, dtype=np.float64) + lam * self.costs

    def best(self, objective: np.ndarray) -> np.ndarray:
        """The best model of each row of ``objective`` (pool positions)."""
        return self.order[np.argmin(objective[..., self.order], axis=-1)]

    def best_first(self, objective: np.ndarray) -> np.ndarray:
        """Pool positions sorted best first along the last axis of ``objective``."""
        return self.order[np.argsort(objective[..., self.order], axis=-1, kind="stable")]

    def choose(self, errors: np.ndarray, lam: float) -> np.ndarray:
        return self.best(self.objective(errors, lam))

    def choose_each(self, errors: np.ndarray, lams: np.ndarray | Sequence[float]) -> np.ndarray:
        """:meth:`choose` at every λ of ``lams`` at once: shape ``(len(lams), *errors.shape[:-1])``.

        The same objective, element for element, and the same tie-break: the columns are put in
        tie-break order once (not the whole objective block after it is built)."""
        e = np.asarray(errors, dtype=np.float64)[..., self.order]
        lam = np.asarray(lams, dtype=np.float64).reshape((-1,) + (1,) * e.ndim)
        return self.order[np.argmin(e + lam * self.costs[self.order], axis=-1)]

    def rank(self, errors: np.ndarray, lam: float) -> np.ndarray:
        return self.best_first(self.objective(errors, lam))
