"""The replay upstream: an OpenAI-compatible server that answers as a routing benchmark's LLMs did.

``uniroute replay --dataset DIR`` serves every model of a routing-benchmark-format folder
(see ``docs/DATA.md``) on loopback. It stands in for real providers in the
demo, the tests and the benchmarks; the gateway reaches it through LiteLLM exactly as it
reaches any OpenAI-compatible provider (``model: openai/<name>``, ``api_base: http://127.0.0.1:8100/v1``).

Behaviour of ``POST /v1/chat/completions``:

- ``model`` must be one of the dataset's models, else an OpenAI-shaped 404 listing them.
- The prompt is the text of the last ``user`` message. A prompt equal to a dataset prompt
  (modulo surrounding whitespace) gets that model's recorded ``response``: a single option
  letter ``X`` is rendered as ``"The answer is (X)."``, an empty response as
  ``"I cannot determine the answer."`` (no letter, as a model whose answer could not be
  extracted), anything else verbatim. Any other prompt gets an answer starting with
  :data:`NO_RECORDING_MARK`.
- Usage: ``prompt_tokens`` = characters of all messages' text / 4. ``completion_tokens`` is
  derived from the recorded per-query cost when there is one (dataset convention:
  ``cost = params_B × (prompt_tokens + generated_tokens) / 1000`` with ``params_B`` the
  model's ``models.csv`` cost, tokens = characters / 4), never less than characters of the
  rendered content / 4.
  It is capped by ``max_tokens`` / ``max_completion_tokens``; when the rendered content itself
  is longer than that budget it is truncated and ``finish_reason`` is ``"length"``.
- ``stream: true`` sends OpenAI ``chat.completion.chunk`` events: a role delta, the content
  in ``stream_chunks`` pieces (default: one per word), a finish chunk, a usage chunk when
  ``stream_options.include_usage`` is set, then ``data: [DONE]``.
- ``n`` > 1 returns ``n`` identical choices.
- A request with ``tools`` whose last message is the user's, with no tool result in it yet (and
  ``tool_choice`` not ``"none"``), gets a call of the first tool (arguments ``{}``, ``finish_reason:
  "tool_calls"``); once a tool has answered, the answer is the recorded one, as for any prompt.

``POST /v1/embeddings`` (any model name) answers a deterministic unit vector per input, derived from its
text (:func:`embed_text`: equal texts, equal vectors), as floats or base64 (``encoding_format``), with
usage = characters / 4 per input.

Knobs (per model, ``*`` for every model): added latency before the response starts (so it
is the time to first token for streams), a delay between streamed chunks, and injected faults:
``"500"`` (an OpenAI-shaped server error), ``"429"`` (rate limited) or ``"timeout"`` (the
request hangs until the client gives up). ``POST /_replay/config`` changes latency and faults
of a running server (used by tests); ``GET /_replay/stats`` counts requests per model.

Everything is precomputed at startup (prompt → row index, model → column, the models list
body); rendered answers are cached on first use; bodies are serialised with orjson.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import math
import os
import re
import secrets
import struct
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    error_body,
)
from routing.dataset import BenchmarkDataset, load_dataset

#: Every answer to a prompt that is not in the dataset starts with this.
NO_RECORDING_MARK = "[uniroute-replay: no recording for this prompt]"
#: The answer rendered for an empty recorded response (the model gave no extractable answer).
NO_ANSWER_TEXT = "I cannot determine the answer."
#: Fault kinds accepted by ``faults``.
FAULT_KINDS = ("500", "429", "timeout")
#: Longest a "timeout" fault hangs before giving up by itself (seconds).
HANG_LIMIT_S = 600.0

_LETTER = re.compile(r"[A-Z]")
_WORDS = re.compile(r"\s*\S+")
_JSON = "application/json"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
_DONE = b"data: [DONE]\n\n"


def render_answer(response: str) -> str:
    """How a recorded short answer is phrased so that a multiple-choice grader can parse it."""
    text = response.strip()
    if not text:
        return NO_ANSWER_TEXT
    if _LETTER.fullmatch(text):
        return f"The answer is ({text})."
    return text


def estimate_tokens(chars: int) -> int:
    """The dataset's token estimate: characters / 4, at least 1."""
    return max(1, round(chars / 4))


def split_pieces(content: str, n_pieces: int | None) -> list[str]:
    """Split ``content`` into stream pieces: ``n_pieces`` near-equal parts, or one per word."""
    if not content:
        return []
    if n_pieces is None:
        pieces: list[str] = _WORDS.findall(content)
        if not pieces:
            return [content]
        consumed = sum(len(p) for p in pieces)
        if consumed < len(content):
            pieces[-1] += content[consumed:]
        return pieces
    n = max(1, min(n_pieces, len(content)))
    step = len(content) / n
    bounds = [round(k * step) for k in range(n + 1)]
    return [content[bounds[k]:bounds[k + 1]] for k in range(n)]


@dataclass(frozen=True)
class _Answer:
    content: str
    completion_tokens: int  # before any max_tokens cap
    pieces: tuple[str, ...]  # the stream deltas, in order
    recorded: bool


def _parse_fault_map(faults: Mapping[str, str] | None, models: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for model, kind in (faults or {}).items():
        kind = str(kind).strip().lower()
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault for {model!r} must be one of {', '.join(FAULT_KINDS)}; got {kind!r}")
        _check_model(model, models)
        out[model] = kind
    return out


def _parse_latency_map(latency_ms: Mapping[str, float] | None, models: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for model, ms in (latency_ms or {}).items():
        value = float(ms)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"latency for {model!r} must be a finite number of ms >= 0; got {ms!r}")
        _check_model(model, models)
        out[model] = value
    return out


def _check_model(model: str, models: list[str]) -> None:
    if model != "*" and model not in models:
        raise ValueError(f"unknown model {model!r}; known: '*', {', '.join(models)}")


class ReplayState:
    """The precomputed tables and the mutable knobs of one replay server."""

    def __init__(
        self,
        dataset: BenchmarkDataset,
        *,
        latency_ms: Mapping[str, float] | None = None,
        chunk_delay_ms: float = 0.0,
        stream_chunks: int | None = None,
        faults: Mapping[str, str] | None = None,
    ) -> None:
        if not dataset.responses:
            raise ValueError("the replay upstream needs a dataset loaded with its responses")
        if stream_chunks is not None and stream_chunks < 1:
            raise ValueError(f"stream_chunks must be >= 1; got {stream_chunks}")
        if not math.isfinite(chunk_delay_ms) or chunk_delay_ms < 0:
            raise ValueError(f"chunk_delay_ms must be >= 0; got {chunk_delay_ms}")
        self.dataset = dataset
        self.name = dataset.path.name
        self.models = list(dataset.models)
        self.model_col = {m: j for j, m in enumerate(self.models)}
        self.model_params = [float(c) for c in dataset.model_costs]
        self.prompt_row: dict[str, int] = {}
        for i, text in enumerate(dataset.prompts):
            self.prompt_row.setdefault(text, i)
            self.prompt_row.setdefault(text.strip(), i)
        self.prompt_chars = [len(p) for p in dataset.prompts]
        self.latency_s: dict[str, float] = {}
        self.faults: dict[str, str] = {}
        self.set_latency(latency_ms or {})
        self.set_faults(faults or {})
        self.chunk_delay_s = chunk_delay_ms / 1000.0
        self.stream_chunks = stream_chunks
        self.requests: dict[str, int] = dict.fromkeys(self.models, 0)
        self._cache: dict[tuple[int, int], _Answer] = {}
        self._ids = itertools.count(1)
        self._id_prefix = "chatcmpl-replay-" + secrets.token_hex(4) + "-"
        created = int(time.time())
        self.models_body = orjson.dumps(
            {"object": "list", "data": [self.model_card(m, created) for m in self.models]}
        )
        self.model_bodies = {m: orjson.dumps(self.model_card(m, created)) for m in self.models}

    @staticmethod
    def model_card(model: str, created: int) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": created, "owned_by": "uniroute-replay"}

    # --- knobs ---------------------------------------------------------------------------
    def set_latency(self, latency_ms: Mapping[str, float]) -> None:
        self.latency_s = {m: v / 1000.0 for m, v in _parse_latency_map(latency_ms, self.models).items()}

    def set_faults(self, faults: Mapping[str, str]) -> None:
        self.faults = _parse_fault_map(faults, self.models)

    def latency_for(self, model: str) -> float:
        if not self.latency_s:
            return 0.0
        return self.latency_s.get(model, self.latency_s.get("*", 0.0))

    def fault_for(self, model: str) -> str | None:
        if not self.faults:
            return None
        return self.faults.get(model, self.faults.get("*"))

    # --- answers -------------------------------------------------------------------------
    def next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def answer(self, model: str, col: int, prompt: str) -> _Answer:
        row = self.prompt_row.get(prompt)
        if row is None:
            row = self.prompt_row.get(prompt.strip())
        if row is None:
            content = (f"{NO_RECORDING_MARK} Model {model!r} of dataset {self.name!r} has no recorded "
                       f"answer for this prompt.")
            return _Answer(content, estimate_tokens(len(content)), tuple(split_pieces(content, self.stream_chunks)),
                           recorded=False)
        key = (row, col)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        content = render_answer(self.dataset.responses[row][col])
        # At least the visible answer; more when the recorded cost says the model generated more
        # (some datasets record costs without generated tokens: then the derived count is ~0).
        completion = estimate_tokens(len(content))
        cost = float(self.dataset.query_costs[row, col])
        if math.isfinite(cost) and cost > 0:
            total = cost * 1000.0 / self.model_params[col]
            completion = max(completion, round(total - self.prompt_chars[row] / 4))
        ans = _Answer(content, completion, tuple(split_pieces(content, self.stream_chunks)), recorded=True)
        self._cache[key] = ans
        return ans


# --- request parsing ---------------------------------------------------------------------

def _text_of(content: Any, sep: str = "\n") -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return sep.join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return body


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequestError(f"'{name}' must be an integer >= 1; got {value!r}", param=name)
        return value
    return None


def _error_response(exc: BaseException) -> Response:
    status, body, headers = error_body(exc)
    return Response(orjson.dumps(body), status_code=status, media_type=_JSON, headers=headers)


async def _hang(request: Request) -> None:
    """Wait until the client disconnects (or :data:`HANG_LIMIT_S`), so a 'timeout' fault never blocks shutdown."""
    async def until_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(until_disconnect(), HANG_LIMIT_S)


def _fault_response(kind: str, model: str) -> Response:
    if kind == "429":
        body = {"error": {"message": f"uniroute-replay: injected rate limit for model '{model}'",
                          "type": "rate_limit_exceeded", "param": None, "code": "rate_limit_exceeded"}}
        return Response(orjson.dumps(body), status_code=429, media_type=_JSON)
    body = {"error": {"message": f"uniroute-replay: injected server error for model '{model}'",
                      "type": "server_error", "param": None, "code": "internal_error"}}
    return Response(orjson.dumps(body), status_code=500, media_type=_JSON)


# --- handlers ----------------------------------------------------------------------------

async def chat_completions(request: Request) -> Response:
    state: ReplayState = request.app.state.replay
    try:
        body = _parse_body(await request.body())
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("'model' is required and must be a string", param="model")
        col = state.model_col.get(model)
        if col is None:
            raise ModelNotFoundError(
                f"unknown model '{model}'; known: {', '.join(state.models)}", param="model"
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequestError("'messages' is required and must be a non-empty list", param="messages")
        max_tokens = _max_tokens(body)
        n = body.get("n")
        n = 1 if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
            raise InvalidRequestError(f"'n' must be an integer in [1, 128]; got {n!r}", param="n")
    except GatewayError as exc:
        return _error_response(exc)

    state.requests[model] += 1
    fault = state.fault_for(model)
    if fault == "timeout":
        await _hang(request)
        return Response(b"", status_code=504)
    delay = state.latency_for(model)
    if delay:
        await asyncio.sleep(delay)
    if fault is not None:
        return _fault_response(fault, model)

    prompt_chars = 0
    last_user: Any = None
    for msg in messages:
        if isinstance(msg, dict):
            prompt_chars += len(_text_of(msg.get("content")))
            if msg.get("role") == "user":
                last_user = msg.get("content")
    prompt = _text_of(last_user)
    tool = _tool_to_call(body, messages)
    if tool is not None:
        return _tool_call_response(state, model, tool, estimate_tokens(prompt_chars), bool(body.get("stream")))
    ans = state.answer(model, col, prompt)
    if not ans.recorded and isinstance(last_user, list):
        joined = state.answer(model, col, _text_of(last_user, ""))
        ans = joined if joined.recorded else ans

    content, pieces, finish = ans.content, ans.pieces, "stop"
    completion = ans.completion_tokens
    if max_tokens is not None:
        completion = min(completion, max_tokens)
        if estimate_tokens(len(content)) > max_tokens:
            content = content[: max_tokens * 4]
            pieces = tuple(split_pieces(content, state.stream_chunks))
            finish = "length"
    usage = {
        "prompt_tokens": estimate_tokens(prompt_chars),
        "completion_tokens": completion * n,
        "total_tokens": estimate_tokens(prompt_chars) + completion * n,
    }
    headers = {"x-replay-recorded": "true" if ans.recorded else "false"}
    cid = state.next_id()
    created = int(time.time())

    if body.get("stream"):
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
        gen = _stream(state, cid, created, model, pieces, finish, n, usage if include_usage else None)
        return StreamingResponse(gen, media_type="text/event-stream", headers={**_SSE_HEADERS, **headers})

    choices = [
        {"index": k, "message": {"role": "assistant", "content": content, "refusal": None},
         "logprobs": None, "finish_reason": finish}
        for k in range(n)
    ]
    out = {"id": cid, "object": "chat.completion", "created": created, "model": model,
           "system_fingerprint": "uniroute-replay", "choices": choices, "usage": usage}
    return Response(orjson.dumps(out), media_type=_JSON, headers=headers)


async def _stream(
    state: ReplayState,
    cid: str,
    created: int,
    model: str,
    pieces: tuple[str, ...],
    finish: str,
    n: int,
    usage: dict[str, int] | None,
) -> AsyncIterator[bytes]:
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "uniroute-replay"}
    with_usage = usage is not None
    delay = state.chunk_delay_s

    def event(choices: list[dict[str, Any]]) -> bytes:
        chunk: dict[str, Any] = {**head, "choices": choices}
        if with_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    yield event([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None} for k in range(n)])
    for piece in pieces:
        if delay:
            await asyncio.sleep(delay)
        yield event([{"index": k, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
                     for k in range(n)])
    yield event([{"index": k, "delta": {}, "logprobs": None, "finish_reason": finish} for k in range(n)])
    if usage is not None:
        yield b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n"
    yield _DONE


def _tool_to_call(body: dict[str, Any], messages: list[Any]) -> str | None:
    """The tool a request with ``tools`` gets a call of: the first one, when the last message is the user's and
    no tool has answered yet."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or not isinstance(messages[-1], dict):
        return None
    if messages[-1].get("role") != "user" or body.get("tool_choice") == "none":
        return None
    if any(isinstance(m, dict) and m.get("role") == "tool" for m in messages):
        return None
    function = tools[0].get("function") if isinstance(tools[0], dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _tool_call_response(state: ReplayState, model: str, tool: str, prompt_tokens: int, stream: bool) -> Response:
    cid = state.next_id()
    created = int(time.time())
    call = {"id": f"call_{cid.rsplit('-', 1)[-1]}", "type": "function", "function": {"name": tool, "arguments": "{}"}}
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5}
    head = {"id": cid, "created": created, "model": model, "system_fingerprint": "uniroute-replay"}
    if not stream:
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        out = {**head, "object": "chat.completion", "usage": usage,
               "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
        return Response(orjson.dumps(out), media_type=_JSON)
    chunk = {**head, "object": "chat.completion.chunk"}
    events = [
        {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None,
                                                     "tool_calls": [{"index": 0, **call}]}, "finish_reason": None}]},
        {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {**chunk, "choices": [], "usage": usage},
    ]
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + _DONE
    return Response(body, media_type="text/event-stream", headers=_SSE_HEADERS)


#: Dimensions of the replay's embeddings when the request asks for none.
EMBEDDING_DIMENSIONS = 16


def embed_text(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A deterministic unit vector derived from ``text`` (SHA-256 in counter mode): equal texts, equal vectors."""
    raw = b"".join(hashlib.sha256(f"{k}:{text}".encode()).digest() for k in range(math.ceil(dimensions * 4 / 32)))
    values = [int.from_bytes(raw[4 * i:4 * i + 4], "little") / 2**31 - 1.0 for i in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def embeddings_body(body: dict[str, Any]) -> dict[str, Any]:
    """The ``/v1/embeddings`` answer for ``body``: one :func:`embed_text` vector per input (any model name),
    as floats or base64 (``encoding_format``); usage: characters / 4 per input."""
    model, inputs = body.get("model"), body.get("input")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("'model' is required and must be a string", param="model")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequestError("'input' must be a string or a non-empty list", param="input")
    dims = body.get("dimensions") or EMBEDDING_DIMENSIONS
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 4096:
        raise InvalidRequestError(f"'dimensions' must be an integer in [1, 4096]; got {dims!r}", param="dimensions")
    texts = [x if isinstance(x, str) else " ".join(map(str, x)) if isinstance(x, list) else str(x) for x in inputs]
    data: list[dict[str, Any]] = []
    for i, text in enumerate(texts):
        vector: Any = embed_text(text, dims)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(estimate_tokens(len(t)) for t in texts)
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def embeddings(request: Request) -> Response:
    try:
        out = embeddings_body(_parse_body(await request.body()))
    except GatewayError as exc:
        return _error_response(exc)
    return Response(orjson.dumps(out), media_type=_JSON)


async def list_models(request: Request) -> Response:
    state: ReplayState = request.app.state.replay
    return Response(state.models_body, media_type=_JSON)


async def get_model(request: Request) -> Response:
    state: ReplayState = request.app.state.replay
    model = request.path_params["model"]
    body = state.model_bodies.get(model)
    if body is None:
        return _error_response(ModelNotFoundError(
            f"unknown model '{model}'; known: {', '.join(state.models)}", param="model"))
    return Response(body, media_type=_JSON)


async def health(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type=_JSON)


async def replay_config(request: Request) -> Response:
    """``POST /_replay/config`` with ``{"latency_ms": {...}, "faults": {...}}`` replaces those knobs."""
    state: ReplayState = request.app.state.replay
    try:
        body = _parse_body(await request.body())
        try:
            if "latency_ms" in body:
                state.set_latency(body["latency_ms"] or {})
            if "faults" in body:
                state.set_faults(body["faults"] or {})
        except (ValueError, TypeError, AttributeError) as exc:
            raise InvalidRequestError(str(exc)) from None
    except GatewayError as exc:
        return _error_response(exc)
    out = {"latency_ms": {m: s * 1000.0 for m, s in state.latency_s.items()}, "faults": state.faults}
    return Response(orjson.dumps(out), media_type=_JSON)


async def replay_stats(request: Request) -> Response:
    state: ReplayState = request.app.state.replay
    return Response(orjson.dumps({"requests": state.requests}), media_type=_JSON)


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error_response(NotFoundError(f"no route for {request.method} {request.url.path}"))


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return _error_response(MethodNotAllowedError(f"method {request.method} not allowed on {request.url.path}"))


def create_replay_app(
    dataset: BenchmarkDataset | str | os.PathLike[str],
    *,
    latency_ms: dict[str, float] | None = None,
    chunk_delay_ms: float = 0.0,
    stream_chunks: int | None = None,
    faults: dict[str, str] | None = None,
) -> Starlette:
    """Build the replay upstream for ``dataset`` (a loaded dataset or its folder)."""
    data = dataset if isinstance(dataset, BenchmarkDataset) else load_dataset(dataset)
    state = ReplayState(data, latency_ms=latency_ms, chunk_delay_ms=chunk_delay_ms,
                        stream_chunks=stream_chunks, faults=faults)
    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/_replay/config", replay_config, methods=["POST"]),
        Route("/_replay/stats", replay_stats, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _method_not_allowed})
    app.state.replay = state
    return app
