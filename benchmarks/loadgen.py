"""An async HTTP/1.1 load generator for OpenAI-compatible chat endpoints.

It speaks just enough HTTP/1.1 over raw asyncio streams (keep-alive, Content-Length and
chunked bodies) to keep its own CPU cost far below an HTTP client library's, which matters
when the load generator shares a 2-core machine with the servers it measures.

Each of ``concurrency`` workers holds one keep-alive connection and sends requests back to
back (closed loop). The run stops when ``max_requests`` have been sent OR ``max_seconds``
have passed, whichever comes first. Per request it records the latency (request written →
body complete) and, for ``stream: true``, the time to first token (TTFT: request written →
first SSE event carrying non-empty ``delta.content``), plus the HTTP status and the time it
completed.

Prompts: by default the workers cycle through ``bodies`` (serialised once). With
``new_prompts=True`` every request's last message gets a unique suffix (a per-run tag plus the
request's index, fixed width, so each body is ``head + nonce + tail`` from pre-serialised parts and
costs the load generator no JSON encoding): the target has never seen the prompt, so any cache keyed
by its text misses. ``check_streams=True`` counts a 200 as an error (``incomplete``) unless the
response has a non-null ``finish_reason`` and, for streams, ends with ``data: [DONE]``.

Library use::

    result = asyncio.run(run_load("http://127.0.0.1:8000/v1/chat/completions", bodies,
                                  concurrency=16, max_requests=2000, max_seconds=20))
    print(result.summary())

CLI: ``python -m benchmarks.loadgen --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

_CONTENT_MARK = b'"content":"'
_EMPTY_CONTENT = b'"content":""'
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')  # a non-null finish reason (a final chunk)
_DONE = b"data: [DONE]"
#: Stands in for the per-request nonce in a pre-serialised body: as wide as the nonce
#: ``<8 hex digits of run tag>-<8 hex digits of request index>``.
NONCE_MARK = "@@uniroute-nonce@"


@dataclass
class Sample:
    status: int  # HTTP status; 0 = connection error
    latency_s: float
    ttft_s: float | None  # streams only
    error: str | None = None
    end_s: float = 0.0  # time.perf_counter() when it completed
    retry_after: float | None = None  # the response's Retry-After, seconds (a 503 overloaded, a 429)


@dataclass
class LoadResult:
    url: str
    stream: bool
    concurrency: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if 200 <= s.status < 300 and s.error is None]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    def percentiles(self, what: str = "latency", qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
        """Percentiles in milliseconds of ``latency`` or ``ttft`` over successful requests."""
        values = [s.latency_s if what == "latency" else s.ttft_s for s in self.ok]
        arr = np.asarray([v for v in values if v is not None], dtype=np.float64) * 1000.0
        if arr.size == 0:
            return {f"p{q:g}": float("nan") for q in qs} | {"mean": float("nan"), "max": float("nan")}
        out = {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}
        out["mean"] = float(arr.mean())
        out["max"] = float(arr.max())
        return out

    @property
    def shed(self) -> int:
        """Responses refused as overloaded: 503 with ``Retry-After`` (the gateway's ``server.max_in_flight``)."""
        return sum(1 for s in self.samples if s.status == 503 and s.retry_after is not None and s.error is None)

    def summary(self) -> dict[str, Any]:
        status: dict[str, int] = {}
        for s in self.samples:
            key = str(s.status) if s.error is None else f"{s.status}:{s.error}"
            status[key] = status.get(key, 0) + 1
        out: dict[str, Any] = {
            "url": self.url,
            "stream": self.stream,
            "concurrency": self.concurrency,
            "requests": len(self.samples),
            "ok": len(self.ok),
            "errors": self.errors,
            "shed_503_retry_after": self.shed,
            "status": status,
            "wall_s": round(self.wall_s, 3),
            "throughput_rps": round(len(self.ok) / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "latency_ms": {k: round(v, 3) for k, v in self.percentiles("latency").items()},
        }
        if self.stream:
            out["ttft_ms"] = {k: round(v, 3) for k, v in self.percentiles("ttft").items()}
        return out


class HttpError(Exception):
    pass


class Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(self, raw: bytes, stream: bool, check: bool = False) -> Sample:
        if self.writer is None or self.reader is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        reader = self.reader
        t0 = time.perf_counter()
        self.writer.write(raw)
        status_line = await reader.readline()
        if not status_line:
            raise HttpError("connection closed before the response")
        parts = status_line.split(None, 2)
        if len(parts) < 2:
            raise HttpError(f"bad status line {status_line[:60]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = False
        keep_alive = True
        retry_after: float | None = None
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                length = int(value.strip())
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif lname == b"connection" and b"close" in value.lower():
                keep_alive = False
            elif lname == b"retry-after":
                try:
                    retry_after = float(value.strip())
                except ValueError:
                    retry_after = 1.0
        ttft: float | None = None
        watch = stream and status == 200
        check = check and status == 200
        finished = False
        end = b""
        if chunked:
            tail = b""
            while True:
                size_line = await reader.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers, then the blank line
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = await reader.readexactly(size + 2)
                if check:
                    window = end + data
                    finished = finished or _FINISHED.search(window) is not None
                    end = window[-64:]
                if watch and ttft is None:
                    window = tail + data
                    pos = window.find(_CONTENT_MARK)
                    while pos != -1:
                        if not window.startswith(_EMPTY_CONTENT, pos):
                            ttft = time.perf_counter() - t0
                            break
                        pos = window.find(_CONTENT_MARK, pos + 1)
                    tail = window[-16:]
        else:
            if length is not None:
                data = await reader.readexactly(length)
            else:
                data = await reader.read()
                keep_alive = False
            if watch and ttft is None and _CONTENT_MARK in data:
                ttft = time.perf_counter() - t0
            if check:
                finished, end = _FINISHED.search(data) is not None, data[-64:]
        latency = time.perf_counter() - t0
        if not keep_alive:
            await self.close()
        error = None
        if check and not (finished and (not stream or end.rstrip().endswith(_DONE))):
            error = "incomplete"
        return Sample(status=status, latency_s=latency, ttft_s=ttft if stream else None, error=error,
                      retry_after=retry_after)


def build_request(host: str, port: int, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}", "Connection: keep-alive"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


async def run_load(
    url: str,
    bodies: Sequence[dict[str, Any]],
    *,
    concurrency: int = 1,
    max_requests: int = 1000,
    max_seconds: float = 30.0,
    headers: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    new_prompts: bool = False,
    check_streams: bool = False,
    honor_retry_after: bool = False,
    nonce_tag: str | None = None,
) -> LoadResult:
    """Closed-loop load: ``concurrency`` workers cycle through ``bodies`` until a bound is hit.

    Each body may stream or not (a mix is fine). ``new_prompts``: a unique suffix on every request's
    prompt (see the module doc); ``check_streams``: incomplete 200 responses count as errors;
    ``honor_retry_after``: a worker answered 429/503 with ``Retry-After`` waits that long (at most until the
    run ends) before its next request, as the OpenAI SDK does, instead of retrying at once; ``nonce_tag``: the
    new prompts' run tag (8 characters; default random), so that two runs can send identical requests.
    """
    if not bodies:
        raise ValueError("need at least one request body")
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    streams = [bool(b.get("stream")) for b in bodies]
    raws = [build_request(host, port, path, with_nonce_mark(b) if new_prompts else b, headers) for b in bodies]
    request_at = new_prompt_requests(raws, nonce_tag) if new_prompts else rotation(raws)
    result = LoadResult(url=url, stream=any(streams), concurrency=concurrency, wall_s=0.0)
    issued = 0
    deadline = time.perf_counter() + max_seconds

    async def worker() -> None:
        nonlocal issued
        conn = Connection(host, port)
        try:
            while issued < max_requests and time.perf_counter() < deadline:
                raw, stream = request_at(issued), streams[issued % len(streams)]
                issued += 1
                t0 = time.perf_counter()
                try:
                    sample = await asyncio.wait_for(conn.request(raw, stream, check_streams), timeout_s)
                except (OSError, HttpError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                    sample = Sample(0, time.perf_counter() - t0, None, error=type(exc).__name__)
                    await conn.close()
                sample.end_s = time.perf_counter()
                result.samples.append(sample)
                if honor_retry_after and sample.retry_after is not None and sample.status in (429, 503):
                    await asyncio.sleep(max(0.0, min(sample.retry_after, deadline - time.perf_counter())))
        finally:
            await conn.close()

    t_start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.wall_s = time.perf_counter() - t_start
    return result


RequestAt = Callable[[int], bytes]  # request index -> the raw HTTP request to send


def rotation(raws: Sequence[bytes]) -> RequestAt:
    """Request ``i`` is ``raws[i % len(raws)]`` (the default: prompts repeat)."""
    n = len(raws)
    return lambda i: raws[i % n]


def with_nonce_mark(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with :data:`NONCE_MARK` appended to its last message's text (a copy; the input is untouched)."""
    messages = list(body.get("messages") or [])
    if not messages or not isinstance(messages[-1].get("content"), str):
        raise ValueError("new prompts need a last message with string content")
    last = dict(messages[-1])
    last["content"] = f"{last['content']}\n\n(request {NONCE_MARK})"
    return {**body, "messages": [*messages[:-1], last]}


def new_prompt_requests(raws: Sequence[bytes], tag: str | None = None) -> RequestAt:
    """Request ``i``: ``raws[i % n]`` with its :data:`NONCE_MARK` replaced by ``<tag>-<i as 8 hex digits>``.

    The nonce has the mark's width, so Content-Length stays right; ``tag`` (default: random per
    call) keeps prompts of different runs apart. Unique for the first 2**32 requests of a run.
    """
    tag = secrets.token_hex(4) if tag is None else tag
    if len(tag) != 8:
        raise ValueError(f"the run tag must be 8 characters, got {tag!r}")
    prefix = tag.encode() + b"-"
    halves: list[tuple[bytes, bytes]] = []
    for raw in raws:
        head, mark, tail = raw.rpartition(NONCE_MARK.encode())
        if not mark:
            raise ValueError("request without a nonce mark (build it from with_nonce_mark(body))")
        halves.append((head + prefix, tail))
    n = len(halves)

    def request_at(i: int) -> bytes:
        head, tail = halves[i % n]
        return head + b"%08x" % (i & 0xFFFFFFFF) + tail

    return request_at


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def prompt_bodies(prompts: Sequence[str], model: str, *, stream: bool, include_usage: bool = True,
                  extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in prompts:
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": p}]}
        if stream:
            body["stream"] = True
            if include_usage:
                body["stream_options"] = {"include_usage": True}
        out.append(body | (extra or {}))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000/v1/chat/completions")
    ap.add_argument("--model", default="auto")
    ap.add_argument("--dataset", default=None, help="routing benchmark folder to take prompts from")
    ap.add_argument("--prompts", type=int, default=500, help="how many distinct prompts to cycle through")
    ap.add_argument("--concurrency", "-c", type=int, default=1)
    ap.add_argument("--requests", "-n", type=int, default=1000)
    ap.add_argument("--seconds", "-t", type=float, default=30.0)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--new-prompts", action="store_true", help="a unique suffix on every prompt (no cache hits)")
    ap.add_argument("--check", action="store_true",
                    help="count responses without a final chunk (and streams without [DONE]) as errors")
    ap.add_argument("--header", action="append", default=[], metavar="NAME: VALUE")
    ap.add_argument("--json", default=None, help="write the summary here")
    args = ap.parse_args(argv)
    if args.dataset:
        sys.path.insert(0, ".")
        from routing.dataset import load_dataset

        prompts = load_dataset(args.dataset, with_responses=False).prompts[: args.prompts]
    else:
        prompts = [f"Say hello #{i}." for i in range(args.prompts)]
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    install_uvloop()
    result = asyncio.run(run_load(args.url, prompt_bodies(prompts, args.model, stream=args.stream),
                                  concurrency=args.concurrency, max_requests=args.requests,
                                  max_seconds=args.seconds, headers=headers, new_prompts=args.new_prompts,
                                  check_streams=args.check))
    summary = result.summary()
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
    return 0 if result.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
