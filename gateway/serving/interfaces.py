"""Contracts between the request path (``service.py``) and the parts behind it.

The chat service knows nothing of HTTP or SQL. It asks an :class:`Authenticator` who
is calling, a :class:`RateLimiter` whether they may, a :class:`BudgetGuard` to reserve
and settle spend, and hands a :class:`RequestRecord` to a :class:`RequestSink` when the
request ends. The defaults here serve an open gateway with no store; ``store.py`` and
friends provide the SQL/Redis-backed implementations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, Protocol

from gateway.pacing import CostCurve


@dataclass(frozen=True)
class Principal:
    """The caller, as resolved from its API key. Never holds the raw key."""

    key_id: int | None  # None for the anonymous principal of an open gateway
    key_name: str
    key_prefix: str  # display prefix, e.g. "sk-ur-AbC1"; safe to log
    default_lambda: float
    lambda_min: float = 0.0
    lambda_max: float = 10.0
    allowed_models: frozenset[str] | None = None  # None = every model
    rpm_limit: int | None = None
    budget_usd: float | None = None  # None = no cap
    budget_period: str = "month"  # "day" | "month"
    budget_policy: str = "block"  # "block" | "pace": a paced key's λ comes from the LambdaPacer

    @property
    def metric_label(self) -> str:
        """A bounded, non-secret label for metrics."""
        return self.key_name


ANONYMOUS = Principal(key_id=None, key_name="anonymous", key_prefix="", default_lambda=0.1)


@dataclass(frozen=True)
class Reservation:
    """Budget held for one in-flight request."""

    key_id: int | None
    amount_usd: float
    period_start: datetime | None = None
    token: Any = None  # implementation detail of the guard
    id: str | None = None  # the hold's identity in the guard's store (settled at most once); None: nothing to settle


@dataclass
class Settlement:
    """What a finished request owes its key: release ``reserved_usd`` held as ``reservation_id``, charge
    ``actual_usd``. It travels with the request's :class:`RequestRecord`, so a charge the request path
    could not write (the store down or slow) is written with the log row, exactly once (per reservation)."""

    key_id: int
    reservation_id: str
    reserved_usd: float
    actual_usd: float


@dataclass
class RequestRecord:
    """One row of the request log (see the ``requests`` table)."""

    request_id: str  # the gateway's own id (unique): what feedback addresses
    started_at: datetime
    requested_model: str
    stream: bool
    endpoint: str = "chat"  # the API called: chat, responses, messages, embeddings (ENDPOINTS)
    client_request_id: str | None = None  # the id the client sent, if any (not unique: any client may send any)
    key_id: int | None = None
    key_name: str | None = None
    routed_model: str | None = None
    cluster: int | None = None
    lam: float | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)  # top-k {model, expected_error, cost, objective}
    attempts: list[dict[str, Any]] = field(default_factory=list)  # [{model, status, error_type, latency_ms}]
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None  # total, as the client saw it
    upstream_latency_ms: float | None = None
    ttft_ms: float | None = None  # streams only
    status_code: int = 200
    error_type: str | None = None
    finished_at: datetime | None = None
    prompt_text: str | None = None  # stored only when configured
    usage_corrected: bool = False  # the provider's usage was impossible; the counted figure replaced it
    budget_degraded: bool = False  # a paced key's reservation did not fit: served by the candidates that did (not a column)
    settlement: Settlement | None = None  # the key's charge, when the request held a reservation (not a column)


class LabelStats(NamedTuple):
    """One key's labels for one model, per cluster k: ``counts[k]`` = Σ z_k(x), ``errors[k]`` = Σ z_k(x)·(1 − score)
    over its labelled prompts x (a tenant-private profile, gateway/serving/tenants.py)."""

    errors: tuple[float, ...]
    counts: tuple[float, ...]
    labels: int  # labelled prompts with a score for the model


class Authenticator(Protocol):
    async def authenticate(self, authorization: str | None) -> Principal:
        """Resolve an ``Authorization`` header value; raise ``AuthenticationError`` if refused."""
        ...


class RateLimiter(Protocol):
    async def check(self, principal: Principal) -> None:
        """Count one request; raise ``RateLimitError`` (with retry_after) when over the limit."""
        ...


class BudgetGuard(Protocol):
    async def reserve(self, principal: Principal, estimate_usd: float) -> Reservation:
        """Hold ``estimate_usd``; raise ``BudgetExceededError`` if it does not fit."""
        ...

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        """Replace the held estimate by the actual cost. May raise when the store fails; the chat service
        then answers anyway (the settlement rides with the request's record, see :class:`Settlement`)."""
        ...


class LambdaPacer(Protocol):
    async def paced_lambda(self, principal: Principal, curve: CostCurve | None) -> float:
        """The λ a key with ``budget_policy: pace`` is served with now (docs/PACING.md); ``curve`` is the
        router's expected cost per request against λ (None: the router has none). Never raises: when its state
        cannot be read the key's last λ (or its default) is served."""
        ...


class RequestSink(Protocol):
    def submit(self, record: RequestRecord) -> None:
        """Queue a finished request for logging (with its ``settlement``, if any). Must not block or raise."""
        ...


class OpenAuthenticator:
    """No keys configured: everyone is :data:`ANONYMOUS` (with the configured default λ)."""

    def __init__(self, principal: Principal = ANONYMOUS) -> None:
        self.principal = principal

    async def authenticate(self, authorization: str | None) -> Principal:
        return self.principal


class NoRateLimit:
    async def check(self, principal: Principal) -> None:
        return None


class NoBudget:
    async def reserve(self, principal: Principal, estimate_usd: float) -> Reservation:
        return Reservation(key_id=principal.key_id, amount_usd=0.0)

    async def settle(self, reservation: Reservation, actual_usd: float) -> None:
        return None


class NoPacing:
    """No pacer configured: a paced key is served with its default λ."""

    async def paced_lambda(self, principal: Principal, curve: CostCurve | None) -> float:
        return principal.default_lambda


class MemorySink:
    """Keeps the last ``maxlen`` records in memory (the default when no store is configured)."""

    def __init__(self, maxlen: int = 1000) -> None:
        from collections import deque

        self.records: deque[RequestRecord] = deque(maxlen=maxlen)

    def submit(self, record: RequestRecord) -> None:
        self.records.append(record)
