"""Gateway exceptions and the one function that turns any exception into an OpenAI-shaped error.

Every error body is ``{"error": {"message", "type", "param", "code"}}``, as OpenAI's are.
Messages say what was wrong and what is valid. They never carry tracebacks or secrets.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

logger = logging.getLogger("uniroute.errors")


class GatewayError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error type."""

    status_code: int = 500
    error_type: str = "internal_error"
    default_code: str | None = None
    attempts: int = 0  # upstream calls made before this error (set by the chat service)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers or {})

    def to_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequestError(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status_code = 403
    error_type = "permission_denied"


class NotFoundError(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class MethodNotAllowedError(GatewayError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeoutError(GatewayError):
    """The client did not send its request (body) in time: 408, and the connection is closed."""

    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class ClientDisconnectedError(GatewayError):
    """The client went away while its request was being read (499 in the log; nobody gets the answer)."""

    status_code = 499
    error_type = "client_disconnected"
    default_code = "client_disconnected"


class ConflictError(GatewayError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLargeError(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimitError(GatewayError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after
        if retry_after is not None:
            self.headers.setdefault("retry-after", str(max(1, int(retry_after + 0.999))))


class BudgetExceededError(GatewayError):
    status_code = 429
    error_type = "budget_exceeded"
    default_code = "budget_exceeded"
    remaining_usd: float | None = None  # what the key's budget had left (unspent, unheld) when it refused


class UpstreamError(GatewayError):
    """The backend failed (connection error, 5xx, bad response): 502."""

    status_code = 502
    error_type = "upstream_error"
    default_code = "bad_gateway"


class UpstreamTimeoutError(UpstreamError):
    status_code = 504
    error_type = "timeout"
    default_code = "upstream_timeout"


class UpstreamRateLimitError(UpstreamError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    default_code = "upstream_rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after  # the provider's Retry-After, seconds
        if retry_after is not None:
            self.headers.setdefault("retry-after", str(max(1, int(retry_after + 0.999))))


class ServiceUnavailableError(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"


#: Seconds a client is told to wait (``Retry-After``) when a worker is at ``server.max_in_flight``.
OVERLOAD_RETRY_AFTER_S = 1


class OverloadedError(ServiceUnavailableError):
    """This worker already serves ``server.max_in_flight`` requests: 503 with ``Retry-After`` at once, instead of
    queueing the request behind the others (gateway/http/middleware.py)."""

    error_type = "overloaded"
    default_code = "overloaded"

    def __init__(self, limit: int, *, retry_after: float = OVERLOAD_RETRY_AFTER_S, **kw: Any) -> None:
        super().__init__(f"the gateway is overloaded: this worker is already serving its limit of {limit} requests "
                         f"(server.max_in_flight); nothing was done with this request, retry it in {retry_after:g} s",
                         **kw)
        self.retry_after = retry_after
        self.headers.setdefault("retry-after", str(max(1, int(retry_after + 0.999))))


#: Seconds a client is told to wait (``Retry-After``) when the gateway's database is unavailable.
STORE_RETRY_AFTER_S = 2


class StoreUnavailableError(ServiceUnavailableError):
    """The gateway's database is unreachable, down, locked or read-only: 503 with ``Retry-After``.

    Raised for every request that needs the store before it can answer (an API key not in the
    cache, a budget reservation, ``/v1/usage``, ``/v1/feedback``, the admin API). The message names
    the failure's class only, never the database's address."""

    def __init__(self, message: str | None = None, *, cause: BaseException | None = None,
                 retry_after: float = STORE_RETRY_AFTER_S, **kw: Any) -> None:
        what = f" ({type(cause).__name__})" if cause is not None else ""
        super().__init__(message or f"the gateway's database is unavailable{what}; retry in {retry_after:g} s", **kw)
        self.retry_after = retry_after
        self.headers.setdefault("retry-after", str(max(1, int(retry_after + 0.999))))


def validation_message(exc: ValidationError, what: str, fields: str) -> str:
    """One line for a pydantic error: ``invalid <what>: <field>: <problem>; ... (fields: <fields>)``."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "body"
        parts.append(f"{loc}: {str(e['msg']).removeprefix('Value error, ')}")
    return f"invalid {what}: " + "; ".join(parts) + f" (fields: {fields})"


def error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Map any exception to ``(status, OpenAI-shaped body, extra headers)``.

    Known gateway errors keep their status and message. Anything else is a bug: it is
    logged with its traceback server-side and reported to the client as a bare 500.
    """
    if isinstance(exc, GatewayError):
        return exc.status_code, exc.to_body(), exc.headers
    logger.exception("unhandled error", exc_info=exc)
    body = {"error": {"message": "internal server error", "type": "internal_error", "param": None, "code": None}}
    return 500, body, {}


#: Anthropic's error ``type`` per HTTP status (``/v1/messages`` answers errors in Anthropic's shape).
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                         403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
                         408: "timeout_error", 409: "invalid_request_error", 413: "request_too_large",
                         429: "rate_limit_error", 499: "invalid_request_error", 504: "timeout_error",
                         529: "overloaded_error"}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """``{"type": "error", "error": {"type", "message"}}`` for ``status``: Anthropic's error shape."""
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}


def anthropic_error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """:func:`error_body` in Anthropic's shape (the same status, message and headers)."""
    status, body, headers = error_body(exc)
    return status, anthropic_error(status, str(body["error"]["message"])), headers
