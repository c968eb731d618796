"""Upstream responses bounded in bytes: the HTTP clients under LiteLLM's OpenAI-wire calls.

The OpenAI SDK reads a non-streaming answer whole into memory before parsing it, and its SSE decoder
buffers an event until its blank line; neither has a size limit, so a provider (or anything that
answers at its ``api_base``) could make the gateway hold any amount (a 300 MB answer took ~900 MB and
stalled the event loop for seconds). :func:`bounded_client` builds the SDK's own HTTP client
(``openai.DefaultAioHttpClient`` or ``DefaultAsyncHttpxClient``) with every transport wrapped in
:class:`BoundedTransport`, which passes the response on as it arrives and raises
:class:`ResponseTooLargeError` once

- a response that is not a stream is larger than ``max_response_bytes`` (at once when its
  ``content-length`` says so, else when the bytes read cross it), or
- one event of a ``text/event-stream`` is (a stream as a whole may be longer: the gateway relays it
  event by event and keeps counts, never the text).

Sizes are of the decoded body. Only ``gzip`` and ``deflate`` are asked for (``accept-encoding``) and
decoded here with a bound on each step's output (a compression bomb cannot expand past the limit); a
response in any other encoding fails (:class:`UpstreamBodyError`). The chat path maps both to a 502
naming the limit (``gateway/serving/forwarding.py:map_exception``); the connection is dropped, not
drained.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx2

ACCEPT_ENCODING = "gzip, deflate"
_STEP = 64 * 1024  # most decoded bytes produced per decompression call
_EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n")


class UpstreamBodyError(Exception):
    """An upstream response the gateway refuses to read (too large, or in an encoding it did not ask for)."""


class ResponseTooLargeError(UpstreamBodyError):
    def __init__(self, limit: int, stream: bool) -> None:
        what = "one event of its stream is" if stream else "its answer is"
        super().__init__(f"{what} larger than {limit} bytes (forwarding.max_response_bytes)")
        self.limit = limit


class _Decoder:
    """gzip / deflate decoding whose every step yields at most :data:`_STEP` bytes."""

    def __init__(self, encoding: str) -> None:
        self.raw_fallback = encoding == "deflate"  # "deflate" is zlib-wrapped, or (wrongly but commonly) raw
        self.d = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
        self.started = False

    def decode(self, data: bytes) -> Iterator[bytes]:
        while data:
            try:
                out = self.d.decompress(data, _STEP)
            except zlib.error:
                if self.raw_fallback and not self.started:
                    self.raw_fallback = False
                    self.d = zlib.decompressobj(-zlib.MAX_WBITS)
                    continue
                raise UpstreamBodyError("its compressed answer is corrupt") from None
            self.started = True
            if out:
                yield out
            elif self.d.unconsumed_tail == data:
                break  # no progress (cannot happen with zlib; never loop on it)
            data = self.d.unconsumed_tail

    def flush(self) -> bytes:
        return self.d.flush()


class _BoundedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, limit: int, sse: bool, encoding: str | None) -> None:
        self.inner, self.limit, self.sse = inner, limit, sse
        self.decoder = _Decoder(encoding) if encoding else None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        size = 0  # bytes of the answer (of the current event, for a stream)
        tail = b""
        async for data in self._decoded():
            if self.sse:
                buf = tail + data
                end = -1
                for sep in _EVENT_ENDS:
                    i = buf.rfind(sep)
                    if i >= 0:
                        end = max(end, i + len(sep))
                size = len(buf) - end if end >= 0 else size + len(data)
                tail = buf[-3:]
            else:
                size += len(data)
            if size > self.limit:
                raise ResponseTooLargeError(self.limit, self.sse)
            yield data

    async def _decoded(self) -> AsyncIterator[bytes]:
        decoder = self.decoder
        async for chunk in self.inner:
            if decoder is None:
                yield chunk
                continue
            for data in decoder.decode(chunk):
                yield data
        if decoder is not None:
            rest = decoder.flush()
            if rest:
                yield rest

    async def aclose(self) -> None:
        await self.inner.aclose()


class BoundedTransport(httpx2.AsyncBaseTransport):
    """Wraps a transport: the responses it returns are read under ``max_response_bytes`` (module doc)."""

    def __init__(self, inner: httpx2.AsyncBaseTransport, max_response_bytes: int) -> None:
        self.inner = inner
        self.max_response_bytes = max_response_bytes

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        request.headers["accept-encoding"] = ACCEPT_ENCODING
        response = await self.inner.handle_async_request(request)
        headers = response.headers
        encoding = headers.get("content-encoding", "").strip().lower() or None
        if encoding == "identity":
            encoding = None
        sse = headers.get("content-type", "").lower().startswith("text/event-stream")
        try:
            if encoding not in (None, "gzip", "deflate"):
                raise UpstreamBodyError(f"it answered in content-encoding {encoding!r}, which the gateway did "
                                        f"not ask for (accept-encoding: {ACCEPT_ENCODING})")
            length = headers.get("content-length", "")
            if not sse and encoding is None and length.isdigit() and int(length) > self.max_response_bytes:
                raise ResponseTooLargeError(self.max_response_bytes, stream=False)
        except UpstreamBodyError:
            await response.aclose()
            raise
        if encoding is not None:  # decoded here, with a bound: httpx must not decode it again
            del headers["content-encoding"]
            headers.pop("content-length", None)
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        response.stream = _BoundedStream(response.stream, self.max_response_bytes, sse, encoding)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@functools.cache
def _bounded_class(base: type[httpx2.AsyncClient]) -> Callable[..., httpx2.AsyncClient]:
    class Bounded(base):  # type: ignore[valid-type, misc]
        def __init__(self, *, max_response_bytes: int, **kwargs: Any) -> None:
            self._max_response_bytes = max_response_bytes  # before super(): it builds the transports
            super().__init__(**kwargs)

        def _init_transport(self, *args: Any, **kwargs: Any) -> httpx2.AsyncBaseTransport:
            return BoundedTransport(super()._init_transport(*args, **kwargs), self._max_response_bytes)

        def _init_proxy_transport(self, *args: Any, **kwargs: Any) -> httpx2.AsyncBaseTransport:
            return BoundedTransport(super()._init_proxy_transport(*args, **kwargs), self._max_response_bytes)

    Bounded.__name__ = Bounded.__qualname__ = f"Bounded{base.__name__}"
    return Bounded


def bounded_client(kind: str, max_response_bytes: int) -> httpx2.AsyncClient:
    """The OpenAI SDK's HTTP client (``kind``: ``aiohttp`` or ``httpx``) with its responses bounded."""
    import openai

    base = openai.DefaultAioHttpClient if kind == "aiohttp" else openai.DefaultAsyncHttpxClient
    return _bounded_class(base)(max_response_bytes=max_response_bytes)
