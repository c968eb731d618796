"""The chat service: everything a chat completion does, with no HTTP types.

For one request: authenticate → resolve λ → rate-limit → pick the model(s) →
reserve budget → forward (with fallback) → log a :class:`RequestRecord` → settle.

The record goes to the sink (which journals it) BEFORE the budget is settled, carrying its
:class:`~gateway.serving.interfaces.Settlement`: a settlement that fails or is slow (the store is
down after the provider answered) never fails the answer, and the sink writes the charge with
the row once the store is back.

- ``model`` naming a registry entry is served by that model (no fallback).
- ``model: "auto"`` asks the policy to rank the routable pool for the prompt; the
  gateway then falls back down that ranking. The text routed on is the LAST user
  message's text (see :meth:`ChatCompletionRequest.routing_text`).
- λ comes from the request (``uniroute.lambda``), else the ``x-uniroute-lambda`` header,
  else the caller's default; it must lie in the caller's ``[lambda_min, lambda_max]``. A key with
  ``budget_policy: pace`` gets, instead of its default, the λ its :class:`LambdaPacer` paces its spend with.

The other endpoints (``/v1/responses``, ``/v1/messages``, ``/v1/embeddings``) run through the same steps:
:meth:`ChatService.run` / :meth:`ChatService.run_stream` take an :class:`~gateway.serving.operations.Operation`
and share ``_complete`` / ``_open`` and the stream timer ``_timed`` with the chat path; only the upstream
call and the reading of answers and events differ (the operation's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import numpy as np

from gateway.errors import (
    BudgetExceededError,
    GatewayError,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)
from gateway.pacing import CostCurve
from gateway.protocol import PASSTHROUGH_FIELDS, ChatCompletionRequest, UnirouteOptions
from gateway.serving import dryrun
from gateway.serving.estimate import Estimate, Estimator, counted_completion
from gateway.serving.forwarding import (
    Attempt,
    Completion,
    Forwarder,
    OpenStream,
    RelayedText,
    map_exception,
    shielded,
    usage_numbers,
    usage_of,
)
from gateway.serving.interfaces import (
    Authenticator,
    BudgetGuard,
    LambdaPacer,
    MemorySink,
    NoBudget,
    NoPacing,
    NoRateLimit,
    OpenAuthenticator,
    Principal,
    RateLimiter,
    RequestRecord,
    RequestSink,
    Reservation,
    Settlement,
)
from gateway.serving.operations import Operation
from gateway.serving.pools import RestrictedPools
from gateway.serving.registry import ModelEntry, Registry
from gateway.serving.router import EmbedFn
from gateway.serving.tenants import TenantOverlays
from gateway.telemetry import NO_TRACING, Tracing
from routing.policy import GatewayPolicy, RoutingDecision

logger = logging.getLogger("uniroute.service")
T = TypeVar("T")
#: One forwarding step of the service: (the models to try, the attempts list to fill, the output bound to force
#: upstream or None) → a completion or open stream.
Forward = Callable[[list[ModelEntry], list[Attempt], int | None], Awaitable[T]]
#: Completion tokens of a non-streaming answer, counted: (LiteLLM model name, the answer) → tokens.
CountAnswer = Callable[[str, Any], int]

AUTO = "auto"
_PASSTHROUGH: set[str] = set(PASSTHROUGH_FIELDS) - {"stream_options"}
DEGRADE_ROUNDS = 2  # a paced key's refused reservation is retried on the candidates that fit, at most this often
TOP_CANDIDATES = 5  # ranked candidates reported in the ``uniroute`` object and the request log


class RoutedRequest(Protocol):
    """What the service reads of any request it serves (a chat completion, or another endpoint's request)."""

    @property
    def model(self) -> str: ...

    @property
    def uniroute(self) -> UnirouteOptions | None: ...

    def routing_text(self) -> str: ...


@dataclass
class ChatContext:
    """What the HTTP layer knows about the call, in plain types."""

    request_id: str  # the gateway's own (unique)
    client_request_id: str | None = None  # the client's, if it sent one
    authorization: str | None = None
    lambda_header: str | None = None
    principal: Principal | None = None  # set by ChatService.authenticate, from the headers, before the body is read
    body_bytes: int = 0  # the request body's size: above the service's offload_bytes, CPU-heavy steps run in a thread


@dataclass
class ChatResult:
    body: dict[str, Any]  # OpenAI chat.completion + ``uniroute``
    model: str
    cost_usd: float | None
    attempts: int = 1  # upstream calls made
    lam: float | None = None  # the λ the request was routed with


@dataclass
class ChatStream:
    """An open stream. The caller iterates ``chunks`` and MUST ``await aclose()`` when done (or on
    disconnect), even if it never started iterating: that settles the budget and logs the request."""

    model: str  # known before the first byte is sent
    chunks: AsyncGenerator[dict[str, Any], None]  # chat.completion.chunk dicts; ``{"error": ...}`` on failure
    _finish: Callable[[], Awaitable[None]]
    attempts: int = 1  # upstream calls made to open it
    lam: float | None = None  # the λ the request was routed with

    async def aclose(self) -> None:
        await self.chunks.aclose()
        await self._finish()


def _total_timeout(entry: ModelEntry) -> UpstreamTimeoutError:
    return UpstreamTimeoutError(f"model '{entry.name}' did not finish the stream within {entry.timeout_s:g} s "
                                f"(timeout_s)")


class _StreamEnd:
    """Finishes a stream exactly once: close upstream, log the record, settle the budget.

    A stream cut short (client disconnect: 499; upstream failure or total timeout mid-way) whose
    usage chunk never came is logged with its partial usage — prompt tokens of everything the prompt
    bills (messages, tools, schemas, images), completion tokens of the text relayed so far (``relayed``:
    counts, never the text itself) — priced with the entry's prices, and the budget reservation is settled
    with that cost. A stream that ends without a usage chunk, or with an impossible one, is priced the
    same way (``counted``). ``req`` is the request as the estimate read it (for another endpoint, its
    ``estimate_request()``). The record
    (with its settlement) is logged before anything is awaited; counting, logging, closing upstream and
    settling run in one shielded task (a disconnect cancels the task that runs this); the counting runs in
    a worker thread: it tokenizes the whole prompt, and its first use in a process loads the tokenizer
    (~1 s of CPU), which on the event loop stalled every request in flight (tests/test_bounded_e2e.py)."""

    def __init__(self, service: ChatService, record: RequestRecord, reservation: Reservation | None,
                 opened: OpenStream, t0: float, req: ChatCompletionRequest,
                 estimate: Estimate | None = None) -> None:
        self.service, self.record, self.reservation, self.opened, self.t0 = service, record, reservation, opened, t0
        self.req = req
        self.estimate = estimate
        self.relayed = RelayedText(opened.entry.litellm_model)  # content relayed so far, as running counts
        self.settled = 0.0
        self.done = False

    async def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        record = self.record
        if record.status_code == 200 and record.upstream_latency_ms is None:  # stopped before the end
            record.status_code, record.error_type = 499, "client_disconnected"
        if record.status_code == 200:
            await self.service._close(record, self.t0, self.reservation, self.settled)
            return
        await shielded(self._cut_short())

    async def counted(self) -> tuple[int, int, float]:
        """(prompt tokens, completion tokens, cost) counted: everything the prompt bills (messages, tools,
        schemas, images: ``Estimator.prompt_tokens(counted=True)``) and what was relayed so far."""
        return await asyncio.to_thread(self._count)

    def _count(self) -> tuple[int, int, float]:
        entry = self.opened.entry
        pt = self.service.estimator.prompt_tokens(self.req, entry.litellm_model, counted=True)
        ct = self.relayed.tokens()
        return pt, ct, self.service.forwarder.price(entry, pt, ct)

    async def _cut_short(self) -> None:
        record = self.record
        if record.completion_tokens is None:
            pt, ct, cost = await self.counted()
            record.prompt_tokens, record.completion_tokens, record.cost_usd = pt, ct, cost
            self.settled = cost
        self.service._attach_settlement(record, self.reservation, self.settled)
        self.service._finish(record, self.t0)
        await self._release()

    async def _release(self) -> None:
        aclose = getattr(self.opened.rest, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        if self.reservation is not None:
            await self.service._settle(self.record, self.reservation, self.settled)


@dataclass
class _Plan:
    principal: Principal
    lam: float
    candidates: list[ModelEntry]
    decision: RoutingDecision | None
    embedding: np.ndarray | None = None  # the prompt's, when the policy ranked on it
    profile: str = "global"  # "key": ranked with the key's tenant-private profile overlay (serving/tenants.py)


class ChatService:
    def __init__(
        self,
        registry: Registry,
        policy: GatewayPolicy,
        forwarder: Forwarder,
        *,
        embed: EmbedFn | None = None,
        authenticator: Authenticator | None = None,
        rate_limiter: RateLimiter | None = None,
        budget: BudgetGuard | None = None,
        sink: RequestSink | None = None,
        offload_bytes: int = 64 * 1024,
        tracing: Tracing = NO_TRACING,
        estimator: Estimator | None = None,
        pacer: LambdaPacer | None = None,
        cost_curve: Callable[[], CostCurve | None] | None = None,
        overlays: TenantOverlays | None = None,
    ) -> None:
        if policy.needs_embedding and embed is None:
            raise ValueError(f"policy {policy.name!r} needs an embed function")
        self.registry = registry
        self.policy = policy
        self.forwarder = forwarder
        self.embed = embed
        self.authenticator: Authenticator = authenticator or OpenAuthenticator()
        self.rate_limiter: RateLimiter = rate_limiter or NoRateLimit()
        self.budget: BudgetGuard = budget or NoBudget()
        self.sink: RequestSink = sink or MemorySink()
        self.offload_bytes = offload_bytes  # requests with larger bodies count tokens etc. in a worker thread
        self.tracing = tracing
        self.estimator = estimator or Estimator()  # what a request may cost at most (budget: config)
        self.pacer: LambdaPacer = pacer or NoPacing()
        self.cost_curve = cost_curve or (lambda: None)  # the router's C(λ), the pacer's feed-forward
        self.overlays = overlays  # tenant-private profiles: a key's own labels, for its own routing only
        self._spans: dict[int, Any] = {}  # id(record) -> its request span, until _finish ends it
        self.restricted = RestrictedPools()  # keys' allowed_models pools, one tuple per (pool, allowed set)

    # -- steps ------------------------------------------------------------------------

    @staticmethod
    def resolve_lambda(req: RoutedRequest, header: str | None, principal: Principal) -> float:
        lo, hi = principal.lambda_min, principal.lambda_max
        if req.uniroute is not None and req.uniroute.lam is not None:
            lam, param = req.uniroute.lam, "uniroute.lambda"
        elif header is not None and header.strip():
            param = "x-uniroute-lambda"
            try:
                lam = float(header)
            except ValueError:
                raise InvalidRequestError(f"header x-uniroute-lambda must be a number in [{lo}, {hi}], got {header!r}",
                                          param=param) from None
        else:
            return principal.default_lambda
        if not math.isfinite(lam) or not lo <= lam <= hi:
            raise InvalidRequestError(f"{param} = {lam} is outside the allowed range [{lo}, {hi}] for this key",
                                      param=param, code="lambda_out_of_range")
        return lam

    async def choose_lambda(self, req: RoutedRequest, header: str | None, principal: Principal) -> float:
        """:meth:`resolve_lambda`, except that a key with ``budget_policy: pace`` that names no λ gets the paced one."""
        explicit = (req.uniroute is not None and req.uniroute.lam is not None) or bool(header and header.strip())
        if principal.budget_policy == "pace" and not explicit:
            return await self.pacer.paced_lambda(principal, self.cost_curve())
        return self.resolve_lambda(req, header, principal)

    async def authenticate(self, ctx: ChatContext) -> Principal:
        """Who is calling, from the ``Authorization`` header alone: the HTTP layer calls this before it reads
        the body, so a refused caller costs no body read or parse. A refusal is logged (its model is unknown)."""
        if ctx.principal is not None:
            return ctx.principal
        t0 = time.perf_counter()
        try:
            ctx.principal = await self.authenticator.authenticate(ctx.authorization)
        except BaseException as exc:
            record = RequestRecord(request_id=ctx.request_id, started_at=datetime.now(UTC), requested_model="",
                                   stream=False)
            self._fail(record, exc)
            self._finish(record, t0)
            raise
        return ctx.principal

    async def off_loop(self, ctx: ChatContext, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, in a worker thread when the request's body is larger than ``offload_bytes`` (token
        counting and other CPU-heavy steps on big payloads must not stall the event loop)."""
        if ctx.body_bytes > self.offload_bytes:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def plan(self, req: RoutedRequest, ctx: ChatContext, record: RequestRecord | None = None,
                   kind: str = "chat", rate_limit: bool = True) -> _Plan:
        """Who, λ, rate limit, and the candidates: the named model (of ``kind``), or ``auto``'s ranking.
        ``rate_limit=False`` (the operator's dry-run on behalf of a key) leaves the key's rate limit alone."""
        principal = ctx.principal or await self.authenticator.authenticate(ctx.authorization)
        if record is not None:  # attribute refusals after this point (bad λ, rate limit, model) to the key
            record.key_id, record.key_name = principal.key_id, principal.key_name
        lam = await self.choose_lambda(req, ctx.lambda_header, principal)
        if rate_limit:
            await self.rate_limiter.check(principal)
        allowed = principal.allowed_models
        if req.model != AUTO:
            entry = self.registry.get(req.model)
            if entry is None:
                known = ", ".join(self.usable_models(principal))
                raise ModelNotFoundError(f"unknown model '{req.model}'; known: {known}", param="model")
            if allowed is not None and entry.name not in allowed:
                raise PermissionDeniedError(f"this key may not use model '{entry.name}'; allowed: "
                                            f"{', '.join(self.usable_models(principal))}", param="model",
                                            code="model_not_allowed")
            if entry.kind != kind:
                raise InvalidRequestError(_wrong_kind(entry.name, entry.kind), param="model", code="wrong_model_kind")
            return _Plan(principal, lam, [entry], None)
        pool = self.registry.pool()
        mine = self.overlays.pool(principal.key_id, pool) if self.overlays is not None else None
        if mine is not None:
            pool = mine
        if allowed is not None:  # the same tuple for the same pool and allowed set: the policy's cache holds
            pool = self.restricted.get(pool, allowed)
        if not pool:
            raise ServiceUnavailableError("no routable model is available for 'auto'")
        with self.tracing.span("uniroute.route", {"uniroute.lambda": lam, "uniroute.pool_size": len(pool)}) as span:
            embedding = None
            if self.policy.needs_embedding and self.embed:
                with self.tracing.span("uniroute.embed"):
                    embedding = await self.embed(req.routing_text())
            with self.tracing.span("uniroute.rank", {"uniroute.policy": self.policy.name}):
                decision = self.policy.rank(embedding, pool, lam)
            if span is not None:
                span.set_attributes({"uniroute.cluster": decision.cluster if decision.cluster is not None else -1,
                                     "uniroute.candidates": [c.model for c in decision.ranked[:TOP_CANDIDATES]]})
        candidates = [e for e in (self.registry.get(c.model) for c in decision.ranked) if e is not None]
        return _Plan(principal, lam, candidates, decision, embedding, "global" if mine is None else "key")

    async def route(self, req: ChatCompletionRequest, ctx: ChatContext, *, operator: bool = False) -> dict[str, Any]:
        """The routing dry-run (``POST /v1/route``): :meth:`plan` as a chat request runs it (auth, λ, rate limit,
        ranking) and what it would try (gateway/serving/dryrun.py). No model is called, nothing is reserved,
        charged or logged. ``operator``: the admin's dry-run on behalf of the key in ``ctx.principal``
        (``POST /admin/keys/{name}/route``): the same plan (its λ, paced λ, overlay and models), without
        counting toward its rate limit, and naming the models it may not use."""
        plan = await self.plan(req, ctx, rate_limit=not operator)
        return dryrun.route_report(requested_model=req.model, principal=plan.principal, lam=plan.lam,
                                   candidates=plan.candidates, decision=plan.decision, embedding=plan.embedding,
                                   policy=self.policy, snapshot=self.registry.snapshot, forwarder=self.forwarder,
                                   profile=plan.profile, operator=operator)

    def usable_models(self, principal: Principal) -> list[str]:
        """The model names ``principal`` may call: ``auto`` and the registry's models its key allows. Every
        answer that names models (``/v1/models``, a 404's or 403's list) names only these: a key restricted
        to some models learns nothing of the others (docs/security/tenants.md)."""
        allowed = principal.allowed_models
        return [AUTO, *(n for n in self.registry.names() if allowed is None or n in allowed)]

    def _estimate(self, req: ChatCompletionRequest, tries: Sequence[ModelEntry], principal: Principal) -> Estimate:
        """The most ``req`` may cost on any model of ``tries`` (gateway/serving/estimate.py)."""
        return self.estimator.estimate(req, tries, budgeted=principal.budget_usd is not None)

    async def _reserve(self, req: ChatCompletionRequest, ctx: ChatContext, plan: _Plan,
                       record: RequestRecord) -> tuple[list[ModelEntry], Estimate, Reservation]:
        """Price every model the forwarder will try and reserve for the dearest; a refusal says what the
        estimate counted and what to change. Returns the models to try (exactly those priced). ``req`` is the
        request as the estimate reads it (another endpoint's ``estimate_request()``)."""
        tries = list(self.forwarder.tries(plan.candidates))
        estimate = await self.off_loop(ctx, self._estimate, req, tries, plan.principal)
        candidates = plan.candidates
        for _round in range(DEGRADE_ROUNDS + 1):
            try:
                reservation = await self.budget.reserve(plan.principal, estimate.usd)
            except BudgetExceededError as exc:
                fit = await self._degraded(req, ctx, plan, candidates, exc) if _round < DEGRADE_ROUNDS else None
                if not fit:
                    exc.message += self.refusal_advice(estimate)
                    exc.args = (exc.message,)
                    raise
                candidates = fit
                tries = list(self.forwarder.tries(candidates))
                estimate = await self.off_loop(ctx, self._estimate, req, tries, plan.principal)
                continue
            if candidates is not plan.candidates:
                record.budget_degraded = True
            return tries, estimate, reservation
        raise AssertionError("unreachable: the last round raises or returns")

    async def _degraded(self, req: ChatCompletionRequest, ctx: ChatContext, plan: _Plan,
                        candidates: list[ModelEntry], refusal: BudgetExceededError) -> list[ModelEntry] | None:
        """For a key with ``budget_policy: pace`` whose reservation did not fit: the candidates (in the ranking's
        order) whose own estimate fits what the budget has left, so the request is served by a cheaper model
        instead of a 429 (docs/PACING.md). None — refuse — for a ``block`` key, a named model, or when no
        candidate fits (the hard cap holds: the reservation of what is tried is still checked)."""
        left = refusal.remaining_usd
        if plan.principal.budget_policy != "pace" or plan.decision is None or left is None:
            return None
        prices = await self.off_loop(ctx, self.estimator.each, req, candidates)
        fit = [entry for entry, usd in zip(candidates, prices, strict=True) if usd <= left]
        return fit if fit and len(fit) < len(candidates) else None

    @staticmethod
    def refusal_advice(estimate: Estimate) -> str:
        """What a budget refusal adds: what the estimate counted, and what to change."""
        where = {"max_tokens": "max_tokens x n", "registry": "the model's max_output_tokens (no max_tokens sent)",
                 "litellm": "the model's maximum output (no max_tokens sent)",
                 "default": "budget.default_max_output_tokens (no max_tokens sent)"}[estimate.output_source]
        return (f" The estimate covers up to {estimate.prompt_tokens} prompt tokens (messages, tools, schemas, "
                f"images) and {estimate.output_tokens} completion tokens ({where}) on model '{estimate.model}', "
                "the dearest this request may be served by. Send a lower max_tokens (or a shorter prompt, fewer "
                "tools) to fit what remains, or wait for the budget to reset.")

    def _checked_usage(self, record: RequestRecord, estimate: Estimate, entry: ModelEntry,
                       prompt_tokens: Any, completion_tokens: Any) -> bool:
        """Whether usage reported by ``entry`` is possible for this request; if not, log it (WARNING) and flag
        the record (``usage_corrected``): the caller replaces it by the counted figure."""
        if estimate.plausible(entry.name, prompt_tokens, completion_tokens):
            return True
        record.usage_corrected = True
        logger.warning("request %s: model %s reported impossible usage (prompt_tokens=%r, completion_tokens=%r; "
                       "bounds %d and %d x budget.usage_tolerance %g): the counted figure is logged and charged "
                       "instead", record.request_id, entry.name, prompt_tokens, completion_tokens,
                       estimate.prompt_tokens, estimate.output_by_model.get(entry.name, estimate.output_tokens),
                       estimate.tolerance)
        return False

    def _counted(self, entry: ModelEntry, req: ChatCompletionRequest, response: Any,
                 count_answer: CountAnswer) -> tuple[int, int, float]:
        """(prompt tokens, completion tokens, cost) of an answer, counted (see ``_StreamEnd.counted``);
        ``count_answer`` counts the answer's completion (chat: :func:`counted_completion`)."""
        pt = self.estimator.prompt_tokens(req, entry.litellm_model, counted=True)
        ct = count_answer(entry.litellm_model, response)
        return pt, ct, self.forwarder.price(entry, pt, ct)

    @staticmethod
    def _params(req: ChatCompletionRequest, max_tokens: int | None = None) -> dict[str, Any]:
        """The request's parameters for LiteLLM; ``max_tokens``: the output bound the estimate forces (a key
        with a budget, a request without max_tokens, a model whose maximum output is unknown)."""
        params = req.model_dump(include=_PASSTHROUGH, exclude_none=True)
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        return params

    @staticmethod
    def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = req.model_dump(include={"messages"}, exclude_none=True)["messages"]
        return out

    def _record(self, req: RoutedRequest, ctx: ChatContext, stream: bool, endpoint: str = "chat") -> RequestRecord:
        record = RequestRecord(request_id=ctx.request_id, started_at=datetime.now(UTC), requested_model=req.model,
                               stream=stream, prompt_text=req.routing_text(),  # the sink drops it unless configured
                               client_request_id=ctx.client_request_id, endpoint=endpoint)
        if self.tracing.enabled:
            self._spans[id(record)] = self.tracing.request(endpoint, req.model, ctx.request_id, stream)
        return record

    @staticmethod
    def _fill_plan(record: RequestRecord, plan: _Plan) -> None:
        record.key_id = plan.principal.key_id
        record.key_name = plan.principal.key_name
        record.lam = plan.lam
        if plan.decision is not None:
            record.cluster = plan.decision.cluster
            record.candidates = [
                {"model": c.model, "expected_error": c.expected_error, "cost": c.cost, "objective": c.objective}
                for c in plan.decision.ranked[:TOP_CANDIDATES]
            ]

    @staticmethod
    def _fail(record: RequestRecord, exc: BaseException) -> None:
        if isinstance(exc, GatewayError):
            record.status_code, record.error_type = exc.status_code, exc.error_type
        elif isinstance(exc, asyncio.CancelledError):  # the client went away
            record.status_code, record.error_type = 499, "client_disconnected"
        else:
            record.status_code, record.error_type = 500, type(exc).__name__

    def _finish(self, record: RequestRecord, t0: float) -> None:
        record.finished_at = datetime.now(UTC)
        record.latency_ms = (time.perf_counter() - t0) * 1e3
        if self._spans:
            self.tracing.end_request(self._spans.pop(id(record), None), record)
        try:
            self.sink.submit(record)
        except Exception:  # the sink must not fail a request
            logger.exception("request sink failed")

    @staticmethod
    def _attach_settlement(record: RequestRecord, reservation: Reservation | None, actual_usd: float) -> None:
        """Put the charge the request owes on its record, so the sink can write it if settling fails."""
        if reservation is not None and reservation.id is not None and reservation.key_id is not None:
            record.settlement = Settlement(key_id=reservation.key_id, reservation_id=reservation.id,
                                           reserved_usd=reservation.amount_usd, actual_usd=actual_usd)

    async def _settle(self, record: RequestRecord, reservation: Reservation, actual_usd: float) -> None:
        """Settle the reservation; a failure is logged, never raised (the answer may be billed already)."""
        try:
            await self.budget.settle(reservation, actual_usd)
        except Exception as exc:
            later = ("its log record carries the charge, written when the store answers" if record.settlement
                     else "the charge is lost")
            logger.warning("request %s: settling the budget failed (%s: %s); %s", record.request_id,
                           type(exc).__name__, exc, later)

    async def _close(self, record: RequestRecord, t0: float, reservation: Reservation | None,
                     actual_usd: float) -> None:
        """The end of a request: log the record (journaled, with its settlement), then settle the budget."""
        self._attach_settlement(record, reservation, actual_usd)
        self._finish(record, t0)
        if reservation is not None:
            await self._settle(record, reservation, actual_usd)

    @staticmethod
    def extension(record: RequestRecord, plan: _Plan | None) -> dict[str, Any]:
        """The documented ``uniroute`` response object."""
        candidates: list[dict[str, Any]] = []
        if plan is not None and plan.decision is not None:
            candidates = [{"model": c.model, "expected_error": c.expected_error, "cost": c.cost}
                          for c in plan.decision.ranked[:TOP_CANDIDATES]]
        return {
            "request_id": record.request_id,
            "client_request_id": record.client_request_id,
            "requested_model": record.requested_model,
            "model": record.routed_model,
            "cluster": record.cluster,
            "lambda": record.lam,
            "cost_usd": record.cost_usd,
            "candidates": candidates,
            "attempts": record.attempts,
            "budget_degraded": record.budget_degraded,
        }

    # -- non-streaming ----------------------------------------------------------------

    async def complete(self, req: ChatCompletionRequest, ctx: ChatContext) -> ChatResult:
        return await self._complete(req, ctx, req, lambda tries, attempts, force: self.forwarder.complete(
            tries, self._messages(req), self._params(req, force), attempts), self._chat_body, counted_completion)

    async def run(self, op: Operation, ctx: ChatContext) -> ChatResult:
        """Another endpoint's request (gateway/serving/operations.py), non-streaming: the same steps; the
        estimate reads ``op.request.estimate_request()``."""
        return await self._complete(op.request, ctx, op.request.estimate_request(),
                                    lambda tries, attempts, force: self.forwarder.call(
                                        tries, op.endpoint, op.payload(force), attempts),
                                    op.body, op.counted_completion, op.endpoint, op.kind)

    @staticmethod
    def _chat_body(done: Completion) -> dict[str, Any]:
        body: dict[str, Any] = done.response.model_dump(exclude_none=True)
        body["model"] = done.entry.name
        for choice in body.get("choices", ()):
            choice.pop("provider_specific_fields", None)
        return body

    async def _complete(self, req: RoutedRequest, ctx: ChatContext, estimated: ChatCompletionRequest,
                        forward: Forward[Completion], shape: Callable[[Completion], dict[str, Any]],
                        count_answer: CountAnswer, endpoint: str = "chat", kind: str = "chat") -> ChatResult:
        """Plan → reserve the estimate of ``estimated`` (for the dearest model tried) → ``forward`` → check the
        usage (none or impossible: the counted figure, ``count_answer`` for the answer) → log and settle;
        ``shape`` makes the body."""
        t0 = time.perf_counter()
        record = self._record(req, ctx, stream=False, endpoint=endpoint)
        attempts: list[Attempt] = []
        reservation: Reservation | None = None
        settled = 0.0
        try:
            with self.tracing.current(self._spans.get(id(record))):
                plan = await self.plan(req, ctx, record, kind)
                self._fill_plan(record, plan)
                tries, estimate, reservation = await self._reserve(estimated, ctx, plan, record)
                done = await forward(tries, attempts, estimate.force_max_tokens)
            usage = usage_of(done.response)
            record.routed_model = done.entry.name
            record.cost_usd = done.cost_usd
            record.upstream_latency_ms = done.upstream_latency_ms
            pt, ct = usage_numbers(usage)
            if usage is None or _no_usage(pt, ct) or not self._checked_usage(record, estimate, done.entry, pt, ct):
                # no usage (LiteLLM's adapters report zeros for it), or impossible usage: count what was sent and answered (until counted, the bound is owed:
                # a client that goes away meanwhile is charged the reservation, never $0)
                settled = estimate.usd
                pt, ct, done.cost_usd = await self.off_loop(ctx, self._counted, done.entry, estimated, done.response,
                                                            count_answer)
                record.cost_usd = done.cost_usd
                if usage is not None:
                    set_usage(usage, pt, ct)
            record.prompt_tokens, record.completion_tokens = pt, ct
            settled = done.cost_usd or 0.0
            record.attempts = [a.as_dict() for a in attempts]
            body = shape(done)
            body["uniroute"] = self.extension(record, plan)
            return ChatResult(body=body, model=done.entry.name, cost_usd=done.cost_usd, attempts=len(attempts),
                              lam=plan.lam)
        except BaseException as exc:
            record.attempts = [a.as_dict() for a in attempts]
            self._fail(record, exc)
            if isinstance(exc, GatewayError):
                exc.attempts = len(attempts)
            raise
        finally:
            await self._close(record, t0, reservation, settled)

    # -- streaming --------------------------------------------------------------------

    async def stream(self, req: ChatCompletionRequest, ctx: ChatContext) -> ChatStream:
        """Open the stream (fallback happens here, before any byte is sent) and return its chunks."""
        messages = self._messages(req)

        def forward(tries: list[ModelEntry], attempts: list[Attempt], force: int | None) -> Awaitable[OpenStream]:
            params = self._params(req, force)
            params["stream_options"] = {"include_usage": True}  # the gateway always needs usage for the cost
            return self.forwarder.open_stream(tries, messages, params, attempts)

        opened, record, plan, end, tries = await self._open(req, ctx, req, forward)
        want_usage = bool(req.stream_options and req.stream_options.include_usage)
        return ChatStream(model=opened.entry.name, chunks=self._relay(opened, record, plan, end, want_usage),
                          _finish=end, attempts=tries, lam=plan.lam)

    async def run_stream(self, op: Operation, ctx: ChatContext) -> ChatStream:
        """Another endpoint's request, streaming: its events (dicts with a ``type``), the last with ``uniroute``."""
        estimated = op.request.estimate_request()
        opened, record, plan, end, tries = await self._open(
            op.request, ctx, estimated,
            lambda tries, attempts, force: self.forwarder.open_call_stream(tries, op.endpoint, op.payload(force),
                                                                           attempts), op.endpoint, op.kind)
        return ChatStream(model=opened.entry.name, chunks=self._relay_events(opened, record, plan, end, op),
                          _finish=end, attempts=tries, lam=plan.lam)

    async def _open(self, req: RoutedRequest, ctx: ChatContext, estimated: ChatCompletionRequest,
                    forward: Forward[OpenStream], endpoint: str = "chat",
                    kind: str = "chat") -> tuple[OpenStream, RequestRecord, _Plan, _StreamEnd, int]:
        """Plan → reserve the estimate of ``estimated`` (for the dearest model tried) → open the stream with
        ``forward`` (``estimated`` is also the prompt a stream without usage is charged for, counted); on
        failure, log and settle at once."""
        t0 = time.perf_counter()
        record = self._record(req, ctx, stream=True, endpoint=endpoint)
        attempts: list[Attempt] = []
        reservation: Reservation | None = None
        try:
            with self.tracing.current(self._spans.get(id(record))):
                plan = await self.plan(req, ctx, record, kind)
                self._fill_plan(record, plan)
                tries, estimate, reservation = await self._reserve(estimated, ctx, plan, record)
                opened = await forward(tries, attempts, estimate.force_max_tokens)
        except BaseException as exc:
            record.attempts = [a.as_dict() for a in attempts]
            self._fail(record, exc)
            if isinstance(exc, GatewayError):
                exc.attempts = len(attempts)
            await self._close(record, t0, reservation, 0.0)
            raise
        record.routed_model = opened.entry.name
        record.ttft_ms = (time.perf_counter() - t0) * 1e3
        record.attempts = [a.as_dict() for a in attempts]
        end = _StreamEnd(self, record, reservation, opened, t0, estimated, estimate=estimate)
        return opened, record, plan, end, len(attempts)

    @staticmethod
    async def _timed(opened: OpenStream) -> AsyncGenerator[Any, None]:
        """``opened``'s chunks (the first included), ending by ``opened.deadline`` (the model's ``timeout_s``):
        one timer per stream marks it expired, and cancels the wait if it fires while upstream is awaited;
        the stream then fails with a timeout error (504 in the log)."""
        entry = opened.entry
        task: asyncio.Task[Any] | None = None  # the task awaiting upstream right now
        waiting = expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            if waiting and task is not None:
                task.cancel()

        timer = asyncio.get_running_loop().call_at(opened.deadline, expire) if opened.deadline < math.inf else None
        try:
            chunk: Any = opened.first
            while True:
                yield chunk
                if expired:
                    raise _total_timeout(entry)
                task, waiting = asyncio.current_task(), True
                try:
                    chunk = await opened.rest.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not expired or task is None:
                        raise
                    task.uncancel()  # our own timer: a timeout, not a cancellation
                    raise _total_timeout(entry) from None
                finally:
                    waiting = False
        finally:
            if timer is not None:
                timer.cancel()

    def _mid_stream_error(self, exc: Exception, name: str, record: RequestRecord) -> GatewayError:
        """A stream failed after its first chunk: the error to send, counted toward the model's cooldown."""
        err = map_exception(exc, name)
        if not isinstance(err, UpstreamError):
            err = UpstreamError(f"model '{name}' failed mid-stream: {err.message}")
        self.forwarder.note_failure(name, err)
        record.status_code, record.error_type = err.status_code, err.error_type
        return err

    async def _relay(
        self,
        opened: OpenStream,
        record: RequestRecord,
        plan: _Plan,
        end: _StreamEnd,
        want_usage: bool,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield client chunks. Chunks that end the stream (finish_reason / usage) are held back so
        the ``uniroute`` object, with the final cost, rides on the last one. The whole stream must end by
        ``opened.deadline`` (:meth:`_timed`)."""
        entry = opened.entry
        name = entry.name
        held: dict[str, Any] | None = None
        template: dict[str, Any] = {}
        relayed = end.relayed
        try:
            async with contextlib.aclosing(self._timed(opened)) as upstream:
                async for chunk in upstream:
                    d: dict[str, Any] = chunk.model_dump(exclude_none=True)
                    d["model"] = name
                    if not template:
                        template = {k: d[k] for k in ("id", "object", "created") if k in d}
                    choices: Sequence[dict[str, Any]] = d.get("choices") or []
                    for c in choices:  # every choice (n > 1), tool-call arguments too: all of it is billed
                        delta = c.get("delta") or {}
                        content = delta.get("content")
                        if content:
                            relayed.add(content)
                        for call in delta.get("tool_calls") or ():
                            args = (call.get("function") or {}).get("arguments")
                            if args:
                                relayed.add(args)
                    usage = d.pop("usage", None)
                    if usage is not None:
                        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
                        if not _no_usage(pt, ct) and (end.estimate is None
                                                      or self._checked_usage(record, end.estimate, entry, pt, ct)):
                            record.prompt_tokens, record.completion_tokens = pt, ct
                            record.cost_usd = self.forwarder.stream_cost(entry, getattr(chunk, "usage", None))
                        else:  # zeros or impossible usage: count what was sent and relayed
                            pt, ct, record.cost_usd = await end.counted()
                            record.prompt_tokens, record.completion_tokens = pt, ct
                            usage.update(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct)
                        if want_usage:
                            usage.pop("cost", None)
                            d["usage"] = usage
                    if choices or "usage" in d:
                        ends = not choices or any(c.get("finish_reason") for c in choices)
                        if held is not None:
                            yield held
                            held = None
                        if ends:
                            held = d
                        else:
                            yield d
            upstream_ms = (time.perf_counter() - opened.started) * 1e3
            if record.completion_tokens is None:  # the provider sent no usage chunk: count what was relayed
                pt, ct, record.cost_usd = await end.counted()
                record.prompt_tokens, record.completion_tokens = pt, ct
            record.upstream_latency_ms = upstream_ms  # set once priced: a disconnect before is a stream cut short
            end.settled = record.cost_usd or 0.0
            if held is None:
                held = {**template, "object": "chat.completion.chunk", "model": name, "choices": []}
            held["uniroute"] = self.extension(record, plan)
            yield held
        except GeneratorExit:
            record.status_code, record.error_type = 499, "client_disconnected"
            raise
        except Exception as exc:
            err = self._mid_stream_error(exc, name, record)
            if held is not None:
                yield held
            yield err.to_body()
        finally:
            await end()

    async def _relay_events(self, opened: OpenStream, record: RequestRecord, plan: _Plan, end: _StreamEnd,
                            op: Operation) -> AsyncGenerator[dict[str, Any], None]:
        """Yield another endpoint's events (``op`` reads their usage and text, names the served model in them);
        the last one is held back to carry the ``uniroute`` object with the final cost, and so is the event with
        the stream's final usage (``op.final_usage``) and every one after it: when that usage is replaced by the
        counted figure (none, zeros, impossible), the client's event carries the figure charged, as chat's usage
        chunk does. A failure mid-way ends the stream with ``op``'s error event."""
        entry = opened.entry
        held: list[dict[str, Any]] = []  # the last event, or the final usage event and all since
        try:
            async with contextlib.aclosing(self._timed(opened)) as upstream:
                async for raw in upstream:
                    event = op.event(raw, entry.name)
                    pt, ct = op.event_usage(event)
                    if pt is not None or ct is not None:
                        record.prompt_tokens = pt if pt is not None else record.prompt_tokens
                        record.completion_tokens = ct if ct is not None else record.completion_tokens
                        record.cost_usd = self.forwarder.stream_cost(entry, {
                            "prompt_tokens": record.prompt_tokens or 0,
                            "completion_tokens": record.completion_tokens or 0})
                    text = op.event_text(event)
                    if text:
                        end.relayed.add(text)
                    if held and not op.final_usage(held[0]):
                        yield held.pop()
                    held.append(event)
            upstream_ms = (time.perf_counter() - opened.started) * 1e3
            pt, ct = record.prompt_tokens, record.completion_tokens
            # no usage (or none of the output; LiteLLM's adapters report zeros for none), or impossible usage:
            # count what was sent and relayed, and tell the client that figure
            if ct is None or _no_usage(pt, ct) or (
                    end.estimate is not None and not self._checked_usage(record, end.estimate, entry, pt, ct)):
                pt, ct, record.cost_usd = await end.counted()
                record.prompt_tokens, record.completion_tokens = pt, ct
                for event in held:
                    if op.final_usage(event):
                        op.set_event_usage(event, pt, ct)
            record.upstream_latency_ms = upstream_ms  # set once priced: a disconnect before is a stream cut short
            end.settled = record.cost_usd or 0.0
            if held:
                held[-1]["uniroute"] = self.extension(record, plan)
            for event in held:
                yield event
        except GeneratorExit:
            record.status_code, record.error_type = 499, "client_disconnected"
            raise
        except Exception as exc:
            err = self._mid_stream_error(exc, entry.name, record)
            for event in held:
                yield event
            yield op.error_event(err)
        finally:
            await end()


def _no_usage(prompt_tokens: Any, completion_tokens: Any) -> bool:
    """Usage that says nothing: no tokens at all (every request has a prompt; LiteLLM's Responses and Anthropic
    adapters report zeros when the provider sent no usage)."""
    return not prompt_tokens and not completion_tokens


def set_usage(usage: Any, prompt_tokens: int, completion_tokens: int) -> None:
    """Replace the token counts of ``usage`` (an object or a dict; OpenAI's names, or the Responses and
    Anthropic ``input_tokens``/``output_tokens``) by the counted figure, in place."""
    is_dict = isinstance(usage, dict)

    def has(name: str) -> bool:
        return name in usage if is_dict else getattr(usage, name, None) is not None

    pn, cn = (("input_tokens", "output_tokens") if not has("prompt_tokens") and has("input_tokens")
              else ("prompt_tokens", "completion_tokens"))
    values = {pn: prompt_tokens}
    if completion_tokens or has(cn):  # an embedding's usage has no completion field
        values[cn] = completion_tokens
    if has("total_tokens"):
        values["total_tokens"] = prompt_tokens + completion_tokens
    for name, value in values.items():
        with contextlib.suppress(Exception):
            if is_dict:
                usage[name] = value
            else:
                setattr(usage, name, value)


def _wrong_kind(name: str, kind: str) -> str:
    if kind == "embedding":
        return f"model '{name}' is an embedding model: call it through POST /v1/embeddings"
    return f"model '{name}' is a {kind} model; POST /v1/embeddings serves embedding models only (see GET /v1/models)"
