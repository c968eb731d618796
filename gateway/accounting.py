"""Who may call, how much they may spend, and the record of what they did.

:class:`Accounting` bundles the store-backed implementations of the chat service's
contracts (``gateway/interfaces.py``) and their lifecycle, so ``create_app`` wires them in
a few lines:

- ``authenticator``: :class:`~gateway.auth.KeyAuthenticator` (``auth.mode: keys``) or the
  open authenticator (``auth.mode: open``, everyone is ``anonymous``);
- ``budget``: :class:`~gateway.budget.SqlBudgetGuard` (a no-op for ``anonymous``);
- ``rate_limiter``: Redis when ``redis_url`` is set, else in-process (single process);
- ``sink``: metrics + :class:`~gateway.store.RequestLogWriter`;
- ``admin``: the admin-key guard of ``/admin/*``; ``metrics``: everything ``/metrics`` shows.

Nothing touches the database or Redis until :meth:`Accounting.start` (the lifespan), which
applies migrations (unless ``database.auto_migrate: false``), seeds the ``models`` table
from the config, and starts the log writer. :meth:`Accounting.aclose` flushes the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.auth import AdminGuard, KeyAuthenticator
from gateway.budget import SqlBudgetGuard
from gateway.errors import ServiceUnavailableError
from gateway.interfaces import (
    ANONYMOUS,
    Authenticator,
    OpenAuthenticator,
    Principal,
    RateLimiter,
    RequestRecord,
)
from gateway.metrics import Metrics
from gateway.ratelimit import LocalRateLimiter, RedisRateLimiter
from gateway.store import RequestLogWriter, Store

logger = logging.getLogger("uniroute.accounting")


@dataclass(frozen=True)
class AccountingSettings:
    """The settings :class:`Accounting` needs, independent of how the config file spells them."""

    database_url: str = "sqlite:///var/uniroute.db"
    auth_mode: str = "open"  # "open" | "keys"
    auth_cache_ttl_s: float = 1.0
    auto_migrate: bool = True
    pool_size: int = 5
    max_overflow: int = 10
    store_prompts: bool = False
    log_batch_size: int = 500
    log_flush_interval_s: float = 0.5
    log_max_buffer: int = 100_000
    spill_dir: str | None = None
    redis_url: str | None = None
    rate_limit_fail_open: bool = True
    anonymous: Principal = ANONYMOUS
    seed_models: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)


class MetricsSink:
    """:class:`~gateway.interfaces.RequestSink` that updates the metrics, then queues the row."""

    def __init__(self, metrics: Metrics, writer: RequestLogWriter | None, *, store_prompts: bool = False) -> None:
        self.metrics = metrics
        self.writer = writer
        self.store_prompts = store_prompts

    def submit(self, record: RequestRecord) -> None:
        try:
            self.metrics.observe_request(record)
        except Exception:  # metrics must never fail a request
            logger.exception("metrics update failed")
        if not self.store_prompts:
            record.prompt_text = None
        if self.writer is not None:
            self.writer.submit(record)


class Accounting:
    def __init__(self, settings: AccountingSettings, *, metrics: Metrics | None = None) -> None:
        s = settings
        if s.auth_mode not in ("open", "keys"):
            raise ValueError(f"auth.mode must be 'open' or 'keys', got {s.auth_mode!r}")
        self.settings = s
        self.metrics = metrics or Metrics()
        self.store = Store(s.database_url, pool_size=s.pool_size, max_overflow=s.max_overflow)
        self.writer = RequestLogWriter(
            self.store, batch_size=s.log_batch_size, flush_interval_s=s.log_flush_interval_s,
            max_buffer=s.log_max_buffer, spill_dir=s.spill_dir, metrics=self.metrics,
        )
        self.sink = MetricsSink(self.metrics, self.writer, store_prompts=s.store_prompts)
        self.budget = SqlBudgetGuard(self.store, metrics=self.metrics)
        self.authenticator: Authenticator
        if s.auth_mode == "keys":
            self.key_authenticator: KeyAuthenticator | None = KeyAuthenticator(self.store, cache_ttl_s=s.auth_cache_ttl_s)
            self.authenticator = self.key_authenticator
        else:
            self.key_authenticator = None
            self.authenticator = OpenAuthenticator(s.anonymous)
        self.admin = AdminGuard(authenticator=self.key_authenticator)
        self.rate_limiter: RateLimiter
        if s.redis_url:
            self.rate_limiter = RedisRateLimiter(s.redis_url, fail_open=s.rate_limit_fail_open, metrics=self.metrics)
        else:
            self.rate_limiter = LocalRateLimiter()
        self._started = False

    @property
    def mode(self) -> str:
        return self.settings.auth_mode

    async def start(self, model_names: Iterable[str] = (), routable: Iterable[str] | None = None) -> None:
        """Migrate, seed the registry table, start the log writer (call from the lifespan)."""
        s = self.settings
        if s.auto_migrate:
            await asyncio.to_thread(self.store.upgrade)
        elif await asyncio.to_thread(self.store.current_revision) != Store.head_revision():
            logger.warning("database is not at the latest migration and database.auto_migrate is false: "
                           "run `uniroute db upgrade`")
        if s.seed_models:
            changed = await asyncio.to_thread(self.store.seed_models, s.seed_models)
            if changed:
                logger.info("models table: %d entries added or updated from the config", changed)
        self.metrics.set_registry(model_names, routable)
        self.writer.start()
        self._started = True
        if s.auth_mode == "open":
            logger.warning("auth.mode is 'open': every caller is 'anonymous' with no budget or rate limit. "
                           "Set auth.mode: keys and create keys with `uniroute keys create` to require API keys.")
        if not s.redis_url:
            logger.info("rate limits are per process (no redis_url): correct for a single worker only")

    async def aclose(self) -> None:
        if self._started:
            await asyncio.to_thread(self.writer.close)
            self._started = False
        aclose = getattr(self.rate_limiter, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # closing a broken Redis connection must not break shutdown
                logger.debug("rate limiter close failed", exc_info=True)
        self.metrics.shutdown()
        await asyncio.to_thread(self.store.dispose)

    async def check_ready(self) -> None:
        """Readiness: the database answers (raises with the reason otherwise)."""
        if not await self.store.aping():
            raise ServiceUnavailableError("database unreachable")
