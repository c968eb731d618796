"""Who may call, how much they may spend, and the record of what they did.

:class:`Accounting` bundles the store-backed implementations of the chat service's
contracts (``gateway/serving/interfaces.py``) and their lifecycle, so ``create_app`` wires them in
a few lines:

- ``authenticator``: :class:`~gateway.access.auth.KeyAuthenticator` (``auth.mode: keys``) or the
  open authenticator (``auth.mode: open``, everyone is ``anonymous``);
- ``budget``: :class:`~gateway.access.budget.SqlBudgetGuard` (a no-op for ``anonymous``);
- ``pacer``: :class:`~gateway.access.pacing.SqlPacer`, the λ of keys with ``budget_policy: pace``;
- ``rate_limiter``: Redis when ``redis_url`` is set, else in-process (single process);
- ``sink``: metrics + :class:`~gateway.store.requestlog.RequestLogWriter`;
- ``admin``: the admin-key guard of ``/admin/*``; ``metrics``: everything ``/metrics`` shows, and
  ``metrics_guard`` who may read it (``metrics.auth``).

Nothing touches the database or Redis until :meth:`Accounting.start` (the lifespan), which
applies migrations (unless ``database.auto_migrate: false``), seeds the ``models`` table
from the config, and starts the log writer. :meth:`Accounting.aclose` flushes the log.

This process is one *holder* of budget reservations (``holder``): the budget guard writes it on
every reservation, the log writer names its kill -9 journal after it, and the
:class:`~gateway.access.reservations.ReservationKeeper` keeps its heartbeat and releases the
reservations of dead holders (docs/security/durability.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.access.auth import (
    DEFAULT_LAMBDA_RANGE,
    AdminGuard,
    KeyAuthenticator,
    MetricsGuard,
    metrics_auth_required,
)
from gateway.access.budget import SqlBudgetGuard, period_starts
from gateway.access.pacing import SqlPacer
from gateway.access.ratelimit import LocalRateLimiter, RedisRateLimiter
from gateway.access.reservations import ReservationKeeper
from gateway.config import AuthMode, MetricsAuth
from gateway.errors import ServiceUnavailableError
from gateway.metrics import Metrics
from gateway.serving.interfaces import (
    ANONYMOUS,
    Authenticator,
    OpenAuthenticator,
    Principal,
    RateLimiter,
    RequestRecord,
)
from gateway.spec import ModelSpec
from gateway.store.engine import Store
from gateway.store.models import seed_models
from gateway.store.requestlog import RequestLogWriter
from gateway.store.reservations import new_holder_id
from gateway.store.tables import utcnow

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

logger = logging.getLogger("uniroute.accounting")


@dataclass(frozen=True, kw_only=True)
class AccountingSettings:
    """The settings :class:`Accounting` needs, independent of how the config file spells them."""

    auth_mode: AuthMode  # no default here: the config's auth.mode (gateway.config.AuthConfig) has the one default
    database_url: str = "sqlite:///var/uniroute.db"
    auth_cache_ttl_s: float = 1.0
    auto_migrate: bool = True
    pool_size: int = 5
    max_overflow: int = 10
    store_prompts: bool = False
    log_batch_size: int = 500
    log_flush_interval_s: float = 0.5
    log_max_buffer: int = 100_000
    spill_dir: str | None = None
    log_close_timeout_s: float = 15.0
    journal: bool = True  # the kill -9 journal under spill_dir
    journal_fsync: bool = False
    settle_timeout_s: float = 2.0
    reservation_ttl_s: float = 120.0
    sqlite_busy_timeout_s: float = 30.0
    redis_url: str | None = None
    rate_limit_fail_open: bool = True
    rate_limit_prefix: str = "uniroute:rpm:"
    anonymous: Principal = ANONYMOUS
    lambda_range: tuple[float, float] = DEFAULT_LAMBDA_RANGE  # router.lambda_min, router.lambda_max: keys stay inside
    seed_models: tuple[ModelSpec, ...] = field(default_factory=tuple)  # the config's models, as written
    metrics_auth: MetricsAuth = "auto"  # metrics.auth: who may read /metrics
    pace_interval_s: float = 1.0  # router.pace_interval_s: how often a paced key's λ is stepped


def default_principal(config: GatewayConfig) -> Principal:
    """The caller of an open gateway (``auth.mode: open``): the router's default λ and λ range."""
    r = config.router
    return Principal(key_id=None, key_name="anonymous", key_prefix="", default_lambda=r.default_lambda,
                     lambda_min=r.lambda_min, lambda_max=r.lambda_max)


def settings_from_config(config: GatewayConfig) -> AccountingSettings:
    db = config.database
    return AccountingSettings(
        database_url=config.database_url, auth_mode=config.auth.mode, auth_cache_ttl_s=config.auth.cache_ttl_s,
        auto_migrate=db.auto_migrate, pool_size=db.pool_size, max_overflow=db.max_overflow,
        store_prompts=db.store_prompts, log_batch_size=db.log_batch_size,
        log_flush_interval_s=db.log_flush_interval_s, log_max_buffer=db.log_max_buffer, spill_dir=db.spill_dir,
        log_close_timeout_s=db.log_close_timeout_s, journal=db.journal, journal_fsync=db.journal_fsync,
        settle_timeout_s=db.settle_timeout_s, reservation_ttl_s=db.reservation_ttl_s,
        sqlite_busy_timeout_s=db.sqlite_busy_timeout_s,
        redis_url=config.redis_url, rate_limit_fail_open=config.rate_limit.fail_open,
        rate_limit_prefix=config.rate_limit.redis_prefix,
        anonymous=default_principal(config), lambda_range=(config.router.lambda_min, config.router.lambda_max),
        seed_models=tuple(config.models), metrics_auth=config.metrics.auth,
        pace_interval_s=config.router.pace_interval_s,
    )


class MetricsSink:
    """:class:`~gateway.serving.interfaces.RequestSink` that updates the metrics, then queues the row."""

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
        self.store = Store(s.database_url, pool_size=s.pool_size, max_overflow=s.max_overflow,
                           sqlite_busy_timeout_ms=int(s.sqlite_busy_timeout_s * 1000))
        self.holder = new_holder_id()
        self.writer = RequestLogWriter(
            self.store, batch_size=s.log_batch_size, flush_interval_s=s.log_flush_interval_s,
            max_buffer=s.log_max_buffer, spill_dir=s.spill_dir, close_timeout_s=s.log_close_timeout_s,
            metrics=self.metrics, journal=s.journal, journal_fsync=s.journal_fsync, holder=self.holder,
            period_starts=lambda: period_starts(utcnow()),
        )
        self.sink = MetricsSink(self.metrics, self.writer, store_prompts=s.store_prompts)
        self.budget = SqlBudgetGuard(self.store, metrics=self.metrics, holder=self.holder,
                                     settle_timeout_s=s.settle_timeout_s)
        self.pacer = SqlPacer(self.store, metrics=self.metrics, interval_s=s.pace_interval_s)
        self.keeper = ReservationKeeper(self.store, self.holder, ttl_s=s.reservation_ttl_s, guard=self.budget,
                                        metrics=self.metrics)
        self.authenticator: Authenticator
        if s.auth_mode == "keys":
            self.key_authenticator: KeyAuthenticator | None = KeyAuthenticator(self.store, cache_ttl_s=s.auth_cache_ttl_s)
            self.authenticator = self.key_authenticator
        else:
            self.key_authenticator = None
            self.authenticator = OpenAuthenticator(s.anonymous)
        self.admin = AdminGuard(authenticator=self.key_authenticator)
        self.metrics_guard = MetricsGuard(metrics_auth_required(s.metrics_auth, s.auth_mode))
        self.rate_limiter: RateLimiter
        if s.redis_url:
            self.rate_limiter = RedisRateLimiter(s.redis_url, prefix=s.rate_limit_prefix, fail_open=s.rate_limit_fail_open,
                                                 metrics=self.metrics)
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
            await asyncio.to_thread(self.store.upgrade)  # fail fast: no schema, no gateway
        else:
            try:
                current = await asyncio.to_thread(self.store.current_revision)
            except Exception as exc:
                current = None
                logger.error("database unreachable at start (%s); serving anyway, the request log waits in "
                             "memory and /health/readiness reports it", type(exc).__name__)
            else:
                if current != Store.head_revision():
                    logger.warning("database is at revision %s, not the latest %s, and database.auto_migrate is "
                                   "false: run `uniroute db upgrade`", current, Store.head_revision())
        if s.seed_models:
            try:
                changed = await asyncio.to_thread(seed_models, self.store, s.seed_models)
            except Exception as exc:
                logger.error("could not seed the models table from the config (%s)", type(exc).__name__)
            else:
                if changed:
                    logger.info("models table: %d entries added or updated from the config", changed)
        self.metrics.set_registry(model_names, routable)
        self.writer.start()  # takes over the journals of processes that died here: their holders are released now
        await self.keeper.start(self.writer.adopted_holders)
        self._started = True
        if s.auth_mode == "open":
            logger.warning("auth.mode is 'open': every caller is 'anonymous' with no budget or rate limit. "
                           "Set auth.mode: keys and create keys with `uniroute keys create` to require API keys.")
        if not s.redis_url:
            logger.info("rate limits are per process (no redis_url): correct for a single worker only")
        if self.metrics_guard.required and not self.metrics_guard.configured:
            logger.warning("/metrics needs a credential (metrics.auth) and none is set: it answers 403 until "
                           "UNIROUTE_METRICS_TOKEN or UNIROUTE_ADMIN_KEY is set")

    async def aclose(self) -> None:
        if self._started:
            await asyncio.to_thread(self.writer.close)
            if not await self.keeper.aclose():  # the store is down: the next start here releases this holder
                await asyncio.to_thread(self.writer.leave_holder_marker)
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
