"""Pure-ASGI middleware: request id, timing, body-size limit, body read timeout.

- Every HTTP response carries ``x-uniroute-request-id``: the gateway's own id, a fresh
  ``req-<uuid4 hex>`` per request, unique, and the id ``POST /v1/feedback`` addresses; and
  ``x-uniroute-time-ms`` (time to headers). The id is in ``scope["state"]["request_id"]``.
- A client's own id (``x-uniroute-client-request-id``, or for older clients
  ``x-uniroute-request-id`` sent on the request) is kept apart: if it is sane (1-128 of
  ``A-Za-z0-9._:-``) it is echoed as ``x-uniroute-client-request-id``, put in
  ``scope["state"]["client_request_id"]`` and logged with the request. It never replaces the
  gateway's id: any client may send any id, so a client id identifies nothing
  (docs/security/tenants.md).
- Every ``/v1/chat/completions`` response carries ``x-uniroute-attempts``: the handler sets the
  number of upstream calls; a response refused before it ran (413, 405, ...) gets ``0`` here.
- A body larger than ``max_body_bytes`` gets 413: at once when ``content-length`` says
  so, else as soon as the streamed body crosses the limit.
- A body that has not arrived completely ``body_timeout_s`` after the request started (a client
  trickling it) gets 408 when the handler next waits for it. Both close the connection.
- A response sent before the handler read the whole body (a 401 from the headers alone, a 400 from
  the first bytes) keeps the connection only when ``content-length`` promises at most
  :data:`DRAIN_MAX_BYTES` more (uvicorn reads and discards them); otherwise it closes the connection
  rather than read megabytes nobody will use (a client still sending may then see a reset instead of
  the answer: the price of not reading what an unauthenticated client sends).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import (
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    anthropic_error_body,
    error_body,
)
from gateway.secrets import REQUEST_ID
from gateway.serving.interfaces import RequestRecord

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.serving.interfaces import RequestSink

REQUEST_ID_HEADER = "x-uniroute-request-id"
CLIENT_REQUEST_ID_HEADER = "x-uniroute-client-request-id"
_CLIENT_ID_BYTES = CLIENT_REQUEST_ID_HEADER.encode()
#: upstream calls a chat response took; the handler sets it, and any chat response refused before the
#: handler ran (413, 405, ...) gets 0 here
ATTEMPTS = "x-uniroute-attempts"
_ATTEMPTS_BYTES = ATTEMPTS.encode()
CHAT_PATH = "/v1/chat/completions"
#: the API routes: counted in flight and refused beyond ``server.max_in_flight`` (health, metrics, admin never)
API_PREFIX = "/v1/"
#: The Anthropic Messages API: its errors are Anthropic-shaped (gateway.errors.anthropic_error_body)
MESSAGES_PATH = "/v1/messages"
#: The endpoints served through the chat service: every answer carries x-uniroute-attempts
SERVED_PATHS = frozenset({CHAT_PATH, "/v1/responses", MESSAGES_PATH, "/v1/embeddings"})
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
#: What a request id is (a client's own ``x-uniroute-request-id`` outside it is replaced by a fresh one)
REQUEST_ID_PATTERN = _SANE_ID
REQUEST_ID_RULE = "1-128 characters from ASCII letters, digits and . _ : -"
_CLOSE = {"connection": "close"}
#: the most unread body bytes a response sent early still reads (and discards) to keep the connection
DRAIN_MAX_BYTES = 1024 * 1024
_dumps: Any
try:
    import orjson

    _dumps = orjson.dumps
except ImportError:  # pragma: no cover
    import json

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj).encode()


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int = 10 * 1024 * 1024, body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        client_id: bytes | None = None
        length: int | None = None
        has_body = False
        for k, v in scope["headers"]:
            if k == _CLIENT_ID_BYTES or (k == b"x-uniroute-request-id" and client_id is None):
                client_id = v if _SANE_ID.match(v.decode("latin-1")) else None
            elif k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    length = None
            elif k == b"transfer-encoding":
                has_body = True
        rid = new_request_id()  # always the gateway's own: unique, whatever the client sends
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        if client_id is not None:
            state["client_request_id"] = client_id.decode("latin-1")
        rid_bytes = rid.encode()
        limit = self.max_body_bytes
        path = scope.get("path")
        chat = path in SERVED_PATHS
        body_done = not (has_body or length)  # nothing (more) to read
        received = 0

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-uniroute-request-id", rid_bytes))
                if client_id is not None:
                    headers.append((_CLIENT_ID_BYTES, client_id))
                headers.append((b"x-uniroute-time-ms", f"{(time.perf_counter() - t0) * 1e3:.2f}".encode()))
                if chat and not any(k == _ATTEMPTS_BYTES for k, _ in headers):
                    headers.append((_ATTEMPTS_BYTES, b"0"))
                if (not body_done and (length is None or length - received > DRAIN_MAX_BYTES)
                        and not any(k == b"connection" for k, _ in headers)):
                    # answered before the body was read: do not read (and discard) megabytes, or an unbounded rest
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        if length is not None and length > limit:
            await self._too_large(send_wrapper, limit, anthropic=path == MESSAGES_PATH)
            return

        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        timeout_s = self.body_timeout_s

        async def receive_wrapper() -> Message:
            nonlocal received, body_done
            if body_done:  # e.g. a streaming response listening for the disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeoutError(f"the request body did not arrive within {timeout_s:g} s "
                                          "(server.body_timeout_s)", headers=_CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(_too_large_message(limit), headers=_CLOSE)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        token = REQUEST_ID.set(rid)  # named in scrubbed upstream connection errors (gateway/secrets.py)
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            REQUEST_ID.reset(token)

    @staticmethod
    async def _too_large(send: Send, limit: int, anthropic: bool = False) -> None:
        shape = anthropic_error_body if anthropic else error_body
        status, body, _ = shape(PayloadTooLargeError(_too_large_message(limit)))
        payload = _dumps(body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _too_large_message(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes (server.max_body_bytes)"


class InFlightMiddleware:
    """Pure-ASGI admission control of the API routes (``/v1/*``), and the ``litellm_in_flight_requests`` gauge.

    At most ``max_in_flight`` API requests are served at once by this worker; a request holds its slot
    until the last byte of its response is sent (a stream: until it ends) or its handler returns. One more
    is answered at once with 503 ``overloaded`` and ``Retry-After`` (OpenAI-shaped,
    :class:`~gateway.errors.OverloadedError`), before its body is read: counted in
    ``uniroute_requests_shed_total`` and handed to ``sink`` as a request-log row (status 503, error type
    ``overloaded``, no model or key: nothing was read), so the logged rows still equal the request
    counter. Health, metrics and admin routes are never refused (the probes must answer under load).
    ``None``: no limit. It sits inside :class:`RequestContextMiddleware`, so a refusal carries its
    request id.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, max_in_flight: int | None = None,
                 sink: RequestSink | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.gauge = metrics.in_flight
        self.limit = max_in_flight
        self.sink = sink
        self.active = 0
        # the refusal is the same every time: built once per shape (Anthropic's on /v1/messages), so that
        # refusing costs far less than serving
        self._refusals = {shape: self._refusal(shape(OverloadedError(max_in_flight or 0)))
                          for shape in (error_body, anthropic_error_body)}

    @staticmethod
    def _refusal(built: tuple[int, dict[str, Any], dict[str, str]]) -> tuple[int, Message, Message]:
        status, body, headers = built
        payload = _dumps(body)
        start: Message = {
            "type": "http.response.start", "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                        *((k.encode(), v.encode()) for k, v in headers.items())]}
        return status, start, {"type": "http.response.body", "body": payload}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        if self.limit is not None and self.active >= self.limit:
            await self._shed(scope, send)
            return
        self.active += 1
        self.gauge.inc()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.active -= 1
                self.gauge.dec()

        async def send_and_release(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                # the client has the whole answer and may send its next request on this connection now, while
                # the handler still finishes (a stream's log row and settlement): that request must find the slot
                release()

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()

    async def _shed(self, scope: Scope, send: Send) -> None:
        t0 = time.perf_counter()
        status, start, body = self._refusals[anthropic_error_body if scope.get("path") == MESSAGES_PATH else error_body]
        await send({**start, "headers": list(start["headers"])})
        await send(body)
        self.metrics.requests_shed.inc()
        if self.sink is not None:
            state = scope.get("state") or {}
            now = datetime.now(UTC)
            record = RequestRecord(request_id=str(state.get("request_id") or new_request_id()), started_at=now,
                                   requested_model="", stream=False, client_request_id=state.get("client_request_id"),
                                   status_code=status, error_type=OverloadedError.error_type, finished_at=now,
                                   latency_ms=(time.perf_counter() - t0) * 1e3)
            self.sink.submit(record)
