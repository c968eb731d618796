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

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from routing.decision import Decider, normalise


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
    return normalise([m.cost for m in pool])


def rank_by_objective(names: Sequence[str], errors: np.ndarray, costs: np.ndarray, lam: float,
                      cluster: int | None, decider: Decider | None = None) -> RoutingDecision:
    """Rank candidates by ``errors + lam * costs / max costs`` with :class:`routing.decision.Decider`
    (the evaluation's decision): ties go to the cheaper model, then by name.

    ``decider`` is ``Decider(costs, names)`` built once per pool; pass it to skip rebuilding it.
    """
    d = decider if decider is not None else Decider(costs, names)
    err = np.asarray(errors, dtype=np.float64)
    objective = d.objective(err, lam)
    order = d.best_first(objective)
    # permuted as arrays, turned into plain floats once, and tuple.__new__ in C for each candidate:
    # this runs on every `auto` request, where a Python-level loop over the pool is most of the cost
    rows = zip([names[j] for j in order.tolist()], err[order].tolist(), d.costs[order].tolist(),
               objective[order].tolist(), strict=True)
    return RoutingDecision(ranked=list(map(_candidate, rows)), cluster=cluster, lam=lam)


_candidate = functools.partial(tuple.__new__, Candidate)  # Candidate(*row) without the Python-level __new__


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
