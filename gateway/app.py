"""The ASGI application: :func:`create_app` wires config, registry, router, forwarder and service.

Nothing is built at import time. ``create_app`` only records what to build; the lifespan
builds the LiteLLM forwarder, the registry, the policy and the chat service once, at
startup, and every request reuses them.

``readiness_checks`` (``app.state.readiness_checks``, name → async callable that raises
when unhealthy) is the hook a store adds its "database reachable" check to.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from gateway import endpoints
from gateway.config import GatewayConfig, load_config
from gateway.interfaces import (
    Authenticator,
    BudgetGuard,
    OpenAuthenticator,
    Principal,
    RateLimiter,
    RequestSink,
)
from gateway.middleware import RequestContextMiddleware
from gateway.router import EmbedFn
from routing.policy import GatewayPolicy

ReadinessCheck = Callable[[], Awaitable[None]]


def default_principal(config: GatewayConfig) -> Principal:
    r = config.router
    return Principal(key_id=None, key_name="anonymous", key_prefix="", default_lambda=r.default_lambda,
                     lambda_min=r.lambda_min, lambda_max=r.lambda_max)


def create_app(
    config: GatewayConfig,
    *,
    authenticator: Authenticator | None = None,
    rate_limiter: RateLimiter | None = None,
    budget: BudgetGuard | None = None,
    sink: RequestSink | None = None,
    policy: tuple[GatewayPolicy, EmbedFn | None] | None = None,
    readiness_checks: dict[str, ReadinessCheck] | None = None,
) -> Starlette:
    """Build the gateway app. The optional arguments replace the open defaults (auth, limits, store, router)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from gateway.forwarding import Forwarder
        from gateway.registry import Registry
        from gateway.router import build_policy
        from gateway.service import ChatService

        started = int(time.time())
        registry = Registry.from_config(config, created=started)
        forwarder = Forwarder(max_attempts=config.fallback.max_attempts)
        registry.on_replace(forwarder.register)
        pol, embed = policy if policy is not None else build_policy(config)
        app.state.started_at = started
        app.state.registry = registry
        app.state.service = ChatService(
            registry, pol, forwarder, embed=embed,
            authenticator=authenticator or OpenAuthenticator(default_principal(config)),
            rate_limiter=rate_limiter, budget=budget, sink=sink,
        )
        yield

    routes = [
        Route("/v1/chat/completions", endpoints.chat_completions, methods=["POST"]),
        Route("/v1/models", endpoints.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", endpoints.get_model, methods=["GET"]),
        Route("/health/liveliness", endpoints.liveliness, methods=["GET"]),
        Route("/health/readiness", endpoints.readiness, methods=["GET"]),
        Route("/openapi.json", endpoints.openapi, methods=["GET"]),
    ]
    handlers: dict[Any, Any] = {HTTPException: endpoints.http_exception, Exception: endpoints.unhandled_exception}
    app = Starlette(
        routes=routes,
        middleware=[Middleware(RequestContextMiddleware, max_body_bytes=config.server.max_body_bytes)],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.state.config = config
    app.state.readiness_checks = dict(readiness_checks or {})
    return app


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` (and ``--workers N``): config from ``$UNIROUTE_CONFIG``."""
    import gateway  # noqa: F401

    return create_app(load_config())
