"""Requests-per-minute limits per API key.

:class:`RedisRateLimiter` (recommended, and required for more than one process) keeps a
sliding-window log per key in a Redis sorted set, updated by one Lua script, so the check
and the count are atomic across every replica and worker and the window is exact (no
fixed-window burst of 2x the limit at a window edge). Timestamps come from the Redis
server's clock (``TIME``), so replicas with skewed clocks agree. Memory is O(limit) per
active key, and keys expire after one idle window.

Why Redis and not the database: a limiter is consulted on every request, before any
other work; the Redis check takes 0.12 ms p50 on loopback (``benchmarks/store_latency.py``) and never contends with the
request log or budget writes, while a counter row in SQL would add a write transaction
(and, on SQLite, the database-wide write lock) to every request. Budgets, which need
durability, stay in SQL.

If Redis is unreachable the limiter fails open by default (the request is served, a
warning is logged at most every 10 s and ``uniroute_rate_limiter_errors_total`` counts
it): an outage of the limiter should not become an outage of the gateway. Set
``fail_open=False`` to refuse with 503 instead.

:class:`LocalRateLimiter` is the same algorithm in process memory: correct for ONE
process only (``uvicorn --workers 2`` gives each worker its own window, so the effective
limit doubles). It is the fallback when no ``redis_url`` is configured.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from gateway.errors import RateLimitError, ServiceUnavailableError
from gateway.serving.interfaces import Principal

if TYPE_CHECKING:
    from gateway.metrics import Metrics

logger = logging.getLogger("uniroute.ratelimit")

WINDOW_S = 60.0

# KEYS[1] = the key's window; ARGV = limit, window in ms, unique member.
# Returns {allowed (1|0), retry-after in ms, requests in the window}.
_SLIDING_WINDOW_LUA = """
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local n = redis.call('ZCARD', key)
if n < limit then
  redis.call('ZADD', key, now, ARGV[3])
  redis.call('PEXPIRE', key, window)
  return {1, 0, n + 1}
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
local retry = window
if oldest[2] then retry = tonumber(oldest[2]) + window - now end
return {0, retry, n}
"""


def _refusal(principal: Principal, limit: int, retry_after_s: float) -> RateLimitError:
    retry = max(1.0, retry_after_s)
    return RateLimitError(
        f"rate limit exceeded for key {principal.key_name!r}: {limit} requests per minute; "
        f"retry after {retry:.0f} s",
        retry_after=retry,
    )


class RedisRateLimiter:
    """:class:`~gateway.serving.interfaces.RateLimiter` shared by every replica through Redis."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "uniroute:rpm:",
        window_s: float = WINDOW_S,
        fail_open: bool = True,
        timeout_s: float = 0.5,
        metrics: Metrics | None = None,
    ) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        self.window_ms = int(window_s * 1000)
        self.fail_open = fail_open
        self.metrics = metrics
        self._redis: Any = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self._redis.register_script(_SLIDING_WINDOW_LUA)
        self._last_warning = 0.0

    async def check(self, principal: Principal) -> None:
        limit = principal.rpm_limit
        if limit is None or principal.key_id is None:
            return
        member = f"{time.time_ns()}-{secrets.token_hex(4)}"
        try:
            allowed, retry_ms, _n = await self._script(
                keys=[f"{self.prefix}{principal.key_id}"], args=[limit, self.window_ms, member]
            )
        except Exception as exc:  # redis down, timeout, ...
            if self.metrics is not None:
                self.metrics.rate_limiter_errors.inc()
            now = time.monotonic()
            if now - self._last_warning > 10.0:
                self._last_warning = now
                logger.warning("rate limiter: Redis unavailable (%s); %s", type(exc).__name__,
                               "serving without limits" if self.fail_open else "refusing requests")
            if self.fail_open:
                return
            raise ServiceUnavailableError("rate limiter unavailable; retry shortly") from None
        if not int(allowed):
            raise _refusal(principal, limit, int(retry_ms) / 1000)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False

    async def aclose(self) -> None:
        await self._redis.aclose()


class LocalRateLimiter:
    """In-process sliding window. Single process only: see the module docstring."""

    def __init__(self, *, window_s: float = WINDOW_S, clock: Any = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._hits: dict[int, deque[float]] = {}

    async def check(self, principal: Principal) -> None:
        limit = principal.rpm_limit
        if limit is None or principal.key_id is None:
            return
        now = self._clock()
        hits = self._hits.setdefault(principal.key_id, deque())
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        if len(hits) >= limit:
            raise _refusal(principal, limit, hits[0] + self.window_s - now)
        hits.append(now)

    async def aclose(self) -> None:
        return None
