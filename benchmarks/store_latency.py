"""What the store adds to a request: budget reserve+settle latency and request-log write throughput.

In ``auth.mode: keys`` every request does two short write transactions on ``api_keys``
(reserve before forwarding, settle after). This measures them sequentially (one request at
a time: the latency a request pays) and the background writer's rows per second, on SQLite
(a temporary file) and on PostgreSQL (a throwaway database, when reachable), and the Redis
rate-limit check (one Lua script call).

    python -m benchmarks.store_latency [--n 500] [--rows 20000] [--pg-url postgresql+psycopg://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

import gateway  # noqa: F401
from gateway.access.auth import create_key, principal_from_row
from gateway.access.budget import SqlBudgetGuard
from gateway.serving.interfaces import RequestRecord
from gateway.store.engine import Store
from gateway.store.requestlog import RequestLogWriter


@contextlib.contextmanager
def _database(kind: str, pg_url: str) -> Iterator[str | None]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            yield f"sqlite:///{Path(d) / 'bench.db'}"
        return
    name = f"uniroute_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError:
        yield None
        return
    try:
        yield sa.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(kind: str, url: str, n: int, rows: int) -> None:
    store = Store(url)
    store.upgrade()
    _, row = create_key(store, "bench", default_lambda=0.1, budget_usd=1e9)
    principal = principal_from_row(row)
    guard = SqlBudgetGuard(store)
    for _ in range(20):  # warm the pool
        guard.settle_sync(guard.reserve_sync(principal, 0.01), 0.005)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        guard.settle_sync(guard.reserve_sync(principal, 0.01), 0.005)
        lat.append((time.perf_counter() - t0) * 1e3)
    print(f"{kind:10s} reserve+settle  n={n}  p50 {_pct(lat, 0.5):.2f} ms  p90 {_pct(lat, 0.9):.2f} ms  "
          f"p99 {_pct(lat, 0.99):.2f} ms")
    writer = RequestLogWriter(store, batch_size=500, flush_interval_s=0.05)
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    writer.start()
    for i in range(rows):
        writer.submit(RequestRecord(request_id=f"r{i}", started_at=now, finished_at=now, requested_model="auto",
                                    stream=False, routed_model="m", cost_usd=1e-6, latency_ms=10.0,
                                    candidates=[{"model": "m", "objective": 0.1}]))
    submit_s = time.perf_counter() - t0
    writer.close()
    total_s = time.perf_counter() - t0
    print(f"{kind:10s} request log     {rows} rows  submit {submit_s / rows * 1e6:.1f} µs/row  "
          f"written at {rows / total_s:,.0f} rows/s")
    store.dispose()


def run_redis(url: str, n: int) -> None:
    import asyncio

    from gateway.access.ratelimit import RedisRateLimiter
    from gateway.serving.interfaces import Principal

    async def go() -> list[float]:
        limiter = RedisRateLimiter(url, prefix=f"uniroute:bench:{secrets.token_hex(4)}:")
        p = Principal(key_id=1, key_name="bench", key_prefix="", default_lambda=0.1, rpm_limit=10**9)
        try:
            for _ in range(20):
                await limiter.check(p)
            lat = []
            for _ in range(n):
                t0 = time.perf_counter()
                await limiter.check(p)
                lat.append((time.perf_counter() - t0) * 1e3)
            return lat
        finally:
            await limiter.aclose()

    try:
        lat = asyncio.run(go())
    except Exception as exc:
        print(f"redis      skipped: {url}: {type(exc).__name__}")
        return
    print(f"redis      rate-limit check n={n}  p50 {_pct(lat, 0.5):.3f} ms  p99 {_pct(lat, 0.99):.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = ap.parse_args()
    run_redis(args.redis_url, args.n)
    for kind in ("sqlite", "postgresql"):
        with _database(kind, args.pg_url) as url:
            if url is None:
                print(f"{kind:10s} skipped: {args.pg_url} unreachable")
                continue
            run(kind, url, args.n, args.rows)


if __name__ == "__main__":
    main()
