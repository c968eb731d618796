"""The ASGI application: :func:`create_app` wires config, registry, router, forwarder and service.

Nothing is built at import time. ``create_app`` only records what to build; the lifespan
builds the LiteLLM forwarder, the registry, the policy and the chat service once, at
startup, and every request reuses them.

``readiness_checks`` (``GatewayState.readiness_checks``, name → async callable that raises
when unhealthy) is the hook a store adds its "database reachable" check to.

The store-backed parts (API keys, budgets, rate limits, the request log, metrics) come
from :class:`gateway.access.accounting.Accounting`, built here from the config (no I/O) and
started/stopped by the lifespan: migrations and the ``models`` seed at start, the request
log flushed at shutdown. Its routes: ``/v1/usage``, ``/admin/keys``, ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from gateway.config import GatewayConfig, load_config, serve_overrides, with_server_overrides
from gateway.errors import GatewayError
from gateway.http.middleware import CHAT_PATH, MESSAGES_PATH, RequestContextMiddleware
from gateway.http.state import GatewayState, ReadinessCheck
from gateway.secrets import install_log_scrubber, keep_config_params
from gateway.serving.interfaces import (
    Authenticator,
    BudgetGuard,
    RateLimiter,
    RequestSink,
)
from gateway.serving.router import EmbedFn, calibrated
from routing.policy import GatewayPolicy

if TYPE_CHECKING:
    from gateway.access.accounting import Accounting

logger = logging.getLogger("uniroute.app")


def create_app(
    config: GatewayConfig,
    *,
    authenticator: Authenticator | None = None,
    rate_limiter: RateLimiter | None = None,
    budget: BudgetGuard | None = None,
    sink: RequestSink | None = None,
    policy: tuple[GatewayPolicy, EmbedFn | None] | None = None,
    readiness_checks: dict[str, ReadinessCheck] | None = None,
    accounting: Accounting | None = None,
    tune_gc: bool = False,
) -> Starlette:
    """Build the gateway app. The optional arguments replace the config-built parts (auth, limits, store, router).

    ``tune_gc``: the server process's collector settings (:func:`freeze_heap`) at the end of start-up; set by
    :func:`app_from_env` (``uniroute serve``), not by tests that build many apps in one process."""
    from gateway.access.accounting import Accounting, settings_from_config
    from gateway.http import (
        admin_models,
        chat,
        endpoints,
        feedback,
        health,
        keys,
        models,
        openapi,
        responses,
        route,
    )
    from gateway.http import tenants as key_profiles
    from gateway.http.auth import GuardedMetrics
    from gateway.http.middleware import InFlightMiddleware
    from gateway.metrics import metrics_app
    from gateway.store.engine import OUTAGE_ERRORS

    config = calibrated(config)  # router.target_cost -> default λ (cheap: numpy only, no embedder)
    acc = accounting if accounting is not None else Accounting(settings_from_config(config))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        from gateway.serving.cooldown import Cooldowns
        from gateway.serving.estimate import Estimator
        from gateway.serving.forwarding import Forwarder, LiteLLMUpstream
        from gateway.serving.registry import Registry, with_profiles
        from gateway.serving.registry_sync import RegistryPoller
        from gateway.serving.router import CostCurves, RouterBundle, build_router
        from gateway.serving.service import ChatService
        from gateway.store import models as catalog
        from gateway.telemetry import NO_TRACING, otlp_tracing

        tel = config.telemetry
        tracing = (otlp_tracing(tel.otlp_endpoint, tel.service_name, tel.schedule_delay_ms) if tel.otlp_endpoint
                   else NO_TRACING)
        started = int(time.time())
        keep_config_params(config.models)  # the table holds their secrets masked: the real values stay in memory
        registry = Registry.from_config(config, created=started)
        fb = config.fallback
        cooldowns = Cooldowns(fb.cooldown_failures, fb.cooldown_window_s, fb.cooldown_s,
                              on_enter=acc.metrics.cooldown_entered, on_count=acc.metrics.set_models_in_cooldown)
        acc.metrics.add_collect_hook(lambda: acc.metrics.set_models_in_cooldown(len(cooldowns.active())))
        forwarder = Forwarder(max_attempts=fb.max_attempts, cooldowns=cooldowns,
                              upstream=LiteLLMUpstream(raw_openai_streams=config.forwarding.raw_openai_streams,
                                                       http_client=config.forwarding.http_client,
                                                       max_response_bytes=config.forwarding.max_response_bytes),
                              tracing=tracing)
        registry.on_replace(forwarder.register)
        if policy is not None:
            bundle = RouterBundle(policy=policy[0], embed=policy[1])
        else:
            bundle = await build_router(config, on_embedding=acc.metrics.observe_embedding)
        if bundle.profiles:
            # Ψ(h) of each profiled registry model; unprofiled models stay out of `auto`
            registry.replace(with_profiles(registry.snapshot.entries, bundle.profiles))
        pol, embed = bundle.policy, bundle.embed
        state.started_at = started
        await acc.start(registry.names(), [m.name for m in registry.pool()])
        registry.on_replace(lambda snap: acc.metrics.set_registry(snap.names, [m.name for m in snap.pool]))
        # the database is the registry's source of truth from here on: every replica polls it
        key = catalog.profile_key(bundle.version, config.router.variant) if bundle.version else None
        state.profile_key = key
        poller = RegistryPoller(catalog.TableModelSource(acc.store, key), registry,
                                config.registry.poll_interval_s)
        try:
            if key is not None and bundle.profile_counts:
                seeded = await asyncio.to_thread(catalog.seed_profiles, acc.store, key, {
                    n: (p, bundle.profile_counts.get(n, np.zeros(len(p)))) for n, p in bundle.profiles.items()})
                if seeded:
                    logger.info("model_profiles: %d profiles imported from the artifact's profiles.json", seeded)
            await asyncio.to_thread(poller.refresh, True)
        except Exception as exc:
            logger.error("could not read the registry from the database (%s: %s); serving the config's models "
                         "until it answers", type(exc).__name__, exc)
        poller.start()
        overlays = tenant_poller = None
        if key is not None:  # tenant-private profiles: every key's labels, reloaded like the registry
            from gateway.serving.tenants import TenantOverlays, TenantPoller
            from gateway.store import tenants as tenant_sql

            overlays = TenantOverlays(config.profiling.tenant_prior_weight)
            tenant_poller = TenantPoller(lambda: tenant_sql.load_all(acc.store, key), overlays,
                                         config.registry.poll_interval_s)
            try:
                await tenant_poller.refresh()
            except Exception as exc:
                logger.error("could not read the tenant profiles (%s: %s); the poller retries", type(exc).__name__,
                             exc)
            tenant_poller.start()
        state.service = ChatService(
            registry, pol, forwarder, embed=embed,
            authenticator=authenticator or acc.authenticator,
            rate_limiter=rate_limiter or acc.rate_limiter, budget=budget or acc.budget, sink=sink or acc.sink,
            offload_bytes=config.limits.offload_bytes, tracing=tracing, estimator=Estimator(config.budget),
            pacer=acc.pacer, cost_curve=CostCurves(pol, registry.pool), overlays=overlays,
        )
        # profiling joins the gateway here only: the admin handlers reach it through these objects
        from profiling.followup import ImpactFollowups
        from profiling.jobs import ProfilingJobs
        from profiling.schedule import DriftExporter, Reprofiler, ReprofileScheduler

        jobs = state.profiling = ProfilingJobs(config, acc.store, forwarder, key)
        reprofiler = state.reprofiler = Reprofiler(config, acc.store, key)
        followups = state.impacts = ImpactFollowups(config, acc.store)
        scheduler = ReprofileScheduler(reprofiler, followups)
        scheduler.start()
        drift = DriftExporter(acc.store, key, acc.metrics.set_profile_drift,
                              interval_s=min(10.0, max(1.0, 5 * config.registry.poll_interval_s)))
        drift.start()
        from gateway.http.server import STATE_KEY, ClientLimits

        srv = config.server
        refreeze = None
        if tune_gc:
            freeze_heap()  # the start-up's objects (LiteLLM, the router, the registry) leave the collector's view
            # and once more when the first requests have imported LiteLLM's provider code (lazily, on first use)
            refreeze = asyncio.get_running_loop().call_later(REFREEZE_AFTER_S, gc.freeze)
        liveness = None
        if srv.health_port is not None:
            from gateway.http.liveness import LivenessListener

            liveness = LivenessListener(srv.host, srv.health_port, stall_s=srv.health_stall_s,
                                        reuse_port=srv.workers > 1)
            liveness.start(asyncio.get_running_loop())
        try:
            # lifespan state: the uvicorn protocols of `uniroute serve` read their deadlines here
            yield {STATE_KEY: ClientLimits(srv.header_timeout_s, srv.body_timeout_s, srv.max_header_bytes)}
        finally:
            if liveness is not None:
                await asyncio.to_thread(liveness.close)
            if refreeze is not None:
                refreeze.cancel()
            await scheduler.aclose()
            await drift.aclose()
            await jobs.aclose()
            await poller.aclose()
            if tenant_poller is not None:
                await tenant_poller.aclose()
            await acc.aclose()
            await bundle.aclose()
            await forwarder.aclose()
            await asyncio.to_thread(tracing.shutdown)  # export the spans still pending

    routes = [
        Route(CHAT_PATH, chat.chat_completions, methods=["POST"]),
        Route("/v1/responses", endpoints.responses, methods=["POST"]),
        Route(MESSAGES_PATH, endpoints.messages, methods=["POST"]),
        Route("/v1/embeddings", endpoints.embeddings, methods=["POST"]),
        Route("/v1/models", models.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", models.get_model, methods=["GET"]),
        Route("/health/liveliness", health.liveliness, methods=["GET"]),
        Route("/health/readiness", health.readiness, methods=["GET"]),
        Route("/openapi.json", openapi.openapi, methods=["GET"]),
        Route("/v1/usage", keys.usage, methods=["GET"]),
        Route("/admin/keys", keys.list_keys_endpoint, methods=["GET"]),
        Route("/admin/keys", keys.create_key_endpoint, methods=["POST"]),
        Route("/admin/keys/{name}", keys.get_key_endpoint, methods=["GET"]),
        Route("/admin/keys/{name}", keys.update_key_endpoint, methods=["PATCH"]),
        Route("/admin/keys/{name}", keys.revoke_key_endpoint, methods=["DELETE"]),
        Route("/admin/keys/{name}/profile", key_profiles.upload_profile_endpoint, methods=["POST"]),
        Route("/admin/keys/{name}/profile", key_profiles.get_profile_endpoint, methods=["GET"]),
        Route("/admin/keys/{name}/profile", key_profiles.delete_profile_endpoint, methods=["DELETE"]),
        Route("/admin/keys/{name}/route", route.admin_route_endpoint, methods=["POST"]),
        Route("/v1/feedback", feedback.feedback_endpoint, methods=["POST"]),
        Route("/v1/route", route.route_endpoint, methods=["POST"]),
        Route("/admin/models", admin_models.list_models_endpoint, methods=["GET"]),
        Route("/admin/models", admin_models.add_model_endpoint, methods=["POST"]),
        Route("/admin/models/{name:path}/disable", admin_models.disable_model_endpoint, methods=["POST"]),
        Route("/admin/models/{name:path}/profile", admin_models.start_profile_endpoint, methods=["POST"]),
        Route("/admin/models/{name:path}/profile", admin_models.profile_status_endpoint, methods=["GET"]),
        Route("/admin/models/{name:path}/impact", admin_models.impact_endpoint, methods=["GET"]),
        Route("/admin/models/{name:path}/impact", admin_models.impact_now_endpoint, methods=["POST"]),
        Route("/admin/models/{name:path}", admin_models.get_model_endpoint, methods=["GET"]),
        Route("/admin/models/{name:path}", admin_models.update_model_endpoint, methods=["PATCH"]),
        Route("/admin/models/{name:path}", admin_models.remove_model_endpoint, methods=["DELETE"]),
        Route("/admin/reprofile", admin_models.run_reprofile_endpoint, methods=["POST"]),
        Route("/admin/reprofile/last", admin_models.last_reprofile_endpoint, methods=["GET"]),
        Route("/metrics", GuardedMetrics(metrics_app(acc.metrics), acc.metrics_guard), methods=["GET", "HEAD"]),
    ]
    # handlers raise GatewayError; one handler shapes it. 404/405 from routing; anything else is a bug (500)
    handlers: dict[Any, Any] = {GatewayError: responses.gateway_error, HTTPException: responses.http_exception,
                                **{cls: responses.store_unavailable for cls in OUTAGE_ERRORS},
                                Exception: responses.unhandled_exception}
    app = Starlette(
        routes=routes,
        # outermost first: the request id is set before admission, so a 503 overloaded carries it
        middleware=[Middleware(RequestContextMiddleware, max_body_bytes=config.server.max_body_bytes,
                               body_timeout_s=config.server.body_timeout_s),
                    Middleware(InFlightMiddleware, metrics=acc.metrics, max_in_flight=config.server.max_in_flight,
                               sink=sink or acc.sink)],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    # what the handlers reach (gateway/http/state.py); the lifespan fills in the rest at start-up
    state = app.state.gateway = GatewayState(
        accounting=acc, readiness_checks={"database": acc.check_ready, **(readiness_checks or {})}, admin=config.admin,
        limits=config.limits)
    return app


#: the collector's thresholds while serving: generation 0 is collected every this many net allocations
#: (CPython's default: 700), so a request's short-lived objects are mostly freed by reference counting
#: before a collection sees them, and fewer are promoted to the older generations
GC_THRESHOLDS = (50_000, 20, 100)
#: seconds after start-up when what the first requests imported and built is frozen too (``gc.freeze`` alone:
#: no collection, no pause)
REFREEZE_AFTER_S = 60.0


def freeze_heap() -> None:
    """Move every object alive now into the collector's permanent generation and raise its thresholds.

    Once started the gateway holds ~0.5 million long-lived objects (LiteLLM's modules and cost map, the
    router, the registry). CPython's full (generation-2) collection walks all of them, 0.3-1 s on the 2 shared
    cores, and under load it ran every ~20 s: those were the intermittent half-second stalls of issue 14
    (docs/PERFORMANCE.md, "Stalls"). Frozen objects are never scanned again; what the gateway allocates
    later is collected as before.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` (and ``--workers N``): config from ``$UNIROUTE_CONFIG``."""
    import gateway  # noqa: F401

    install_log_scrubber()  # a worker process: its log handlers are uvicorn's
    return create_app(with_server_overrides(load_config(), serve_overrides()), tune_gc=True)
