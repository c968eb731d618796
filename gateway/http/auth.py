"""Who is calling an HTTP handler: the caller's key, and the admin guard every ``/admin/*`` handler starts with.

Both raise :class:`~gateway.errors.GatewayError` (401/403); the registered handler in
:mod:`gateway.http.responses` shapes the answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.http.state import gateway_state
from gateway.serving.interfaces import Principal

if TYPE_CHECKING:
    from gateway.access.accounting import Accounting
    from gateway.access.auth import MetricsGuard


def accounting(request: Request) -> Accounting:
    """The app's :class:`~gateway.access.accounting.Accounting` (keys, budgets, the request log)."""
    return gateway_state(request).accounting


async def authenticate(request: Request) -> Principal:
    """The caller of a client endpoint, from its ``Authorization`` header (401 when refused)."""
    return await accounting(request).authenticator.authenticate(request.headers.get("authorization"))


async def require_admin(request: Request) -> Accounting:
    """Refuse anyone but the admin key (401 without a valid key, 403 for a client key); returns the accounting."""
    acc = accounting(request)
    await acc.admin.check(request.headers.get("authorization"))
    return acc


class GuardedMetrics:
    """``/metrics`` behind :class:`~gateway.access.auth.MetricsGuard` (pure ASGI: the scrape path stays cheap).
    A refusal is raised as a GatewayError, shaped by the app's registered handler (401/403)."""

    def __init__(self, app: ASGIApp, guard: MetricsGuard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.guard.required:
            auth = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            self.guard.check(auth)
        await self.app(scope, receive, send)
