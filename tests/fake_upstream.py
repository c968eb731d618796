"""A tiny OpenAI-compatible upstream for tests, with failures chosen by the model name.

Run: ``python -m uvicorn tests.fake_upstream:app --port P``. The suffix of ``model`` picks
the behaviour: ``-500`` (server error with a provider message), ``-429`` (rate limited),
``-400`` (rejects the request), any other ``-4NN`` (answers that 4xx, e.g. ``-401``, ``-404``, ``-413``),
``-429`` sends ``Retry-After: 7``, ``-echo`` (answers with the request's JSON, minus messages), ``-slow`` (sleeps 5 s), ``-midfail`` (streams one chunk then
drops the connection); anything else echoes the last user message, streaming too. Any model
rejects a request whose last user message starts with ``reject:NNN`` with that 4xx status (a
healthy model refusing one payload, as a provider refuses an invalid one). ``-leak`` (a careless provider: 401 whose message echoes the request's
``Authorization`` header, key included). ``GET /auth`` tells the last ``Authorization`` header received
per model.

Billing (budget tests): ``-bill`` answers ``ok`` and bills what a provider would for the whole request: prompt
tokens = the JSON bytes of its messages and ``tools`` / 4, one completion token; ``-nousage`` never reports usage
(no usage chunk in a stream, whatever ``stream_options`` asks; no ``usage`` in an answer); ``-absurd`` answers as
the default does but reports :data:`ABSURD_TOKENS` prompt and completion tokens, ``-negative`` reports -7 and -3
(usage the gateway's sanity check must replace by the counted figure).

Held until released (overload tests, no race with a clock): ``-held`` answers only once the test calls ``POST
/release`` (or the client goes away, or after 60 s); ``-heldstream`` streams its first chunk at once and the rest
after ``/release``. A release lets every request held at that moment go on.

Streams only (timeouts and disconnects): ``-slowfirst`` (headers at once, the first chunk after
2 s), ``-stall`` (two chunks, then nothing until the client goes away), ``-slowstream`` (40
chunks, one per 0.1 s).

Size (server only): ``-huge`` answers a 300 MB completion (chunked, no ``content-length``, sent
1 MiB at a time as the client reads; streaming requests get one normal chunk, then a 300 MB event). ``GET /streams`` tells, per stream (keyed by the last user message),
whether its generator ``finished`` or was ``closed`` before the end, and when (``time.time()``).

:class:`FakeUpstream` is the same upstream in memory: a gateway ``Upstream``
(``gateway/serving/forwarding.py``) for tests of the forwarder and the chat service that need no
server. Same answers, usage and failures by suffix (``-500``/``-429``/``-400`` are raised as a
:class:`ProviderError` with the status, message and ``Retry-After``; ``-midfail`` drops its stream
after the first chunk); the timing suffixes (``-slow``, ``-slowfirst``, ``-stall``,
``-slowstream``, ``-held``, ``-heldstream``) are the server's only.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

if TYPE_CHECKING:
    from gateway.serving.registry import ModelEntry, RegistrySnapshot

PROVIDER_MESSAGE = "fake provider is on fire"
ABSURD_TOKENS = 10**9  # the prompt and completion tokens an ``-absurd`` model reports (far beyond any bound)
HUGE_BYTES = 300 * 1024 * 1024
_MIB = b"a" * (1024 * 1024)
STREAMS: dict[str, dict[str, Any]] = {}  # last user message -> {"state": "open|finished|closed", "at": time}
AUTH: dict[str, str] = {}  # model -> the last Authorization header it received
HOLD_S = 60.0  # the longest a held request waits for POST /release
_releases = 0  # bumped by POST /release: a held request goes on once it changes


async def _held(request: Request | None = None) -> None:
    """Wait for the next ``POST /release`` (at most :data:`HOLD_S`, or until the client of ``request`` goes away)."""
    start = _releases
    deadline = time.monotonic() + HOLD_S
    while _releases == start and time.monotonic() < deadline:
        if request is not None and await request.is_disconnected():
            return
        await asyncio.sleep(0.02)


async def release(request: Request) -> Response:
    global _releases
    _releases += 1
    return JSONResponse({"releases": _releases})


def _err(status: int, message: str, typ: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": typ, "param": None, "code": None}}, status_code=status)


def failure(model: str, body: Mapping[str, Any] | None = None) -> tuple[int, str, str] | None:
    """(status, message, error type) of a model whose suffix makes it fail at once, or of a request whose
    last user message asks to be rejected (``reject:NNN``), else None."""
    if model.endswith("-500"):
        return 500, f"{PROVIDER_MESSAGE} ({model})", "server_error"
    if model.endswith("-429"):
        return 429, "slow down", "rate_limit_exceeded"
    if model.endswith("-400"):
        return 400, "this provider rejects the request", "invalid_request_error"
    suffix = re.search(r"-(4\d\d)$", model)
    if suffix:
        return int(suffix.group(1)), f"this provider answers {suffix.group(1)}", "invalid_request_error"
    asked = re.match(r"reject:(4\d\d)", last_user_text(body or {}))
    if asked:
        return int(asked.group(1)), f"this provider refuses this payload ({asked.group(1)})", "invalid_request_error"
    return None


def reply(body: Mapping[str, Any]) -> tuple[str, dict[str, int]]:
    """The answer and usage for a request ``body``: ``-echo`` answers the body itself (minus messages),
    anything else echoes the last user message (and the sampling parameters it was sent)."""
    model = str(body.get("model"))
    if model.endswith("-echo"):
        content = json.dumps({k: v for k, v in body.items() if k != "messages"}, sort_keys=True)
        return content, {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    text = last_user_text(body)
    if model.endswith("-bill"):
        billed = len(json.dumps(body.get("messages") or [])) + len(json.dumps(body.get("tools") or []))
        return "ok", {"prompt_tokens": max(1, billed // 4), "completion_tokens": 1, "total_tokens": billed // 4 + 1}
    answer = f"echo: {text}"
    params = {k: body[k] for k in ("temperature", "max_tokens", "seed", "stop", "top_p") if k in body}
    if params:
        answer += " " + json.dumps(params, sort_keys=True)
    usage = {"prompt_tokens": max(1, len(text) // 4), "completion_tokens": max(1, len(answer) // 4)}
    if model.endswith("-absurd"):
        usage = {"prompt_tokens": ABSURD_TOKENS, "completion_tokens": ABSURD_TOKENS}
    elif model.endswith("-negative"):
        usage = {"prompt_tokens": -7, "completion_tokens": -3}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return answer, usage


def last_user_text(body: Mapping[str, Any]) -> str:
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c)
    return ""


def completion(model: str, answer: str, usage: dict[str, int], created: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-echo" if model.endswith("-echo") else "chatcmpl-fake", "object": "chat.completion",
        "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
        "usage": usage,
    }


def chunks(model: str, answer: str, usage: dict[str, int] | None, created: int) -> list[dict[str, Any]]:
    """The stream's chunks: one per word of the answer, the finish chunk, the usage chunk (if asked)."""
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": model}
    words = answer.split(" ")
    if model.endswith("-slowstream"):
        words = [f"w{i}" for i in range(40)]
    out = []
    for i, w in enumerate(words):
        delta: dict[str, Any] = {"content": (w if i == 0 else " " + w)}
        if i == 0:
            delta["role"] = "assistant"
        out.append({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    out.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage is not None:
        out.append({**base, "choices": [], "usage": usage})
    return out


async def chat(request: Request) -> Response:
    body: dict[str, Any] = await request.json()
    model = str(body.get("model"))
    AUTH[model] = request.headers.get("authorization", "")
    if model.endswith("-leak"):
        return _err(401, f"Incorrect API key. Request headers: Authorization: {AUTH[model]}; "
                         f"api-key={AUTH[model].removeprefix('Bearer ')}", "invalid_request_error")
    failed = failure(model, body)
    if failed is not None:
        response = _err(*failed)
        if failed[0] == 429:
            response.headers["retry-after"] = "7"
        return response
    if model.endswith("-slow"):
        for _ in range(50):  # 5 s, or until the client gives up
            if await request.is_disconnected():
                return Response(status_code=499)
            await asyncio.sleep(0.1)
    if model.endswith("-held"):
        await _held(request)
    answer, usage = reply(body)
    text = last_user_text(body)
    created = int(time.time())
    if model.endswith("-huge"):
        return StreamingResponse(_huge(model, bool(body.get("stream")), created),
                                 media_type="text/event-stream" if body.get("stream") else "application/json")
    if not body.get("stream") or model.endswith("-echo"):
        done = completion(model, answer, usage, created)
        if model.endswith("-nousage"):
            done.pop("usage")
        return JSONResponse(done)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and not model.endswith("-nousage")

    async def events() -> AsyncIterator[bytes]:
        STREAMS[text] = {"state": "open", "at": time.time()}
        try:
            async for event in _events():
                yield event
        except BaseException:
            STREAMS[text] = {"state": "closed", "at": time.time()}
            raise
        STREAMS[text] = {"state": "finished", "at": time.time()}

    async def _events() -> AsyncIterator[bytes]:
        if model.endswith("-slowfirst"):
            await asyncio.sleep(2.0)
        parts = chunks(model, answer, usage if include_usage else None, created)
        n_words = len(parts) - 1 - include_usage
        for i, chunk in enumerate(parts):
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            if i >= n_words:
                continue
            if model.endswith("-midfail"):
                raise RuntimeError("connection dropped mid-stream")
            if model.endswith("-stall") and i == 1:
                await asyncio.sleep(600)  # until the client goes away
            if model.endswith("-slowstream"):
                await asyncio.sleep(0.1)
            if model.endswith("-heldstream") and i == 0:
                await _held()  # a client going away cancels this generator
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def _huge(model: str, stream: bool, created: int) -> AsyncIterator[bytes]:
    """A 300 MB answer (or, streaming, a normal first chunk and then a 300 MB event), 1 MiB per write."""
    if stream:
        first = chunks(model, "big", None, created)[0]
        yield b"data: " + json.dumps(first).encode() + b"\n\n"
        yield b'data: {"id": "chatcmpl-fake", "choices": [{"index": 0, "delta": {"content": "'
    else:
        head = completion(model, "", {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, created)
        text = json.dumps(head)
        yield text[:text.index('"content": "') + len('"content": "')].encode()
    for _ in range(HUGE_BYTES // len(_MIB)):
        yield _MIB
    yield b'"}}]}\n\n' if stream else b'"}, "finish_reason": "stop"}]}'


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def streams(request: Request) -> Response:
    return JSONResponse(STREAMS)


async def auth(request: Request) -> Response:
    return JSONResponse(AUTH)


async def embeddings(request: Request) -> Response:
    from replay.app import embeddings_body

    return JSONResponse(embeddings_body(await request.json()))


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health),
                        Route("/v1/embeddings", embeddings, methods=["POST"]),
                        Route("/streams", streams), Route("/auth", auth),
                        Route("/release", release, methods=["POST"])])


# -- the same upstream in memory ---------------------------------------------------------------------


class ProviderError(Exception):
    """What a provider call raises on an HTTP error: its status, the provider's message, its headers."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.litellm_response_headers = headers or {}


class FakeUpstream:
    """This module's upstream as a gateway ``Upstream``, in memory: no server, no LiteLLM, no sockets.

    ``calls`` holds each call's request body (the provider's model name, messages and parameters)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def register(self, snapshot: RegistrySnapshot) -> None:
        pass

    def _request(self, entry: ModelEntry, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> dict[str, Any]:
        model = entry.litellm_model.split("/", 1)[-1]  # the provider's own name, as LiteLLM sends it
        body = {**params, "model": model, "messages": messages}
        self.calls.append(body)
        failed = failure(model, body)
        if failed is not None:
            status, message, _ = failed
            raise ProviderError(status, message, {"retry-after": "7"} if status == 429 else None)
        return body

    async def complete(self, entry: ModelEntry, messages: list[dict[str, Any]], params: Mapping[str, Any]) -> Any:
        from openai.types.chat import ChatCompletion

        body = self._request(entry, messages, params)
        answer, usage = reply(body)
        return ChatCompletion.model_validate(completion(body["model"], answer, usage, int(time.time())))

    async def stream(self, entry: ModelEntry, messages: list[dict[str, Any]],
                     params: Mapping[str, Any]) -> AsyncIterator[Any]:
        body = self._request(entry, messages, params)
        answer, usage = reply(body)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return self._chunks(body["model"], chunks(body["model"], answer, usage if include_usage else None,
                                                   int(time.time())))

    @staticmethod
    async def _chunks(model: str, parts: list[dict[str, Any]]) -> AsyncIterator[Any]:
        from openai.types.chat import ChatCompletionChunk

        for chunk in parts:
            yield ChatCompletionChunk.model_validate(chunk)
            if model.endswith("-midfail"):
                raise ConnectionError("connection dropped mid-stream")

    async def call(self, entry: ModelEntry, endpoint: str, payload: Mapping[str, Any], stream: bool) -> Any:
        if endpoint != "embeddings" or stream:
            raise NotImplementedError(f"the in-memory upstream serves chat and embeddings only, not {endpoint}")
        from replay.app import embeddings_body

        body = {**payload, "model": entry.litellm_model.split("/", 1)[-1]}
        self.calls.append(body)
        return embeddings_body(body)

    async def aclose(self) -> None:
        pass
