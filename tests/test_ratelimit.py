"""Requests-per-minute limits: Redis (shared by replicas) and the in-process fallback."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from gateway.access.ratelimit import LocalRateLimiter, RedisRateLimiter
from gateway.errors import RateLimitError, ServiceUnavailableError, error_body
from gateway.metrics import Metrics
from gateway.serving.interfaces import ANONYMOUS, Principal
from tests.storeutil import REDIS_URL, free_port, require_redis


def _principal(key_id: int, rpm: int | None) -> Principal:
    return Principal(key_id=key_id, key_name=f"k{key_id}", key_prefix="sk-ur-xxxx", default_lambda=0.1,
                     rpm_limit=rpm)


def _prefix() -> str:
    return f"uniroute:test:{secrets.token_hex(4)}:"


@pytest.mark.redis
async def test_redis_limit_and_retry_after() -> None:
    require_redis()
    limiter = RedisRateLimiter(REDIS_URL, prefix=_prefix())
    p = _principal(1, rpm=3)
    try:
        for _ in range(3):
            await limiter.check(p)
        with pytest.raises(RateLimitError) as e:
            await limiter.check(p)
        status, body, headers = error_body(e.value)
        assert status == 429 and body["error"]["type"] == "rate_limit_exceeded"
        assert "3 requests per minute" in body["error"]["message"] and "'k1'" in body["error"]["message"]
        assert 55 <= int(headers["retry-after"]) <= 60
        await limiter.check(_principal(2, rpm=3))  # another key has its own window
        await limiter.check(_principal(3, rpm=None))  # no limit
        await limiter.check(ANONYMOUS)
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_redis_limit_is_shared_by_replicas_and_slides() -> None:
    require_redis()
    prefix = _prefix()
    replicas = [RedisRateLimiter(REDIS_URL, prefix=prefix, window_s=1.0) for _ in range(3)]
    p = _principal(1, rpm=10)
    try:
        results = await asyncio.gather(*(replicas[i % 3].check(p) for i in range(25)), return_exceptions=True)
        assert sum(r is None for r in results) == 10
        assert all(isinstance(r, RateLimitError) for r in results if r is not None)
        await asyncio.sleep(1.1)  # the window slid past every hit
        await replicas[0].check(p)
    finally:
        for r in replicas:
            await r.aclose()


async def test_redis_down_fails_open_or_closed() -> None:
    metrics = Metrics()
    url = f"redis://127.0.0.1:{free_port()}/0"
    open_limiter = RedisRateLimiter(url, timeout_s=0.2, metrics=metrics)
    await open_limiter.check(_principal(1, rpm=1))
    await open_limiter.check(_principal(1, rpm=1))
    assert metrics.rate_limiter_errors._value.get() == 2
    assert not await open_limiter.ping()
    closed = RedisRateLimiter(url, timeout_s=0.2, fail_open=False)
    with pytest.raises(ServiceUnavailableError, match="rate limiter unavailable"):
        await closed.check(_principal(1, rpm=1))
    await open_limiter.aclose()
    await closed.aclose()


async def test_local_limiter_sliding_window() -> None:
    now = [100.0]
    limiter = LocalRateLimiter(clock=lambda: now[0])
    p = _principal(1, rpm=2)
    await limiter.check(p)
    now[0] += 30
    await limiter.check(p)
    with pytest.raises(RateLimitError) as e:
        await limiter.check(p)
    assert e.value.retry_after == pytest.approx(30.0)
    assert e.value.headers["retry-after"] == "30"
    now[0] += 30.5  # the first hit left the window
    await limiter.check(p)
