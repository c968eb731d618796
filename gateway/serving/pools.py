"""A key's ``allowed_models`` restriction of the routing pool, built once per (pool, allowed set).

The routing policy prepares a pool once and remembers it by identity (``UniRoutePolicy._prepared``: the
profiles stacked, the costs normalised), so the full pool, one registry snapshot's tuple, costs that only once
per snapshot. :class:`RestrictedPools` gives a key restricted to some models the same: the same tuple of its
allowed models, request after request, until the pool (the snapshot, or the key's tenant overlay) changes. It
is bounded: at most ``size`` (pool, allowed set) pairs are kept, the least recently used is dropped.

No HTTP, no SQL.
"""

from __future__ import annotations

from collections import OrderedDict

from routing.policy import PoolModel

#: How many (pool, allowed set) restrictions are kept: more distinct restrictions in use than this rebuild theirs.
RESTRICTED_POOLS = 256

Pool = tuple[PoolModel, ...]


class RestrictedPools:
    """``pool`` restricted to ``allowed``, the same tuple for the same (pool object, allowed set)."""

    def __init__(self, size: int = RESTRICTED_POOLS) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.size = size
        # (id(pool), allowed) -> (pool, its restriction); the pool is kept so its id is not reused meanwhile
        self._cache: OrderedDict[tuple[int, frozenset[str]], tuple[Pool, Pool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, pool: Pool, allowed: frozenset[str]) -> Pool:
        """The models of ``pool`` (in its order) whose names are in ``allowed``."""
        key = (id(pool), allowed)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is pool:
            self._cache.move_to_end(key)
            return hit[1]
        restricted = tuple(m for m in pool if m.name in allowed)
        self._cache[key] = (pool, restricted)
        self._cache.move_to_end(key)
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return restricted
