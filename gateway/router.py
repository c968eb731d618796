"""Builds the routing policy the gateway serves ``model: "auto"`` with.

:func:`build_policy` returns ``(policy, embed)``. ``embed`` is an async
``embed(text) -> np.ndarray`` (unit-norm) when the policy needs the prompt's embedding,
else ``None``. Today only the documented placeholder :class:`routing.policy.CheapestPolicy`
is served (cheapest model first, prompt ignored); ``router.policy: uniroute`` plugs the
fitted UniRoute artifact in here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np

from gateway.config import ConfigError, GatewayConfig
from routing.policy import CheapestPolicy, GatewayPolicy

EmbedFn = Callable[[str], Awaitable[np.ndarray]]


def build_policy(config: GatewayConfig) -> tuple[GatewayPolicy, EmbedFn | None]:
    policy = config.router.policy
    if policy == "cheapest":
        return CheapestPolicy(), None
    raise ConfigError(
        f"router.policy {policy!r} is not available in this build yet; use 'cheapest' "
        f"(the placeholder that ranks models by router_cost)"
    )
