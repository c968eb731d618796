"""The routing dry-run (``POST /v1/route``, ``uniroute route``): what a chat request would be routed to, and why.

:meth:`ChatService.route <gateway.serving.service.ChatService.route>` runs :meth:`ChatService.plan` exactly as
a chat request does (authentication, λ, rate limit, the policy's ranking, a tenant profile overlay) and hands
the plan to :func:`route_report`, which only describes it: the full ranking (no second ranking is computed),
the prompt's cluster and membership z(x), the order the forwarder would try the candidates in (cooling models
last, at most ``fallback.max_attempts``), and the models left out of the ranking with the reason.

Nothing is called, reserved, charged or logged: a dry-run writes no request-log row, so it is never a target
of feedback and never counts in the traffic of the request log (docs/ROUTING_FEATURES.md).

Only the caller's models are named (docs/security/tenants.md §5–6): a key with a ``models`` list sees its own
models only; of the registered models it may not use it learns how many there are (``excluded_not_allowed``),
never their names. The operator's dry-run on behalf of a key (``POST /admin/keys/{name}/route``, ``view:
"operator"``) is the same plan for that key, and also lists those models by name with the code ``not_allowed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from gateway.serving.interfaces import Principal
from gateway.serving.registry import ModelEntry, RegistrySnapshot
from routing.policy import GatewayPolicy, RoutingDecision


class TryOrder(Protocol):
    """What the dry-run needs of the forwarder: the order it would try candidates in, and who is cooling."""

    max_attempts: int

    def tries(self, candidates: Sequence[ModelEntry]) -> Sequence[ModelEntry]: ...

    def cooling(self, model: str) -> bool: ...


def membership(policy: GatewayPolicy, embedding: np.ndarray | None) -> list[float] | None:
    """z(x) of the prompt under ``policy`` (None for a prompt-agnostic policy)."""
    fn = getattr(policy, "membership", None)
    if embedding is None or fn is None:
        return None
    return [float(v) for v in np.asarray(fn(embedding)).reshape(-1)]


NOT_ALLOWED_REASON = ("not in the key's models list: auto never routes this key to it, and the key may not "
                      "call it by name")


def not_allowed(snapshot: RegistrySnapshot, principal: Principal, decision: RoutingDecision | None) -> list[str]:
    """The registered models ``auto`` left out because the key may not use them (its ``models`` list), in
    registry order; none for a named model (nothing is ranked) or a key without a list."""
    allowed = principal.allowed_models
    if decision is None or allowed is None:
        return []
    return [e.name for e in snapshot.entries if e.name not in allowed]


def excluded(snapshot: RegistrySnapshot, principal: Principal, decision: RoutingDecision | None,
             forwarder: TryOrder, *, operator: bool = False) -> list[dict[str, Any]]:
    """The models that ``auto`` would not try in rank order, with the reason (``code`` and a sentence).

    ``not_routable`` (``routable: false``: callable by name only), ``embedding`` (an embedding model: it
    serves /v1/embeddings, never chat) and ``not_profiled`` (no Ψ: never chosen by ``auto``) are left out of
    the ranking; ``cooling`` models are ranked but tried only after every
    healthy candidate. A model the key may not use is named only to the operator (``operator``: code
    ``not_allowed``); the key itself gets their number alone (:func:`not_allowed`).
    """
    if decision is None:  # a named model: served by that model alone, nothing is ranked
        return []
    allowed = principal.allowed_models
    ranked = {c.model for c in decision.ranked}
    out: list[dict[str, Any]] = []
    for entry in snapshot.entries:
        name = entry.name
        if allowed is not None and name not in allowed:
            if operator:
                out.append({"model": name, "code": "not_allowed", "reason": NOT_ALLOWED_REASON})
            continue
        if entry.kind == "embedding":
            out.append({"model": name, "code": "embedding",
                        "reason": "kind: embedding: serves /v1/embeddings, never chosen by auto for a chat"})
        elif not entry.routable:
            out.append({"model": name, "code": "not_routable",
                        "reason": "routable: false: served when called by name, never chosen by auto"})
        elif name not in ranked:
            if entry.psi is None:
                out.append({"model": name, "code": "not_profiled",
                            "reason": f"no profile Ψ for this router: never chosen by auto until profiled and "
                                      f"activated (`uniroute profile {name} --activate` or POST "
                                      f'/admin/models/{name}/profile {{"activate": true}})'})
            else:
                out.append({"model": name, "code": "not_ranked", "reason": "left out by the routing policy"})
        elif forwarder.cooling(name):
            out.append({"model": name, "code": "cooling",
                        "reason": "in cooldown after repeated failures (fallback.cooldown_*): ranked, but tried "
                                  "only after every healthy candidate"})
    return out


def route_report(*, requested_model: str, principal: Principal, lam: float, candidates: Sequence[ModelEntry],
                 decision: RoutingDecision | None, embedding: np.ndarray | None, policy: GatewayPolicy,
                 snapshot: RegistrySnapshot, forwarder: TryOrder, profile: str = "global",
                 operator: bool = False) -> dict[str, Any]:
    """The dry-run's answer for one planned request (see the module docstring for its fields). ``operator``:
    the admin's dry-run on behalf of the key, which also names the models the key may not use."""
    tries = [e.name for e in forwarder.tries(candidates)]
    ranking: list[dict[str, Any]] = []
    if decision is not None:
        ranking = [{"rank": i + 1, "model": c.model, "expected_error": c.expected_error, "cost": c.cost,
                    "objective": c.objective, "cooling": forwarder.cooling(c.model)}
                   for i, c in enumerate(decision.ranked)]
    return {
        "object": "uniroute.route",
        "requested_model": requested_model,
        "model": tries[0] if tries else None,  # the model the request would be sent to first
        "fallback_order": tries,  # the models it would try, in order (at most fallback.max_attempts)
        "lambda": lam,
        "policy": policy.name if decision is not None else None,
        "profile": profile if decision is not None else None,  # "global", or "key" with a tenant overlay
        "cluster": decision.cluster if decision is not None else None,
        "membership": membership(policy, embedding) if decision is not None else None,
        "ranking": ranking,
        "excluded": excluded(snapshot, principal, decision, forwarder, operator=operator),
        "excluded_not_allowed": len(not_allowed(snapshot, principal, decision)),  # a count: no names to the key
        "key": principal.key_name,
        "view": "operator" if operator else "key",
        "charged_usd": 0.0,  # a dry-run calls no model, reserves and charges nothing
    }
