"""What the handlers reach: one typed object, ``app.state.gateway``, instead of a bag of attributes.

``create_app`` (gateway/app.py) builds it with the accounting and the readiness checks; the lifespan
fills in the rest once at start-up. The profiling parts are seen through the small protocols below,
so the HTTP layer never imports ``profiling/`` (app.py, the composition root, wires them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request

from gateway.config import AdminConfig, LimitsConfig
from gateway.errors import GatewayError, ServiceUnavailableError

if TYPE_CHECKING:
    from gateway.access.accounting import Accounting
    from gateway.serving.service import ChatService

ReadinessCheck = Callable[[], Awaitable[None]]


class ProfilingJob(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


class ProfilingJobs(Protocol):
    """Background profiling of one model at a time per name (profiling/jobs.py)."""

    def start(self, model: str, *, grader: str | None = None, concurrency: int | None = None,
              allow_partial: bool = False, activate: bool = False, max_prompts: int | None = None,
              target_ci: float | None = None, allocation: str | None = None) -> ProfilingJob: ...

    def get(self, model: str) -> ProfilingJob | None: ...


class Reprofiler(Protocol):
    """One re-profiling pass under the lease (profiling/schedule.py)."""

    def run_once(self) -> dict[str, Any] | None: ...

    def busy_error(self) -> GatewayError: ...


class ImpactFollowups(Protocol):
    """The impact reports and their follow-ups (profiling/followup.py)."""

    def show(self, model: str) -> dict[str, Any]: ...

    def run_now(self, model: str) -> dict[str, Any]: ...


@dataclass
class GatewayState:
    accounting: Accounting
    readiness_checks: dict[str, ReadinessCheck] = field(default_factory=dict)
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # structural limits of request bodies
    admin: AdminConfig = field(default_factory=AdminConfig)  # what /admin/models may write (config admin:)
    # set by the lifespan at start-up
    started_at: int = 0
    service: ChatService | None = None
    profile_key: str | None = None  # the router version + variant the stored profiles belong to
    profiling: ProfilingJobs | None = None
    reprofiler: Reprofiler | None = None
    impacts: ImpactFollowups | None = None
    openapi: dict[str, Any] | None = None  # the OpenAPI document, built on first request

    def chat_service(self) -> ChatService:
        if self.service is None:
            raise ServiceUnavailableError("the gateway is starting; try again shortly", headers={"retry-after": "1"})
        return self.service


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state
