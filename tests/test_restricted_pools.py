"""Keys restricted to some models (``allowed_models``) route within their pool, and cost no more than an
unrestricted key: the restricted pool is one tuple per (registry snapshot, allowed set)
(gateway/serving/pools.py), which the UniRoute policy prepares once, like the full pool (routing/artifact.py).
Both caches are bounded.

The chat service plans in process (``ChatService.plan``: auth, λ, the pool, the ranking) over a real
:class:`UniRoutePolicy`; the policy's preparations are counted by the :class:`Decider` it builds for each
pool it prepares.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest

import routing.artifact
from gateway.config import parse_config
from gateway.serving.forwarding import Forwarder
from gateway.serving.interfaces import OpenAuthenticator, Principal
from gateway.serving.pools import RestrictedPools
from gateway.serving.registry import ModelEntry, Registry, with_profiles
from gateway.serving.service import ChatContext, ChatService
from routing.artifact import RouterArtifact, UniRoutePolicy
from routing.decision import Decider
from routing.policy import PoolModel
from tests.fake_upstream import FakeUpstream

NAMES = [f"m{i}" for i in range(6)]


def _policy() -> UniRoutePolicy:
    art = RouterArtifact(embedder_id="test", k=2, centroids=np.eye(2), theta=None, val_prompt_ids=[],
                         val_prompts=[], val_embeddings=np.zeros((0, 2)), training_set_hash="h", variant="kmeans")
    return UniRoutePolicy(art, "kmeans")


def _entries(names: list[str]) -> list[ModelEntry]:
    cfg = parse_config({"models": [{"name": n, "router_cost": 1 + i, "input_cost_per_1m": 1.0,
                                    "litellm_params": {"model": f"openai/{n}", "api_base": "http://x.invalid/v1",
                                                       "api_key": "t"}} for i, n in enumerate(names)]})
    profiles = {n: np.array([0.1 * (i % 4), 0.5 - 0.1 * (i % 3)]) for i, n in enumerate(names)}
    return with_profiles([ModelEntry.from_spec(m) for m in cfg.models], profiles)


async def _embed(text: str) -> np.ndarray:
    return np.array([1.0, 0.0]) if "first" in text else np.array([0.0, 1.0])


class CountingDecider(Decider):
    built = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        CountingDecider.built += 1
        super().__init__(*args, **kwargs)


@pytest.fixture
def preparations(monkeypatch: pytest.MonkeyPatch) -> type[CountingDecider]:
    """How many pools the policy prepared (each preparation builds one Decider)."""
    CountingDecider.built = 0
    monkeypatch.setattr(routing.artifact, "Decider", CountingDecider)
    return CountingDecider


def _service() -> tuple[ChatService, Registry]:
    registry = Registry(_entries(NAMES))
    fw = Forwarder(max_attempts=3, upstream=FakeUpstream())
    registry.on_replace(fw.register)
    return ChatService(registry, _policy(), fw, embed=_embed, authenticator=OpenAuthenticator()), registry


def _key(key_id: int, allowed: set[str] | None) -> Principal:
    return Principal(key_id=key_id, key_name=f"k{key_id}", key_prefix="", default_lambda=0.1,
                     allowed_models=frozenset(allowed) if allowed is not None else None)


async def _ranked(svc: ChatService, principal: Principal, text: str) -> list[str]:
    from gateway.protocol import parse_chat_request

    req = parse_chat_request({"model": "auto", "messages": [{"role": "user", "content": text}]})
    plan = await svc.plan(req, ChatContext(request_id="r", principal=principal))
    assert plan.decision is not None
    return [c.model for c in plan.decision.ranked]


async def test_a_restricted_key_routes_within_its_pool_prepared_once(preparations: type[CountingDecider]) -> None:
    svc, registry = _service()
    keys = {_key(1, {"m1", "m3"}): {"m1", "m3"}, _key(2, {"m0", "m4", "m5", "gone"}): {"m0", "m4", "m5"},
            _key(3, None): set(NAMES)}
    for _round, (principal, pool), text in zip(range(60), itertools.cycle(keys.items()),
                                               itertools.cycle(["first q", "second q"]),
                                               strict=False):
        ranked = await _ranked(svc, principal, text)
        assert set(ranked) == pool, (principal.key_name, ranked)  # exactly its allowed models, every request
    assert preparations.built == 3  # the full pool and the two restrictions, once each, over 60 requests

    # a new snapshot: each pool is prepared again, once, and a restricted key sees the new registry
    registry.replace(_entries(["m1", "m2", "m4", "m5"]))
    for _ in range(5):
        for principal, want in ((_key(1, {"m1", "m3"}), {"m1"}), (_key(2, {"m0", "m4", "m5"}), {"m4", "m5"}),
                                (_key(3, None), {"m1", "m2", "m4", "m5"})):
            assert set(await _ranked(svc, principal, "first q")) == want
    assert preparations.built == 6


async def test_more_restrictions_than_the_bound_still_route_correctly() -> None:
    svc, _ = _service()
    svc.restricted = RestrictedPools(size=2)
    subsets = [set(c) for r in (1, 2, 3) for c in itertools.combinations(NAMES, r)]
    for i, allowed in enumerate(subsets * 2):
        assert set(await _ranked(svc, _key(100 + i, allowed), "first q")) == allowed
        assert len(svc.restricted) <= 2


def test_the_restricted_pools_are_bounded_and_the_same_tuple_while_kept() -> None:
    pool = tuple(PoolModel(n, 1.0, np.zeros(2)) for n in NAMES)
    cache = RestrictedPools(size=4)
    sets = [frozenset(c) for c in itertools.combinations(NAMES, 2)]  # 15 allowed sets
    first = {s: cache.get(pool, s) for s in sets}
    assert len(cache) == 4
    for s, got in first.items():
        assert tuple(m.name for m in got) == tuple(n for n in NAMES if n in s)  # in the pool's order
    last = sets[-1]
    assert cache.get(pool, last) is first[last]  # kept: the same object, which the policy's cache knows
    assert cache.get(pool, sets[0]) is not first[sets[0]] and cache.get(pool, sets[0]) == first[sets[0]]  # rebuilt
    other = tuple(PoolModel(n, 2.0, np.zeros(2)) for n in NAMES)  # another snapshot: its own entry
    assert cache.get(other, last)[0] is other[NAMES.index(sorted(last)[0])]
    assert len(cache) == 4
    with pytest.raises(ValueError, match="at least 1"):
        RestrictedPools(size=0)


def test_the_policys_prepared_pools_are_bounded(preparations: type[CountingDecider],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing.artifact, "PREPARED_POOLS", 3)
    policy = _policy()
    pools = [tuple(PoolModel(n, 1.0 + i, np.array([0.1, 0.2])) for i, n in enumerate(NAMES[:j])) for j in range(1, 6)]
    e = np.array([1.0, 0.0])
    for pool in pools:
        policy.rank(e, pool, 0.1)
    assert preparations.built == 5
    for pool in pools[-3:]:  # the three used last are kept
        assert [c.model for c in policy.rank(e, pool, 0.1).ranked]
    assert preparations.built == 5
    policy.rank(e, pools[0], 0.1)  # dropped: prepared again
    assert preparations.built == 6
    assert len(policy._prepared_pools) == 3
