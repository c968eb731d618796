"""The gateway-facing routing interface.

The gateway asks a :class:`GatewayPolicy` to rank a pool of models for one prompt.
Every policy (the placeholder :class:`CheapestPolicy`, UniRoute K-means and
LearnedMap, the baselines) answers through this one interface, so what the
evaluation measures is what the gateway serves.

Cost convention: ``PoolModel.cost`` is the model's scalar c(h) in any unit > 0.
Policies normalise it by the pool's maximum, so the objective of model h is
``expected_error(h) + λ · c(h) / max_h' c(h')`` and λ has the same meaning in any
cost unit: λ = 0.1 accepts paying the most expensive model's full cost for a
10-percentage-point drop in expected error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class PoolModel:
    """One routable model as the policy sees it."""

    name: str
    cost: float  # c(h) > 0, in the router's cost unit
    psi: np.ndarray | None = None  # per-cluster expected error Ψ(h) in [0,1]^K; None = not profiled


class Candidate(NamedTuple):  # a NamedTuple: built 27 times per request, ~10x cheaper than a frozen dataclass
    model: str
    expected_error: float  # in [0, 1]
    cost: float  # normalised: c(h) / max cost in the pool
    objective: float  # expected_error + λ · cost


@dataclass(frozen=True)
class RoutingDecision:
    ranked: list[Candidate]  # best first; the gateway falls back down this list
    cluster: int | None  # most likely cluster of the prompt; None for prompt-agnostic policies
    lam: float

    @property
    def chosen(self) -> Candidate:
        return self.ranked[0]


@runtime_checkable
class GatewayPolicy(Protocol):
    """What the gateway needs from a routing policy."""

    name: str
    needs_embedding: bool

    def rank(self, embedding: np.ndarray | None, pool: Sequence[PoolModel], lam: float) -> RoutingDecision:
        """Rank ``pool`` for one prompt (``embedding`` is its unit-norm vector, or None)."""
        ...


def normalised_costs(pool: Sequence[PoolModel]) -> np.ndarray:
    costs = np.asarray([m.cost for m in pool], dtype=np.float64)
    return costs / costs.max()


def rank_by_objective(
    names: Sequence[str], errors: np.ndarray, costs: np.ndarray, lam: float, cluster: int | None
) -> RoutingDecision:
    """Sort candidates by ``errors + lam * costs``; ties go to the cheaper model, then by name."""
    # plain floats: indexing numpy arrays element by element in the sort key costs ~10x more
    err: list[float] = np.asarray(errors, dtype=np.float64).tolist()
    cost: list[float] = np.asarray(costs, dtype=np.float64).tolist()
    objective: list[float] = (np.asarray(errors, dtype=np.float64) + lam * np.asarray(costs, dtype=np.float64)).tolist()
    order = sorted(range(len(names)), key=lambda j: (objective[j], cost[j], names[j]))
    ranked = [Candidate(names[j], err[j], cost[j], objective[j]) for j in order]
    return RoutingDecision(ranked=ranked, cluster=cluster, lam=lam)


class CheapestPolicy:
    """Placeholder policy: ignores the prompt and ranks by cost (cheapest first).

    Its expected error is unknown, reported as 0.5 for every model, so the ranking is
    by cost alone for any λ > 0. It needs no embedding and no profiles.
    """

    name = "cheapest"
    needs_embedding = False

    def rank(self, embedding: np.ndarray | None, pool: Sequence[PoolModel], lam: float) -> RoutingDecision:
        if not pool:
            raise ValueError("empty model pool")
        costs = normalised_costs(pool)
        errors = np.full(len(pool), 0.5)
        # rank by cost alone, whatever λ is: every expected error is the same
        decision = rank_by_objective([m.name for m in pool], errors, costs, 1.0, None)
        return replace(decision, lam=lam)
