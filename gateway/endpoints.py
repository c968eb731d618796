"""Thin HTTP handlers: parse with ``protocol``, call the service, shape the response.

Every error goes through :func:`gateway.errors.error_body`, so every error body is
OpenAI-shaped. Response headers: ``x-uniroute-model`` (the model that served),
``x-uniroute-request-id`` (set by the middleware), ``x-uniroute-attempts`` (upstream calls
made, on every chat response including errors; 0 when refused before forwarding) and
``x-uniroute-cost`` (USD, when known before the headers are sent, i.e. not for streams; the
last chunk's ``uniroute.cost_usd`` has it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
    error_body,
)
from gateway.middleware import ATTEMPTS
from gateway.protocol import parse_chat_request
from gateway.service import AUTO, ChatContext, ChatService, ChatStream

logger = logging.getLogger("uniroute.endpoints")

_dumps: Any
_loads: Any
try:
    import orjson

    _dumps, _loads = orjson.dumps, orjson.loads
    _JSONError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # pragma: no cover
    import json

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads
    _JSONError = ValueError

JSON = "application/json"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_dumps(body), status_code=status, media_type=JSON, headers=headers)


def error_response(exc: BaseException) -> Response:
    status, body, headers = error_body(exc)
    return json_response(body, status, headers or None)


def _request_id(request: Request) -> str:
    rid = request.scope.get("state", {}).get("request_id")
    if rid:
        return str(rid)
    from gateway.middleware import new_request_id

    return new_request_id()


# -- chat ---------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    service: ChatService = request.app.state.service
    try:
        raw = await request.body()
        try:
            data = _loads(raw)
        except _JSONError as exc:
            raise InvalidRequestError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        req = parse_chat_request(data)
        ctx = ChatContext(
            request_id=_request_id(request),
            authorization=request.headers.get("authorization"),
            lambda_header=request.headers.get("x-uniroute-lambda"),
        )
        if req.stream:
            stream = await service.stream(req, ctx)
            return SSEResponse(stream)
        result = await service.complete(req, ctx)
    except Exception as exc:
        response = error_response(exc)
        response.headers[ATTEMPTS] = str(getattr(exc, "attempts", 0))
        return response
    headers = {"x-uniroute-model": result.model, ATTEMPTS: str(result.attempts)}
    if result.cost_usd is not None:
        headers["x-uniroute-cost"] = f"{result.cost_usd:.10g}"
    return json_response(result.body, headers=headers)


class SSEResponse(StreamingResponse):
    """Server-sent chat.completion.chunk events ending in ``data: [DONE]``; always closes the stream."""

    def __init__(self, stream: ChatStream) -> None:
        self.stream = stream
        super().__init__(self._events(), media_type="text/event-stream",
                         headers={**SSE_HEADERS, "x-uniroute-model": stream.model,
                                  ATTEMPTS: str(stream.attempts)})

    async def _events(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream.chunks:
            yield b"data: " + _dumps(chunk) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.aclose()


# -- models -------------------------------------------------------------------------------


def _model_card(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


async def list_models(request: Request) -> Response:
    service: ChatService = request.app.state.service
    created: int = request.app.state.started_at
    data = [_model_card(AUTO, created, "uniroute")]
    data += [_model_card(e.name, e.created or created, e.owned_by) for e in service.registry.snapshot.entries]
    return json_response({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    service: ChatService = request.app.state.service
    created: int = request.app.state.started_at
    model_id = request.path_params["model_id"]
    if model_id == AUTO:
        return json_response(_model_card(AUTO, created, "uniroute"))
    entry = service.registry.get(model_id)
    if entry is None:
        known = ", ".join((AUTO, *service.registry.names()))
        return error_response(ModelNotFoundError(f"unknown model '{model_id}'; known: {known}", param="model"))
    return json_response(_model_card(entry.name, entry.created or created, entry.owned_by))


# -- health -------------------------------------------------------------------------------


async def liveliness(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readiness(request: Request) -> Response:
    state = request.app.state
    problems: list[str] = []
    service: ChatService | None = getattr(state, "service", None)
    if service is None:
        problems.append("service not started")
    else:
        if len(service.registry) == 0:
            problems.append("registry is empty")
        if service.policy is None:
            problems.append("router not loaded")
    for name, check in getattr(state, "readiness_checks", {}).items():
        try:
            await check()
        except Exception as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        return error_response(ServiceUnavailableError("not ready: " + "; ".join(problems)))
    assert service is not None
    return json_response({"status": "ready", "models": len(service.registry), "router": service.policy.name})


# -- OpenAPI ------------------------------------------------------------------------------


async def openapi(request: Request) -> Response:
    doc = getattr(request.app.state, "openapi", None)
    if doc is None:
        from gateway.openapi import build_openapi

        doc = request.app.state.openapi = build_openapi()
    return json_response(doc)


# -- exception handlers -------------------------------------------------------------------


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err: GatewayError
    if exc.status_code == 404:
        err = NotFoundError(f"no route {request.method} {request.url.path}; see GET /openapi.json")
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or ""
        err = MethodNotAllowedError(f"method {request.method} is not allowed on {request.url.path}"
                                    + (f"; allowed: {allow}" if allow else ""),
                                    headers={"allow": allow} if allow else None)
    else:
        err = GatewayError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
    return error_response(err)


async def unhandled_exception(request: Request, exc: Exception) -> Response:
    return error_response(exc)
