"""Forwarding to the backends: the ONLY caller of ``litellm.acompletion`` (and of ``litellm.aresponses``,
``litellm.anthropic.messages.acreate`` and ``litellm.aembedding``, for the other endpoints).

- :class:`Forwarder` tries the ranked candidates one by one (fallback, cooldowns, first-token
  timeout, prices); each try is one call of an :class:`Upstream`. :class:`LiteLLMUpstream`, the
  default and the gateway's, calls ``litellm.acompletion``; tests may pass an in-memory one
  (``tests/fake_upstream.py``) to run the forwarder and the chat service without servers.
- Prices of every registry entry are registered with LiteLLM; the gateway computes each
  response's cost itself, exactly, from the usage the provider reports × the entry's prices
  (streams: from the final usage chunk), so LiteLLM's own cost bookkeeping is not relied on.
- Speed (see docs/PERFORMANCE.md): entries served through LiteLLM's ``openai`` provider share
  one pre-built ``openai.AsyncOpenAI`` client per (api_base, api_key, organization), passed as
  ``client=``, whose response parsing validates ``ChatCompletion``/``ChatCompletionChunk`` with
  pydantic's compiled validator instead of the SDK's pure-Python ``construct`` (20× cheaper
  per streamed chunk; unparseable data falls back to the SDK's own lenient path). For those
  entries a stream's chunks are the provider's own OpenAI ``ChatCompletionChunk`` objects, read
  from the SDK stream that ``litellm.acompletion`` opened (``raw_openai_streams``, default on):
  the request, parameter mapping and error mapping at open are still LiteLLM's, but not its
  per-chunk re-wrapping and end-of-stream re-assembly (~10 ms CPU per 20-chunk stream).
  The shared clients send over aiohttp (``http_client="aiohttp"``, the OpenAI SDK's own
  ``DefaultAioHttpClient``) instead of the SDK's default httpx stack, which cost about a third of
  the gateway's CPU per request; ``http_client="httpx"`` restores the default. Either way their
  responses are bounded in bytes (``max_response_bytes``, gateway/serving/bounded.py): a larger
  answer, or stream event, fails as a 502 without being buffered whole.
  Non-streaming calls (and those streams) run with LiteLLM's "internal call" flag set, which
  skips LiteLLM's own success/failure logging: the gateway logs and prices every request itself.
  During the gateway's chat calls LiteLLM's own response cost (``Logging.response_cost_calculator``,
  stored in the response's ``_hidden_params``, which the gateway never reads) is not computed
  (``skip_litellm_cost``), and an entry whose model is prefixed with a LiteLLM provider passes it as
  ``custom_llm_provider``, so ``acompletion`` does not resolve it again (``pass_provider``): ~1 ms of CPU
  per call together (``benchmarks/litellm_call_cpu.py``, docs/PERFORMANCE.md).
- Timeouts per model: ``connect_timeout_s`` (an ``httpx.Timeout`` on the call: honoured by
  LiteLLM's openai/azure/bedrock providers, the others get ``timeout_s`` as one number),
  ``first_token_timeout_s`` (streams: one ``asyncio.timeout`` around opening the stream and
  reading its first chunk) and ``timeout_s`` (the whole call: httpx's read timeout for a
  non-streaming call; for a stream, ``OpenStream.deadline``, which the chat service enforces
  after the first chunk with one timer per stream). A timeout before the first chunk falls
  back like any other.
- Provider failures become gateway errors: timeout → 504, 429 → 429; a failure caused by the
  request itself → 400 ``invalid_request_error`` (:func:`caused_by_request`: a provider 4xx other
  than 401/403/404/407/408/429 — e.g. 400, 409, 413, 415, 422 — or a payload that cannot even be
  encoded, such as a field nested ~1000 deep); anything else (connection error, 5xx, the gateway's
  own credential or model name refused: 401/403/404) → 502 with the provider's message, never a
  traceback.
- A request falls back down the ranked candidate list on connection error, 5xx,
  timeout or 429, while nothing has yet been sent to the client (for streams: before
  the first chunk), up to ``max_attempts`` models. Every attempt is recorded.
- With :class:`~gateway.serving.cooldown.Cooldowns`, retryable failures and successes are reported
  to it and candidates in cooldown are tried after the healthy ones (``gateway/serving/cooldown.py``).
  A failure caused by the request is not retryable, so it never counts toward a cooldown: a client
  cannot put a healthy model into cooldown by sending payloads the provider refuses
  (docs/security/tenants.md).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, get_args

import gateway  # noqa: F401  (offline environment before litellm is imported)
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    UpstreamError,
    UpstreamRateLimitError,
    UpstreamTimeoutError,
)
from gateway.secrets import REQUEST_ID, remember, scrub
from gateway.serving.bounded import UpstreamBodyError, bounded_client
from gateway.serving.cooldown import Cooldowns
from gateway.serving.registry import ModelEntry, RegistrySnapshot
from gateway.telemetry import NO_TRACING, OPERATIONS, Tracing

logger = logging.getLogger("uniroute.forwarding")
E = TypeVar("E", bound=BaseException)
#: default bound on one upstream answer (or stream event), in bytes (forwarding.max_response_bytes)
MAX_RESPONSE_BYTES = 32 * 1024 * 1024

#: HTTP stack of the shared upstream clients: aiohttp (the OpenAI SDK's ``DefaultAioHttpClient``) or httpx
HttpClientKind = Literal["aiohttp", "httpx"]
HTTP_CLIENTS: tuple[HttpClientKind, ...] = get_args(HttpClientKind)

#: providers whose OpenAI-compatible servers accept the standard ``user`` parameter
_PASS_USER = frozenset({"openai", "hosted_vllm"})
#: set while the gateway's own chat calls run: LiteLLM's response cost is then not computed (see
#: :func:`_skip_cost_when_asked`); every other caller of LiteLLM in the process is unaffected
_SKIP_LITELLM_COST: contextvars.ContextVar[bool] = contextvars.ContextVar("uniroute_skip_litellm_cost", default=False)
_PREFIX = re.compile(r"^(?:litellm\.\w+:\s*)?(?:\w+(?:Error|Exception):\s*)?(?:\w+Exception\s*-\s*)?")


def configure_litellm() -> Any:
    """Import LiteLLM and switch off everything the gateway does not use (logging, callbacks, telemetry)."""
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    litellm.set_verbose = False
    litellm.turn_off_message_logging = False  # True would deep-copy every request to redact logs nobody reads
    litellm.drop_params = True  # a backend that lacks a standard parameter ignores it instead of failing
    # /v1/messages on OpenAI-wire models: through chat completions (every OpenAI-compatible server has them),
    # not LiteLLM's default for the openai provider, the Responses API (which few of those servers have)
    litellm.use_chat_completions_url_for_anthropic_messages = True
    litellm.include_cost_in_streaming_usage = False  # the gateway prices usage itself (exact, cheaper)
    litellm.callbacks = []
    litellm.success_callback = []
    litellm.failure_callback = []
    litellm.input_callback = []
    litellm._async_success_callback = []
    litellm._async_failure_callback = []
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _skip_cost_when_asked()
    return litellm


def _skip_cost_when_asked() -> bool:
    """Make LiteLLM's per-call response cost (``Logging.response_cost_calculator``) answer None while
    :data:`_SKIP_LITELLM_COST` is set, and compute it as before otherwise. LiteLLM runs it after every call
    only to store the cost in the response's ``_hidden_params``, which the gateway never reads (it prices
    usage × the entry's prices itself); it was ~15% of the CPU of a non-streaming call. LiteLLM has no switch
    for it, so the method is wrapped once per process; a LiteLLM without it is left alone (False)."""
    try:
        from litellm.litellm_core_utils.litellm_logging import Logging
    except ImportError:  # pragma: no cover - a LiteLLM that moved its logging object
        return False
    original = getattr(Logging, "response_cost_calculator", None)
    if original is None or not callable(original):
        return False
    if getattr(original, "__uniroute_wrapped__", False):
        return True

    def response_cost_calculator(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _SKIP_LITELLM_COST.get():
            return None
        return original(self, *args, **kwargs)

    response_cost_calculator.__uniroute_wrapped__ = True  # type: ignore[attr-defined]
    response_cost_calculator.__wrapped__ = original  # type: ignore[attr-defined]
    response_cost_calculator.__doc__ = original.__doc__
    setattr(Logging, "response_cost_calculator", response_cost_calculator)  # noqa: B010 (a method: mypy refuses `=`)
    return True


@dataclass
class Attempt:
    model: str
    status: int
    error_type: str | None
    latency_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "status": self.status, "error_type": self.error_type,
                "latency_ms": round(self.latency_ms, 3)}


@dataclass
class Completion:
    """A finished non-streaming completion."""

    entry: ModelEntry
    response: Any  # litellm ModelResponse
    attempts: list[Attempt]
    cost_usd: float | None
    upstream_latency_ms: float


@dataclass
class OpenStream:
    """A stream whose first chunk has arrived; the rest comes from ``rest``."""

    entry: ModelEntry
    first: Any  # litellm ModelResponseStream
    rest: AsyncIterator[Any]
    attempts: list[Attempt]
    ttft_ms: float
    started: float = field(default_factory=time.perf_counter)
    deadline: float = float("inf")  # event-loop time by which the whole stream must have ended (timeout_s)


def provider_message(exc: BaseException) -> str:
    """The provider's own message, without LiteLLM's class-name prefixes."""
    msg = str(getattr(exc, "message", None) or exc).strip()
    msg = _PREFIX.sub("", msg, count=1).strip()
    return msg.splitlines()[0] if msg else type(exc).__name__


#: provider 4xx statuses that are not the request's fault: the gateway's own credential (401, 403, 407),
#: its model name or address (404), a timeout (408), a rate limit (429). Every other 4xx refuses the request.
_NOT_THE_REQUESTS_FAULT = frozenset({401, 403, 404, 407, 408, 429})


def caused_by_request(exc: BaseException, status: Any) -> bool:
    """Whether a failed call failed because of the request itself, not the model: the provider refused it
    (a 4xx but those of :data:`_NOT_THE_REQUESTS_FAULT`), or it could not be encoded at all (recursion).
    Such a failure answers 400, is not retried on another model and never counts toward a cooldown."""
    import litellm

    if isinstance(exc, litellm.BadRequestError | litellm.UnprocessableEntityError):
        return True
    if isinstance(status, int) and 400 <= status < 500 and status not in _NOT_THE_REQUESTS_FAULT:
        return True
    return _in_chain(exc, RecursionError) is not None


def _in_chain(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of type ``kind`` in ``exc``'s cause/context chain (``exc`` included): the SDK and
    LiteLLM re-raise what the HTTP stack raised, keeping it as the cause or context."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def map_exception(exc: BaseException, model: str) -> GatewayError:
    """Turn a LiteLLM/provider exception into the gateway error the client sees. The provider's message is
    scrubbed of credentials and internal hosts (:func:`gateway.secrets.scrub`); a connection error names the
    model and the request id, its full detail (host and port) goes to the DEBUG log only."""
    if isinstance(exc, GatewayError):
        return exc
    import litellm

    if _in_chain(exc, RecursionError) is not None:
        return InvalidRequestError(f"the request could not be sent to model '{model}': a field of it is nested too "
                                   "deeply to encode", code="request_not_encodable")
    body = _in_chain(exc, UpstreamBodyError)
    if body is not None:
        return UpstreamError(f"model '{model}' failed upstream: {scrub(str(body))}", code="upstream_response_refused")
    raw = provider_message(exc)
    msg = scrub(raw)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("model %s (request %s) failed: %s", model, REQUEST_ID.get(), scrub(raw, hosts=False))
    status = getattr(exc, "status_code", None)
    refused = _refused(exc)
    if refused is not None:
        rid = REQUEST_ID.get()
        logger.debug("model %s (request %s): connection error: %s", model, rid, scrub(str(refused), hosts=False))
        return UpstreamError(f"model '{model}' failed upstream: connection error"
                             + (f" (request {rid})" if rid else ""))
    if isinstance(exc, litellm.Timeout) or status in (408, 504):
        return UpstreamTimeoutError(f"model '{model}' timed out: {msg}")
    if isinstance(exc, litellm.RateLimitError) or status == 429:
        return UpstreamRateLimitError(f"model '{model}' is rate limited upstream: {msg}",
                                      retry_after=_retry_after(exc))
    if caused_by_request(exc, status):
        return InvalidRequestError(f"model '{model}' rejected the request: {msg}", code="upstream_bad_request")
    return UpstreamError(f"model '{model}' failed upstream: {msg}")


def _refused(exc: BaseException) -> BaseException | None:
    """The refused/dropped connection behind ``exc``, if any. The aiohttp transport reports every
    ``aiohttp.ClientConnectionError`` as ``httpx.ConnectTimeout``, so LiteLLM calls it a timeout."""
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp comes with litellm
        return None
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, aiohttp.ServerTimeoutError | TimeoutError):
            return None
        if isinstance(cur, aiohttp.ClientConnectionError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _retry_after(exc: BaseException) -> float | None:
    """The provider's ``Retry-After`` (seconds) on a 429, when it sent one."""
    headers = getattr(exc, "litellm_response_headers", None) or getattr(getattr(exc, "response", None),
                                                                        "headers", None)
    try:
        value = headers.get("retry-after") if headers is not None else None
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError, AttributeError):
        return None  # an HTTP date or junk: ignore


def _name(entry: ModelEntry) -> str:
    return entry.name


def is_retryable(err: GatewayError) -> bool:
    """Fall back on timeouts, 429s, connection errors and 5xx — not on a request the provider refused."""
    return isinstance(err, UpstreamError)


_CLIENT_KEYS = frozenset({"api_base", "api_key", "organization", "timeout", "max_retries", "custom_llm_provider",
                          "allowed_openai_params", "num_retries", "input_cost_per_token", "output_cost_per_token"})


def _fast_client_class() -> type:
    """``openai.AsyncOpenAI`` whose chat (chunk) parsing uses pydantic's compiled validator."""
    import openai
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    fast = (ChatCompletion, ChatCompletionChunk)

    class FastParseAsyncOpenAI(openai.AsyncOpenAI):
        def _process_response_data(self, *, data: object, cast_to: Any, response: Any) -> Any:
            if cast_to in fast and isinstance(data, dict):
                try:
                    return cast_to.model_validate(data)
                except ValueError:  # pydantic.ValidationError: an off-spec provider; parse leniently
                    pass
            return super()._process_response_data(data=data, cast_to=cast_to, response=response)

    return FastParseAsyncOpenAI


def _internal_call_flag() -> Any | None:
    """LiteLLM's "internal call" context flag: set, LiteLLM skips its own success/failure logging and
    billing for the call (it exists for sub-calls a parent logs). The gateway logs and prices every
    request itself. A private LiteLLM name, so absent → None (calls then simply log as usual)."""
    try:
        from litellm._internal_context import is_internal_call
    except ImportError:
        return None
    return is_internal_call


def _timeout(entry: ModelEntry) -> Any:
    """The call's timeout: ``timeout_s`` for everything but connecting, which gets ``connect_timeout``."""
    import httpx

    return httpx.Timeout(entry.timeout_s, connect=entry.connect_timeout)


def _price(entry: ModelEntry, prompt_tokens: int, completion_tokens: int) -> float:
    return prompt_tokens * entry.input_cost_per_token + completion_tokens * entry.output_cost_per_token


def usage_of(response: Any) -> Any:
    """A response's ``usage`` (an attribute, or a key of a dict answer); None if it has none."""
    if isinstance(response, Mapping):
        return response.get("usage")
    return getattr(response, "usage", None)


def usage_numbers(usage: Any) -> tuple[Any, Any]:
    """(prompt, completion) tokens of a usage object or dict, as sent (unchecked), named as OpenAI's chat and
    embeddings do (``prompt_tokens``/``completion_tokens``) or as the Responses and Anthropic APIs do
    (``input_tokens``/``output_tokens``)."""
    if usage is None:
        return None, None
    get = usage.get if isinstance(usage, Mapping) else lambda name: getattr(usage, name, None)
    pt, ct = get("prompt_tokens"), get("completion_tokens")
    if pt is None and ct is None:
        pt, ct = get("input_tokens"), get("output_tokens")
    return pt, ct


def token_counts(usage: Any) -> tuple[int | None, int | None]:
    """:func:`usage_numbers`, each kept only when it is an int."""
    pt, ct = usage_numbers(usage)
    return (pt if isinstance(pt, int) else None), (ct if isinstance(ct, int) else None)


def _cost(entry: ModelEntry, usage: Any) -> float | None:
    if usage is None:
        return None
    pt, ct = token_counts(usage)
    return _price(entry, pt or 0, ct or 0)


class Upstream(Protocol):
    """One call to one backend, no fallback: what the :class:`Forwarder` tries candidate by candidate.

    :class:`LiteLLMUpstream` (``litellm.acompletion``) is the gateway's; tests may pass an in-memory
    one. A failure is raised as the provider's exception (mapped by :func:`map_exception`) or as a
    :class:`~gateway.errors.GatewayError`; the Forwarder adds fallback, cooldowns, the first-token
    timeout and prices around the calls."""

    def register(self, snapshot: RegistrySnapshot) -> None:
        """The registry changed: get ready to call its entries."""
        ...

    async def complete(self, entry: ModelEntry, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> Any:
        """A non-streaming completion: an OpenAI ``ChatCompletion``-shaped object (``usage``, ``model_dump()``)."""
        ...

    async def stream(self, entry: ModelEntry, messages: list[dict[str, Any]],
                     params: Mapping[str, Any]) -> AsyncIterator[Any]:
        """Open a stream (errors at open are raised here); its ``ChatCompletionChunk``-shaped chunks."""
        ...

    async def call(self, entry: ModelEntry, endpoint: str, payload: Mapping[str, Any], stream: bool) -> Any:
        """One call of another endpoint (``responses``, ``messages``, ``embeddings``) with ``payload`` (the
        request's fields): its answer as a dict (with ``usage``), or, for a stream (errors at open raised
        here), an async iterator of its events as dicts (each with its ``type``)."""
        ...

    async def aclose(self) -> None:
        """Release connections (optional: pooled keep-alive connections only)."""
        ...


class LiteLLMUpstream:
    """Calls backends through ``litellm.acompletion`` (the gateway's only caller of it)."""

    def __init__(self, raw_openai_streams: bool = True, http_client: HttpClientKind = "aiohttp",
                 max_response_bytes: int = MAX_RESPONSE_BYTES, skip_litellm_cost: bool = True,
                 pass_provider: bool = True) -> None:
        """``skip_litellm_cost``: LiteLLM does not compute its own (unused) response cost during the chat
        calls; ``pass_provider``: an entry's provider prefix is passed as ``custom_llm_provider``. Both only
        save CPU (``benchmarks/litellm_call_cpu.py`` measures them off and on)."""
        if http_client not in HTTP_CLIENTS:
            raise ValueError(f"unknown http_client {http_client!r}; valid: {', '.join(HTTP_CLIENTS)}")
        self.raw_openai_streams = raw_openai_streams
        self.skip_litellm_cost = skip_litellm_cost
        self.pass_provider = pass_provider
        self.http_client = http_client
        self.max_response_bytes = max_response_bytes
        self._litellm = configure_litellm()
        self._acompletion = self._litellm.acompletion
        self._quiet = _internal_call_flag()
        # LiteLLM's provider names (a model prefix that is not one is part of the model's name)
        self._provider_names = frozenset(str(getattr(p, "value", p))
                                         for p in getattr(self._litellm, "provider_list", None) or ())
        self._kwargs: dict[str, tuple[ModelEntry, dict[str, Any]]] = {}
        self._clients: dict[tuple[str, str, str | None], Any] = {}
        self._client_cls: type | None = None

    def _shared_client(self, provider: str | None, params: Mapping[str, Any]) -> Any | None:
        """The shared client for an ``openai``-provider entry with a fixed api_base and key, else None."""
        if provider != "openai" or "client" in params or not set(params) <= _CLIENT_KEYS:
            return None
        base, key = params.get("api_base"), params.get("api_key")
        if not isinstance(base, str) or not isinstance(key, str):
            return None
        org = params.get("organization")
        ident = (base, key, org if isinstance(org, str) else None)
        client = self._clients.get(ident)
        if client is None:
            if self._client_cls is None:
                self._client_cls = _fast_client_class()
            # timeouts are passed per request (the entry's timeout_s); retries are the gateway's fallback.
            # The SDK's own HTTP client (aiohttp or httpx), its responses bounded in bytes
            http = bounded_client(self.http_client, self.max_response_bytes)
            client = self._client_cls(base_url=base, api_key=key, organization=ident[2], max_retries=0,
                                      http_client=http)
            self._clients[ident] = client
        return client

    async def aclose(self) -> None:
        """Close the shared HTTP clients (optional: they hold only pooled keep-alive connections)."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    # -- registry ---------------------------------------------------------------------

    def register(self, snapshot: RegistrySnapshot) -> None:
        """Register prices with LiteLLM and precompute each entry's call arguments."""
        prices: dict[str, dict[str, Any]] = {}
        kwargs: dict[str, tuple[ModelEntry, dict[str, Any]]] = {}
        for e in snapshot.entries:
            params = dict(e.litellm_params)
            model = params.pop("model")
            provider = params.get("custom_llm_provider") or (model.split("/", 1)[0] if "/" in model else None)
            if self.pass_provider and provider and "custom_llm_provider" not in params and \
                    provider in self._provider_names:
                # what acompletion would resolve from the prefix (and resolves again, per call, when not given)
                params["custom_llm_provider"] = provider
            info: dict[str, Any] = {"input_cost_per_token": e.input_cost_per_token,
                                    "output_cost_per_token": e.output_cost_per_token,
                                    "mode": "embedding" if e.kind == "embedding" else "chat"}
            if provider:
                info["litellm_provider"] = provider
            prices[model] = info
            if provider in _PASS_USER:
                # LiteLLM drops `user` (and, for embeddings, `dimensions`) for OpenAI-compatible servers that are
                # not OpenAI's own catalog
                params.setdefault("allowed_openai_params", ["user", "dimensions"] if e.kind == "embedding" else ["user"])
            params.setdefault("timeout", _timeout(e))
            params.setdefault("max_retries", 0)  # the gateway does its own fallback
            params["num_retries"] = 0
            # per-call prices too: two entries may share a LiteLLM model name at different prices
            params["input_cost_per_token"] = e.input_cost_per_token
            params["output_cost_per_token"] = e.output_cost_per_token
            client = self._shared_client(provider, params)
            if client is not None:
                params["client"] = client
            kwargs[e.name] = (e, {"model": model, **params})
        if prices:
            self._litellm.register_model(prices)
        self._kwargs = kwargs

    @contextmanager
    def _lean(self, quiet: bool = True) -> Iterator[None]:
        """The scope of one call of the gateway's: LiteLLM's internal-call flag (no logging of its own; when
        ``quiet``) and, with ``skip_litellm_cost``, no response cost of its own."""
        token = self._quiet.set(True) if quiet and self._quiet is not None else None
        skip = _SKIP_LITELLM_COST.set(True) if self.skip_litellm_cost else None
        try:
            yield
        finally:
            if skip is not None:
                _SKIP_LITELLM_COST.reset(skip)
            if token is not None and self._quiet is not None:
                self._quiet.reset(token)

    def _call_kwargs(self, entry: ModelEntry) -> dict[str, Any]:
        cached = self._kwargs.get(entry.name)
        if cached is None or cached[0] is not entry:
            self.register(RegistrySnapshot.build([*(c[0] for c in self._kwargs.values() if c[0].name != entry.name),
                                                  entry]))
            cached = self._kwargs[entry.name]
        return cached[1]

    # -- calls ------------------------------------------------------------------------

    async def complete(self, entry: ModelEntry, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> Any:
        with self._lean():
            response = await self._acompletion(messages=messages, **self._call_kwargs(entry), **params)
        if response is None:
            raise _unprocessable(entry)
        return response

    async def stream(self, entry: ModelEntry, messages: list[dict[str, Any]],
                     params: Mapping[str, Any]) -> AsyncIterator[Any]:
        kwargs = self._call_kwargs(entry)
        raw = self._raw_stream(kwargs)
        # LiteLLM's stream wrapper (and its logging) is bypassed for a raw stream
        with self._lean(quiet=raw):
            stream = await self._acompletion(messages=messages, stream=True, **kwargs, **params)
        if stream is None:
            raise _unprocessable(entry)
        return self._chunks(stream, raw)

    async def call(self, entry: ModelEntry, endpoint: str, payload: Mapping[str, Any], stream: bool) -> Any:
        """``litellm.aresponses`` (through LiteLLM's bridge to chat completions, which every OpenAI-compatible
        server has), ``litellm.anthropic.messages.acreate`` (LiteLLM's Anthropic adapter: any model, chat
        completions underneath) or ``litellm.aembedding``; answers and events as dicts."""
        kwargs = self._call_kwargs(entry)
        token = self._quiet.set(True) if self._quiet is not None else None
        try:
            if endpoint == "responses":
                out = await self._litellm.aresponses(**kwargs, **payload, stream=stream, use_chat_completions_api=True)
            elif endpoint == "messages":
                out = await self._litellm.anthropic.messages.acreate(**kwargs, **payload, stream=stream)
            elif endpoint == "embeddings" and not stream:
                out = await self._litellm.aembedding(**kwargs, **payload)
            else:
                raise ValueError(f"no such endpoint call: {endpoint} (stream={stream})")
        finally:
            if token is not None and self._quiet is not None:
                self._quiet.reset(token)
        if out is None:
            raise _unprocessable(entry)
        if not stream:
            return _as_dict(out)
        return _sse_events(out) if endpoint == "messages" else _dict_events(out)

    def _raw_stream(self, kwargs: Mapping[str, Any]) -> bool:
        return self.raw_openai_streams and "client" in kwargs

    def _chunks(self, stream: Any, raw_ok: bool) -> AsyncIterator[Any]:
        """The stream's chunks. For an entry on a shared OpenAI-wire client (``raw_openai_streams``),
        the provider's own ``ChatCompletionChunk`` objects that LiteLLM's stream wrapper holds, read
        directly: the wire format is already OpenAI's, and LiteLLM's per-chunk re-wrapping and
        end-of-stream re-assembly were ~2/3 of the gateway's CPU per 20-chunk stream."""
        raw = getattr(stream, "completion_stream", None)
        if raw_ok and raw is not None and hasattr(raw, "__aiter__"):
            return _raw_chunks(raw)
        it: AsyncIterator[Any] = stream.__aiter__()
        return it


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Mapping):
        return dict(obj)
    out: dict[str, Any] = obj.model_dump(mode="json", exclude_none=True)
    return out


async def _dict_events(stream: Any) -> AsyncIterator[dict[str, Any]]:
    """A LiteLLM stream of typed events (pydantic objects) as dicts; always closed."""
    try:
        async for event in stream:
            yield _as_dict(event)
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await shielded(close())


async def _sse_events(stream: Any) -> AsyncIterator[dict[str, Any]]:
    """A LiteLLM stream of server-sent events (bytes, possibly several or a part of one per chunk) as the
    dicts of their ``data:`` lines; always closed."""
    import json

    buffer = b""
    try:
        async for chunk in stream:
            if isinstance(chunk, Mapping):
                yield dict(chunk)
                continue
            buffer += chunk if isinstance(chunk, bytes) else str(chunk).encode()
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.splitlines():
                    if line.startswith(b"data:"):
                        data = json.loads(line[5:].strip())
                        if isinstance(data, dict):
                            yield data
    finally:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await shielded(close())


def _unprocessable(entry: ModelEntry) -> InvalidRequestError:
    """LiteLLM's OpenAI-wire call answers None (rather than raising) when the provider refused the request
    with 422 on both of its tries (it retries once without the parameters the 422 names, as
    ``drop_params`` asks): the request's fault, like any 422."""
    return InvalidRequestError(f"model '{entry.name}' rejected the request as unprocessable (422)",
                               code="upstream_bad_request")


class Forwarder:
    """Sends chat requests to backends through an :class:`Upstream` (LiteLLM unless given), with fallback."""

    def __init__(self, max_attempts: int = 3, cooldowns: Cooldowns | None = None,
                 upstream: Upstream | None = None, tracing: Tracing = NO_TRACING) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.max_attempts = max_attempts
        self.cooldowns = cooldowns if cooldowns is not None and cooldowns.enabled else None
        self.upstream: Upstream = upstream if upstream is not None else LiteLLMUpstream()
        self.tracing = tracing  # a span per attempt (gateway/telemetry.py)

    def register(self, snapshot: RegistrySnapshot) -> None:
        """The registry changed (``Registry.on_replace``): pass it on to the upstream; note its keys and hosts
        for :func:`gateway.secrets.scrub`."""
        remember(e.litellm_params for e in snapshot.entries)
        self.upstream.register(snapshot)

    async def aclose(self) -> None:
        await self.upstream.aclose()

    # -- calls ------------------------------------------------------------------------

    async def complete(
        self,
        candidates: Sequence[ModelEntry],
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
        attempts: list[Attempt] | None = None,
    ) -> Completion:
        """Non-streaming completion from the first candidate that answers.

        Every attempt is appended to ``attempts`` (pass a list to see them even when this raises).
        """
        return await self._complete(candidates, lambda entry: self.upstream.complete(entry, messages, params),
                                    attempts)

    async def call(self, candidates: Sequence[ModelEntry], endpoint: str, payload: Mapping[str, Any],
                   attempts: list[Attempt] | None = None) -> Completion:
        """A non-streaming call of another endpoint (:meth:`Upstream.call`), with the same fallback."""
        return await self._complete(candidates, lambda entry: self.upstream.call(entry, endpoint, payload, False),
                                    attempts, OPERATIONS.get(endpoint, endpoint))

    async def open_call_stream(self, candidates: Sequence[ModelEntry], endpoint: str, payload: Mapping[str, Any],
                               attempts: list[Attempt] | None = None) -> OpenStream:
        """A stream of another endpoint's events (:meth:`Upstream.call`), with the same fallback and timeouts."""
        return await self._open(candidates, lambda entry: self.upstream.call(entry, endpoint, payload, True),
                                attempts, OPERATIONS.get(endpoint, endpoint))

    async def _complete(self, candidates: Sequence[ModelEntry], call: Callable[[ModelEntry], Awaitable[Any]],
                        attempts: list[Attempt] | None, operation: str = "chat") -> Completion:
        attempts = [] if attempts is None else attempts
        last: GatewayError | None = None
        for entry in self.tries(candidates):
            t0 = time.perf_counter()
            try:
                with self._attempt(operation, entry) as span:
                    response = await call(entry)
                    if span is not None:
                        pt, ct = token_counts(usage_of(response))
                        span.set_attributes({k: v for k, v in (("gen_ai.usage.input_tokens", pt),
                                                               ("gen_ai.usage.output_tokens", ct)) if v is not None})
            except Exception as exc:
                err = map_exception(exc, entry.name)
                attempts.append(Attempt(entry.name, err.status_code, err.error_type, (time.perf_counter() - t0) * 1e3))
                logger.info("model %s failed (%s): %s", entry.name, err.status_code, err.message)
                last = err
                if is_retryable(err):
                    self.note_failure(entry.name, err)
                    continue
                break
            latency = (time.perf_counter() - t0) * 1e3
            attempts.append(Attempt(entry.name, 200, None, latency))
            self.note_success(entry.name)
            cost = _cost(entry, usage_of(response))
            return Completion(entry, response, attempts, cost, latency)
        raise _exhausted(last, attempts)

    async def open_stream(
        self,
        candidates: Sequence[ModelEntry],
        messages: list[dict[str, Any]],
        params: Mapping[str, Any],
        attempts: list[Attempt] | None = None,
    ) -> OpenStream:
        """Start a stream: fall back until some candidate yields its first chunk."""
        return await self._open(candidates, lambda entry: self.upstream.stream(entry, messages, params), attempts)

    def _attempt(self, operation: str, entry: ModelEntry) -> AbstractContextManager[Any]:
        """The span of one upstream attempt (GenAI conventions: ``{operation} {model}``, kind CLIENT)."""
        return self.tracing.span(f"{operation} {entry.name}", {
            "gen_ai.operation.name": operation, "gen_ai.request.model": entry.litellm_model,
            "gen_ai.provider.name": entry.owned_by, "uniroute.model": entry.name}, client=True)

    async def _open(self, candidates: Sequence[ModelEntry], start: Callable[[ModelEntry], Awaitable[Any]],
                    attempts: list[Attempt] | None, operation: str = "chat") -> OpenStream:
        attempts = [] if attempts is None else attempts
        last: GatewayError | None = None
        for entry in self.tries(candidates):
            t0 = time.perf_counter()
            started = asyncio.get_running_loop().time()
            try:
                with self._attempt(operation, entry):
                    async with asyncio.timeout(entry.first_token_timeout):
                        it = await start(entry)
                        first = await it.__anext__()
            except StopAsyncIteration:
                err: GatewayError = UpstreamError(f"model '{entry.name}' returned an empty stream")
            except TimeoutError:
                err = UpstreamTimeoutError(f"model '{entry.name}' sent no first token within "
                                           f"{entry.first_token_timeout:g} s (first_token_timeout_s)")
            except Exception as exc:
                err = map_exception(exc, entry.name)
            else:
                ttft = (time.perf_counter() - t0) * 1e3
                attempts.append(Attempt(entry.name, 200, None, ttft))
                self.note_success(entry.name)
                return OpenStream(entry, first, it, attempts, ttft, started=t0, deadline=started + entry.timeout_s)
            attempts.append(Attempt(entry.name, err.status_code, err.error_type, (time.perf_counter() - t0) * 1e3))
            logger.info("model %s failed (%s): %s", entry.name, err.status_code, err.message)
            last = err
            if not is_retryable(err):
                break
            self.note_failure(entry.name, err)
        raise _exhausted(last, attempts)

    def cooling(self, model: str) -> bool:
        """True while ``model`` is in cooldown (tried after every healthy candidate)."""
        return self.cooldowns is not None and self.cooldowns.cooling(model)

    def tries(self, candidates: Sequence[ModelEntry]) -> Sequence[ModelEntry]:
        """The candidates to try, in order: cooling ones behind the healthy ones, at most ``max_attempts``.
        The chat service prices each of them before the call (the budget reserves for the dearest) and passes
        exactly these as the candidates, so a fallback never reaches a model the reservation did not cover."""
        if self.cooldowns is not None:
            candidates = self.cooldowns.order(candidates, _name)
        return candidates[: self.max_attempts]

    def note_success(self, model: str) -> None:
        if self.cooldowns is not None:
            self.cooldowns.succeeded(model)

    def note_failure(self, model: str, err: GatewayError) -> None:
        """Count a retryable failure of ``model`` towards its cooldown (also used for mid-stream failures)."""
        if self.cooldowns is not None and is_retryable(err):
            self.cooldowns.failed(model, getattr(err, "retry_after", None))

    @staticmethod
    def price(entry: ModelEntry, prompt_tokens: int, completion_tokens: int) -> float:
        """USD of ``prompt_tokens`` + ``completion_tokens`` at the entry's prices."""
        return _price(entry, prompt_tokens, completion_tokens)

    @staticmethod
    def stream_cost(entry: ModelEntry, usage: Any) -> float | None:
        """Cost of a finished stream from its usage chunk: usage × the entry's prices."""
        return _cost(entry, usage)

    @staticmethod
    def partial_usage(entry: ModelEntry, messages: list[dict[str, Any]],
                      relayed: RelayedText | str) -> tuple[int, int, float]:
        """(prompt tokens, completion tokens, cost) of a stream cut short before its usage chunk: the
        messages and the text relayed so far, counted with LiteLLM's token counter, × the entry's prices.
        CPU-heavy for a large prompt: the chat service calls it in a worker thread then."""
        pt = count_tokens(entry.litellm_model, messages=messages)
        if isinstance(relayed, RelayedText):
            ct = relayed.tokens()
        else:
            ct = count_tokens(entry.litellm_model, text=relayed) if relayed else 0
        return pt, ct, _price(entry, pt, ct)


class RelayedText:
    """What a stream has relayed so far, as running counts (the text itself is not kept): characters, and
    tokens by LiteLLM's counter, counted per batch of about :attr:`BATCH` characters. Memory is one batch,
    whatever the stream's length; a stream that ends normally with its usage chunk never counts (a
    batch is counted only when it fills, or when :meth:`tokens` is asked)."""

    BATCH = 4096

    def __init__(self, model: str) -> None:
        self.model = model
        self.chars = 0
        self._tokens = 0
        self._pending: list[str] = []
        self._pending_chars = 0

    def add(self, text: str) -> None:
        self.chars += len(text)
        self._pending.append(text)
        self._pending_chars += len(text)
        if self._pending_chars >= self.BATCH:
            self._count()

    def _count(self) -> None:
        if self._pending:
            self._tokens += count_tokens(self.model, text="".join(self._pending))
            self._pending.clear()
            self._pending_chars = 0

    def tokens(self) -> int:
        """Completion tokens relayed so far (counts the pending batch)."""
        self._count()
        return self._tokens


async def _raw_chunks(raw: Any) -> AsyncIterator[Any]:
    """Yield an OpenAI SDK stream's chunks; always release its connection (shielded when cut short:
    a client disconnect cancels the task, and the close must still reach the provider)."""
    finished = False
    try:
        async for chunk in raw:
            yield chunk
        finished = True
    finally:
        close = getattr(raw, "close", None)
        if close is not None:
            await (close() if finished else shielded(close()))


_BACKGROUND: set[asyncio.Task[Any]] = set()


async def shielded(aw: Awaitable[Any]) -> None:
    """Run ``aw`` to completion even if the caller is cancelled (the caller still sees the cancellation)."""
    task = asyncio.ensure_future(aw)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    await asyncio.shield(task)


def count_tokens(model: str, *, messages: list[dict[str, Any]] | None = None, text: str | None = None) -> int:
    """Tokens by LiteLLM's counter for ``model`` (tiktoken's cl100k for unknown models); characters / 4
    if it fails. Images count LiteLLM's default figure: the counter never fetches a client's image URL."""
    import litellm

    try:
        return int(litellm.token_counter(model=model, messages=messages, text=text,
                                         use_default_image_token_count=True))
    except Exception:
        chars = len(text or "") + sum(len(str(m.get("content") or "")) for m in messages or ())
        return max(1, chars // 4) if chars else 0


def _exhausted(last: GatewayError | None, attempts: list[Attempt]) -> GatewayError:
    err = last or UpstreamError("no model to forward to")
    if len(attempts) > 1:
        tried = ", ".join(f"{a.model} ({a.status})" for a in attempts)
        err = type(err)(f"{err.message} [tried: {tried}]", param=err.param, code=err.code, headers=err.headers)
    return err
