"""A tiny OpenAI-compatible upstream for tests, with failures chosen by the model name.

Run: ``python -m uvicorn tests.fake_upstream:app --port P``. The suffix of ``model`` picks
the behaviour: ``-500`` (server error with a provider message), ``-429`` (rate limited),
``-400`` (rejects the request), ``-429`` sends ``Retry-After: 7``, ``-echo`` (answers with the request's JSON, minus messages), ``-slow`` (sleeps 5 s), ``-midfail`` (streams one chunk then
drops the connection); anything else echoes the last user message, streaming too.

Streams only (timeouts and disconnects): ``-slowfirst`` (headers at once, the first chunk after
2 s), ``-stall`` (two chunks, then nothing until the client goes away), ``-slowstream`` (40
chunks, one per 0.1 s). ``GET /streams`` tells, per stream (keyed by the last user message),
whether its generator ``finished`` or was ``closed`` before the end, and when (``time.time()``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

PROVIDER_MESSAGE = "fake provider is on fire"
STREAMS: dict[str, dict[str, Any]] = {}  # last user message -> {"state": "open|finished|closed", "at": time}


def _err(status: int, message: str, typ: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": typ, "param": None, "code": None}}, status_code=status)


async def chat(request: Request) -> Response:
    body: dict[str, Any] = await request.json()
    model = str(body.get("model"))
    if model.endswith("-500"):
        return _err(500, f"{PROVIDER_MESSAGE} ({model})", "server_error")
    if model.endswith("-429"):
        response = _err(429, "slow down", "rate_limit_exceeded")
        response.headers["retry-after"] = "7"
        return response
    if model.endswith("-400"):
        return _err(400, "this provider rejects the request", "invalid_request_error")
    if model.endswith("-slow"):
        for _ in range(50):  # 5 s, or until the client gives up
            if await request.is_disconnected():
                return Response(status_code=499)
            await asyncio.sleep(0.1)
    if model.endswith("-echo"):  # answer with the request itself (minus messages) as JSON
        content = json.dumps({k: v for k, v in body.items() if k != "messages"}, sort_keys=True)
        return JSONResponse({
            "id": "chatcmpl-echo", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })
    text = ""
    for m in reversed(body.get("messages", [])):
        if m.get("role") == "user":
            c = m.get("content")
            text = c if isinstance(c, str) else " ".join(p.get("text", "") for p in c)
            break
    answer = f"echo: {text}"
    params = {k: body[k] for k in ("temperature", "max_tokens", "seed", "stop", "top_p") if k in body}
    if params:
        answer += " " + json.dumps(params, sort_keys=True)
    usage = {"prompt_tokens": max(1, len(text) // 4), "completion_tokens": max(1, len(answer) // 4)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    created = int(time.time())
    if not body.get("stream"):
        return JSONResponse({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": usage,
        })
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

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
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": model}
        words = answer.split(" ")
        if model.endswith("-slowstream"):
            words = [f"w{i}" for i in range(40)]
        if model.endswith("-slowfirst"):
            await asyncio.sleep(2.0)
        for i, w in enumerate(words):
            delta: dict[str, Any] = {"content": (w if i == 0 else " " + w)}
            if i == 0:
                delta["role"] = "assistant"
            yield b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}).encode() + b"\n\n"
            if model.endswith("-midfail"):
                raise RuntimeError("connection dropped mid-stream")
            if model.endswith("-stall") and i == 1:
                await asyncio.sleep(600)  # until the client goes away
            if model.endswith("-slowstream"):
                await asyncio.sleep(0.1)
        yield b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode() + b"\n\n"
        if include_usage:
            yield b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def streams(request: Request) -> Response:
    return JSONResponse(STREAMS)


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health),
                        Route("/streams", streams)])
