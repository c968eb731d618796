"""Builds the routing policy the gateway serves ``model: "auto"`` with.

Two policies can be configured (``router.policy``):

- ``cheapest``: the documented placeholder :class:`routing.policy.CheapestPolicy`
  (cheapest ``router_cost`` first, prompt ignored). No embedding, no profiles.
- ``uniroute``: the fitted UniRoute artifact in ``router.artifact`` (``uniroute router
  fit --out DIR``), with the ``learnedmap`` or ``kmeans`` variant. The prompt's text is
  embedded by the artifact's embedder through a :class:`routing.batcher.MicroBatcher`
  (one worker thread, micro-batches across concurrent requests, in-memory LRU plus the
  on-disk cache). Each model's profile Ψ(h) comes from the profiles stored beside the
  artifact (``profiles.json``); a registry model without a profile is never chosen by
  ``auto`` but can still be called by name.

:func:`build_router` is called in the app's lifespan, never at import time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.config import ConfigError, GatewayConfig
from gateway.pacing import DEFAULT_LAMBDA_GRID, CostCurve
from routing.policy import CheapestPolicy, GatewayPolicy, PoolModel

EmbedFn = Callable[[str], Awaitable[np.ndarray]]
logger = logging.getLogger("uniroute.router")


@dataclass
class RouterBundle:
    """What the lifespan needs from the router: the policy, its embed function, the profiles, a closer."""

    policy: GatewayPolicy
    embed: EmbedFn | None = None
    profiles: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # model -> Ψ(h)
    profile_counts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # model -> prompts per cluster
    version: str | None = None  # the artifact version the profiles belong to
    close: Callable[[], Awaitable[None]] | None = None

    async def aclose(self) -> None:
        if self.close is not None:
            await self.close()


def load_profiles(config: GatewayConfig) -> tuple[dict[str, np.ndarray], str | None]:
    """The per-model profiles recorded beside the configured artifact, for the configured variant."""
    psi, _, version = load_profiles_with_counts(config)
    return psi, version


def load_profiles_with_counts(config: GatewayConfig
                              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], str | None]:
    from pathlib import Path

    from routing.profiles import PROFILES_FILE, profiles_artifact_version
    from routing.profiles import load_profiles as _load

    assert config.router.artifact is not None
    if not (Path(config.router.artifact) / PROFILES_FILE).is_file():
        return {}, {}, None  # profiles may live in the database only
    profiles = _load(config.router.artifact, config.router.variant)
    return ({name: p.psi for name, p in profiles.items()}, {name: p.counts for name, p in profiles.items()},
            profiles_artifact_version(config.router.artifact))


#: prompts up to this many characters are embedded on the event loop by the static embedder (a 700-character
#: MMLU-Pro prompt ~0.6 ms of CPU, 4,096 characters ~1.4 ms, on the loaded dev VM); longer ones in the embedder's
#: worker thread, so that no prompt holds the loop for long
INLINE_EMBED_MAX_CHARS = 4096


async def build_router(config: GatewayConfig, *, warm_up: bool = True,
                       on_embedding: Callable[[str], None] | None = None) -> RouterBundle:
    """Load the configured policy (and, for UniRoute, its embedder and profiles). ``on_embedding(source)``
    is told where each request's prompt embedding came from ("memory", "disk" or "computed")."""
    r = config.router
    if r.policy == "cheapest":
        return RouterBundle(policy=CheapestPolicy())
    from routing.artifact import RouterArtifact, UniRoutePolicy
    from routing.batcher import MicroBatcher
    from routing.embedder import EmbeddingCache, StaticEmbedder, make_inner_embedder

    assert r.artifact is not None
    try:
        artifact = RouterArtifact.load(r.artifact)
        policy = UniRoutePolicy(artifact, r.variant)
        profiles, counts, version = load_profiles_with_counts(config)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ConfigError(f"router.artifact {r.artifact!r}: {exc}") from exc
    if version is not None and version != artifact.version:
        raise ConfigError(f"router.artifact {r.artifact!r}: profiles.json belongs to artifact version {version}, "
                          f"the artifact is {artifact.version}; re-profile the models")
    cache_dir = config.resolve_path(r.embed_cache_dir) if r.embed_cache_dir else None
    embedder = make_inner_embedder(artifact.embedder_path, cache_dir=cache_dir)
    if embedder.id != artifact.embedder_id:
        raise ConfigError(f"router.artifact {r.artifact!r} was fitted with embedder {artifact.embedder_id!r}, "
                          f"but this gateway loads {embedder.id!r}")
    # the disk cache is read (dataset / validation prompts are warm) but request prompts are never
    # appended to it: only the batcher's bounded LRU remembers them (memory stays flat under new prompts)
    # a static embedding of a short prompt costs less than the thread hop: on the loop (docs/PERFORMANCE.md)
    inline = INLINE_EMBED_MAX_CHARS if isinstance(embedder, StaticEmbedder) and r.max_wait_ms == 0 else 0
    batcher = MicroBatcher(embedder, max_batch=r.max_batch, max_wait_ms=r.max_wait_ms,
                           disk=EmbeddingCache(embedder.id, cache_dir), inline_max_chars=inline)
    if warm_up:
        # load the model weights and run one forward pass now, not on the first request
        await batcher.embed("warm-up")
    batcher.on_lookup = on_embedding  # after the warm-up: count request prompts only
    logger.info("router: %s, K=%d, artifact %s, %d profiled models", policy.name, artifact.k, artifact.version,
                len(profiles))
    return RouterBundle(policy=policy, embed=batcher.embed, profiles=profiles, profile_counts=counts,
                        version=artifact.version,
                        close=batcher.aclose)


def calibrated(config: GatewayConfig) -> GatewayConfig:
    """Apply ``router.target_cost`` / ``router.target_fraction_of_best``: a config whose default λ meets it.

    The λ is found by bisection on the artifact's validation prompts (see routing.calibration),
    over the profiled models of the registry. Without a target the config is returned unchanged.
    """
    r = config.router
    if r.policy != "uniroute" or (r.target_cost is None and r.target_fraction_of_best is None):
        return config
    from routing.artifact import RouterArtifact
    from routing.calibration import calibrate_lambda, target_from_fraction
    from routing.policy import PoolModel
    from routing.profiles import load_profiles as _load

    assert r.artifact is not None
    artifact = RouterArtifact.load(r.artifact)
    profiles = _load(r.artifact, r.variant)
    names = {m.name for m in config.models if m.routable}
    pool = [PoolModel(name=n, cost=next(m.router_cost for m in config.models if m.name == n), psi=p.psi)
            for n, p in profiles.items() if n in names]
    if not pool:
        raise ConfigError("router calibration: no model of the registry has a profile beside the artifact")
    if r.target_fraction_of_best is not None:
        target = target_from_fraction(pool, [profiles[m.name].overall_error for m in pool], r.target_fraction_of_best)
    else:
        assert r.target_cost is not None
        target = r.target_cost
    try:
        cal = calibrate_lambda(artifact.membership(artifact.val_embeddings, r.variant), pool, target)
    except ValueError as exc:
        raise ConfigError(f"router calibration: {exc}") from exc
    lam = min(max(cal.lam, r.lambda_min), r.lambda_max)
    logger.info("router calibration: target cost %.4f -> default λ %.6g (expected cost %.4f, error %.4f)",
                target, lam, cal.expected_cost, cal.expected_error)
    return config.model_copy(update={"router": r.model_copy(update={"default_lambda": lam})})


class CostCurves:
    """The served policy's calibration curve C(λ) over the registry's current pool: the budget pacer's
    feed-forward (gateway/pacing.py).

    For the UniRoute policy, C(λ) is the expected mean normalised cost of routing the artifact's validation
    prompts at λ (:func:`routing.calibration.cost_curve`, the curve ``uniroute router calibrate`` bisects), on
    :data:`~gateway.pacing.DEFAULT_LAMBDA_GRID`; it is computed again when the pool changes (a few ms). Other
    policies have none (None)."""

    def __init__(self, policy: GatewayPolicy, pool: Callable[[], Sequence[PoolModel]],
                 grid: Sequence[float] = DEFAULT_LAMBDA_GRID) -> None:
        self.policy = policy
        self.pool = pool
        self.grid = tuple(grid)
        self._z: np.ndarray | None = None
        self._last: tuple[Sequence[PoolModel], CostCurve | None] | None = None

    def __call__(self) -> CostCurve | None:
        from routing.artifact import UniRoutePolicy

        if not isinstance(self.policy, UniRoutePolicy):
            return None
        pool = self.pool()
        last = self._last
        if last is not None and last[0] is pool:
            return last[1]
        from routing.calibration import cost_curve

        if self._z is None:
            self._z = self.policy.artifact.membership(self.policy.artifact.val_embeddings, self.policy.variant)
        try:
            curve: CostCurve | None = CostCurve.from_points(self.grid, cost_curve(self._z, pool, self.grid).tolist())
        except ValueError:  # no profiled model: nothing to pace with
            curve = None
        self._last = (pool, curve)
        return curve


def build_policy(config: GatewayConfig) -> tuple[GatewayPolicy, EmbedFn | None]:
    """The placeholder policy only (kept for callers that build a policy synchronously)."""
    if config.router.policy == "cheapest":
        return CheapestPolicy(), None
    raise ConfigError("router.policy 'uniroute' is built by build_router() inside the app's lifespan")
