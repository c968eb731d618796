"""``POST /v1/chat/completions``: parse with ``protocol``, call the chat service, shape JSON or SSE.

Response headers: ``x-uniroute-model`` (the model that served), ``x-uniroute-request-id`` (the
gateway's own id, set by the middleware; ``x-uniroute-client-request-id`` echoes the client's), ``x-uniroute-attempts`` (upstream calls made, on every chat response including
errors; 0 when refused before forwarding), ``x-uniroute-lambda`` (the λ it was routed with: the request's, the
key's default or, for a key with ``budget_policy: pace``, the paced one) and ``x-uniroute-cost`` (USD, when known
before the headers are sent, i.e. not for streams; the last chunk's ``uniroute.cost_usd`` has it).

Bounded work before authentication: the key is checked from the headers before a byte of the body is
read (a refused caller gets its 401 whatever it sends); the body is then read under the structural
limits of ``limits:`` (gateway/http/bodies.py: 400 at the first one broken, without reading the rest),
and a body over ``limits.offload_bytes`` is parsed and validated in a worker thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.config import LimitsConfig
from gateway.http.bodies import JsonShape, chat_shape, limits_of, off_loop, read_body
from gateway.http.middleware import ATTEMPTS, new_request_id
from gateway.http.responses import dumps, error_response, header_value, json_response, parse_json
from gateway.http.state import gateway_state
from gateway.protocol import ChatCompletionRequest, parse_chat_request
from gateway.serving.service import ChatContext, ChatResult, ChatStream

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
LAMBDA = "x-uniroute-lambda"  # the λ the request was routed with (the request header of the same name asks for one)


def request_id(request: Request) -> str:
    rid = request.scope.get("state", {}).get("request_id")
    return str(rid) if rid else new_request_id()


def _parse(raw: bytes) -> ChatCompletionRequest:
    return parse_chat_request(parse_json(raw))


async def chat_completions(request: Request) -> Response:
    service = gateway_state(request).chat_service()
    return await serve(request, _parse, service.complete, service.stream, SSEResponse)


class Served(Protocol):
    @property
    def stream(self) -> bool | None: ...


R = TypeVar("R", bound=Served)


async def serve(request: Request, parse: Callable[[bytes], R], complete: Callable[[R, ChatContext], Awaitable[ChatResult]],
                stream: Callable[[R, ChatContext], Awaitable[ChatStream]], sse: Callable[[ChatStream], Response],
                error: Callable[[BaseException], Response] = error_response,
                authorization: str | None = None,
                shape: Callable[[LimitsConfig], JsonShape] = chat_shape) -> Response:
    """The one HTTP flow of every served endpoint: the key from the headers first (``authorization``, default
    the ``Authorization`` header), the body read under the structural limits of ``shape`` (default: the chat
    limits) and parsed (``parse``), then the service
    (``complete`` or ``stream``); JSON with the ``x-uniroute-*`` headers, or ``sse`` events; ``error`` shapes a
    failure (with ``x-uniroute-attempts``)."""
    service = gateway_state(request).chat_service()
    limits = limits_of(request)
    ctx = ChatContext(
        request_id=request_id(request),
        client_request_id=request.scope.get("state", {}).get("client_request_id"),
        authorization=authorization if authorization is not None else request.headers.get("authorization"),
        lambda_header=request.headers.get("x-uniroute-lambda"),
    )
    try:
        await service.authenticate(ctx)  # from the headers: a refused key costs no body read
        raw = await read_body(request, shape(limits))
        ctx.body_bytes = len(raw)
        req = await off_loop(len(raw), limits, parse, raw)
        if req.stream:
            opened = await stream(req, ctx)
            try:
                return sse(opened)
            except BaseException:  # never leave an opened stream (its reservation, its log row) behind
                await opened.aclose()
                raise
        result = await complete(req, ctx)
    except Exception as exc:  # every response carries the attempts made, errors included
        response = error(exc)
        response.headers[ATTEMPTS] = str(getattr(exc, "attempts", 0))
        return response
    headers = {"x-uniroute-model": header_value(result.model), ATTEMPTS: str(result.attempts)}
    if result.lam is not None:
        headers[LAMBDA] = f"{result.lam:.10g}"
    if result.cost_usd is not None:
        headers["x-uniroute-cost"] = f"{result.cost_usd:.10g}"
    return json_response(result.body, headers=headers)


class SSEResponse(StreamingResponse):
    """Server-sent chat.completion.chunk events ending in ``data: [DONE]``; always closes the stream. With
    ``named`` (the Responses and Messages APIs), each event is ``event: <its type>`` + ``data: ...`` and there
    is no ``[DONE]``."""

    def __init__(self, stream: ChatStream, named: bool = False) -> None:
        self.stream = stream
        self.named = named
        headers = {**SSE_HEADERS, "x-uniroute-model": header_value(stream.model), ATTEMPTS: str(stream.attempts)}
        if stream.lam is not None:
            headers[LAMBDA] = f"{stream.lam:.10g}"
        super().__init__(self._events(), media_type="text/event-stream", headers=headers)

    async def _events(self) -> AsyncIterator[bytes]:
        if self.named:
            async for event in self.stream.chunks:
                yield b"event: " + str(event.get("type", "message")).encode() + b"\ndata: " + dumps(event) + b"\n\n"
            return
        async for chunk in self.stream.chunks:
            yield b"data: " + dumps(chunk) + b"\n\n"
        yield b"data: [DONE]\n\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.stream.aclose()
