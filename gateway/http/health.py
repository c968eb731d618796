"""``GET /health/liveliness`` (the process is up) and ``GET /health/readiness`` (store, registry, router)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import ServiceUnavailableError
from gateway.http.responses import json_response
from gateway.http.state import gateway_state


async def liveliness(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readiness(request: Request) -> Response:
    state = gateway_state(request)
    problems: list[str] = []
    service = state.service
    if service is None:
        problems.append("service not started")
    else:
        if len(service.registry) == 0:
            problems.append("registry is empty")
        if service.policy is None:
            problems.append("router not loaded")
    for name, check in state.readiness_checks.items():
        try:
            await check()
        except Exception as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise ServiceUnavailableError("not ready: " + "; ".join(problems))
    assert service is not None
    return json_response({"status": "ready", "models": len(service.registry), "router": service.policy.name})
