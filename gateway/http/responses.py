"""The HTTP layer's responses: JSON bodies, and the one mapping from an exception to an error response.

Every error goes through :func:`gateway.errors.error_body`, so every error body is OpenAI-shaped, but on
``/v1/messages``, where :func:`gateway.errors.anthropic_error_body` gives Anthropic's shape.
``app.py`` registers :func:`gateway_error` for :class:`~gateway.errors.GatewayError` (so a handler
just raises), :func:`http_exception` for Starlette's 404/405, :func:`store_unavailable` for the
database's outage exceptions (``gateway.store.engine.OUTAGE_ERRORS``: 503 with ``Retry-After``, never
a 500) and :func:`unhandled_exception` as the 500 safety net.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    anthropic_error_body,
    error_body,
)
from gateway.http.bodies import json_shape, limits_of, off_loop, read_body
from gateway.http.middleware import MESSAGES_PATH
from gateway.store.engine import unavailable_error

dumps: Any
loads: Any
try:
    import orjson

    dumps, loads = orjson.dumps, orjson.loads
    _JSONError: type[Exception] = orjson.JSONDecodeError
except ImportError:  # pragma: no cover
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    loads = json.loads
    _JSONError = ValueError

JSON = "application/json"


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    try:
        content = dumps(body)
    except TypeError:  # orjson refuses integers beyond 64 bits (e.g. in a model's stored litellm_params)
        import json

        content = json.dumps(body, separators=(",", ":")).encode()
    return Response(content, status_code=status, media_type=JSON, headers=headers)


def error_response(exc: BaseException, anthropic: bool = False) -> Response:
    """The OpenAI-shaped answer for ``exc`` (Anthropic-shaped with ``anthropic``: ``/v1/messages``); a database
    outage is a 503 with ``Retry-After``."""
    exc = unavailable_error(exc) or exc
    status, body, headers = (anthropic_error_body if anthropic else error_body)(exc)
    return json_response(body, status, headers or None)


def anthropic_error_response(exc: BaseException) -> Response:
    return error_response(exc, anthropic=True)


def _shaped(request: Request, exc: BaseException) -> Response:
    """The answer for ``exc`` in the shape of the request's API (Anthropic's on ``/v1/messages``)."""
    return error_response(exc, anthropic=request.url.path == MESSAGES_PATH)


def parse_json(raw: bytes, empty: Any = None) -> Any:
    """The request body as JSON (``empty`` for an empty body); 400 ``invalid_json`` when it is not JSON."""
    if not raw:
        return empty
    try:
        return loads(raw)
    except (_JSONError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}", code="invalid_json") from None


async def json_body(request: Request, *, empty: Any = None) -> Any:
    """Read the request body under the structural limits every JSON body has (``limits.max_json_depth``,
    ``limits.max_json_items``: 400 at the first one broken) and parse it (see :func:`parse_json`); in a
    worker thread when it is larger than ``limits.offload_bytes``."""
    limits = limits_of(request)
    raw = await read_body(request, json_shape(limits))
    return await off_loop(len(raw), limits, parse_json, raw, empty)


def path_name(request: Request, what: str, max_length: int) -> str:
    """The ``{name}`` of an admin path; 404 at once for a name no row can have (NUL, longer than its column),
    which PostgreSQL would refuse to even look up."""
    name: str = request.path_params["name"]
    if "\x00" in name or len(name) > max_length:
        raise NotFoundError(f"no {what} named {name[:80]!r} (names are at most {max_length} characters, no NUL)",
                            param="name")
    return name


def header_value(text: str) -> str:
    """``text`` as a response header value: printable ASCII as is, anything else percent-encoded (UTF-8),
    so a header echoing a name can always be sent (HTTP headers are Latin-1 at best)."""
    if text.isascii() and text.isprintable():
        return text
    return quote(text, safe="".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "%"))


async def gateway_error(request: Request, exc: Exception) -> Response:
    """The registered handler for :class:`GatewayError`: handlers raise, this shapes the answer."""
    return _shaped(request, exc)


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
    return _shaped(request, err)


async def store_unavailable(request: Request, exc: Exception) -> Response:
    """The registered handler for the database's outage exceptions: 503 ``service_unavailable`` + ``Retry-After``."""
    return _shaped(request, exc)


async def unhandled_exception(request: Request, exc: Exception) -> Response:
    return _shaped(request, exc)
