"""uvicorn HTTP protocols that bound how long (and how much) a client may take to send a request.

uvicorn has no timeout for receiving a request: ``timeout_keep_alive`` only covers the idle time
between two requests and is reset by every byte, so a client that trickles its headers (slowloris)
holds a connection forever; with httptools the size of the headers is not bounded either. These
subclasses of uvicorn's two HTTP/1.1 protocols add, per connection:

- **header deadline** ``server.header_timeout_s``: from the connection's opening (or from the first
  byte of a later request on a kept-alive connection) to the end of the headers. Missed: ``408`` and
  the connection is closed (closed silently when nothing was sent at all).
- **body deadline** ``server.body_timeout_s`` (+1 s, so that the ASGI middleware, which enforces the
  same bound while the handler reads, answers its 408 first): from the end of the headers to the end
  of the body. It also bounds a body the gateway answered early (a 401 from the headers alone) and
  that uvicorn is reading only to discard it.
- **header size** ``server.max_header_bytes`` (httptools; h11 gets ``h11_max_incomplete_event_size``):
  request line plus headers beyond it get ``431`` and the connection is closed.

``uniroute serve`` runs them (``gateway/cli/serve.py`` names them by their import string, as uvicorn's
``--http`` option accepts). The settings reach each worker through the ASGI lifespan state (key
:data:`STATE_KEY`, set by ``gateway/app.py``), so every worker process uses its own config.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("uniroute.http")

#: key of the lifespan state that carries :class:`ClientLimits` to the protocols
STATE_KEY = "uniroute.client_limits"
_BODY_GRACE_S = 1.0


@dataclass(frozen=True)
class ClientLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024


def _response(status: int, reason: str, message: str) -> bytes:
    body = message.encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class _Deadlines:
    """The timer logic shared by both protocols: one timer per connection, for the phase it is in."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    app_state: dict[str, Any]
    client: tuple[str, int] | None

    _timer: asyncio.TimerHandle | None = None
    _phase: str | None = None  # "headers" | "body" | None (nothing to wait for)
    _sent_bytes: bool = False  # the client sent bytes of the request whose headers we wait for
    _refusal: bytes | None = None  # a response to send instead of uvicorn's generic 400

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]  # the uvicorn protocol after this mixin
        self._sent_bytes = False
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    @property
    def _limits(self) -> ClientLimits:
        limits = self.app_state.get(STATE_KEY)
        return limits if isinstance(limits, ClientLimits) else ClientLimits()

    def _arm(self, phase: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
        limits = self._limits
        delay = limits.header_timeout_s if phase == "headers" else limits.body_timeout_s + _BODY_GRACE_S
        self._phase = phase
        self._timer = self.loop.call_later(delay, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def _expired(self) -> None:
        phase, self._timer, self._phase = self._phase, None, None
        if self.transport.is_closing():
            return
        limits = self._limits
        who = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        if phase == "headers":
            if self._sent_bytes:
                logger.info("%s did not send its request headers within %g s (server.header_timeout_s): closed",
                            who, limits.header_timeout_s)
                self.transport.write(_response(408, "Request Timeout", "request headers not received within "
                                               f"{limits.header_timeout_s:g} s (server.header_timeout_s)"))
        else:
            logger.info("%s did not send its request body within %g s (server.body_timeout_s): closed",
                        who, limits.body_timeout_s)
        self.transport.close()

    def _too_large_headers(self) -> None:
        limit = self._limits.max_header_bytes
        self._refusal = _response(431, "Request Header Fields Too Large",
                                  f"request line and headers exceed {limit} bytes (server.max_header_bytes)")


class BoundedHttpToolsProtocol(_Deadlines, HttpToolsProtocol):
    """uvicorn's httptools protocol with the header/body deadlines and the header size bound."""

    _header_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self._phase == "headers" or self._phase is None:
            self._sent_bytes = True
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._phase != "headers":
            self._arm("headers")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self._limits.max_header_bytes:
            self._too_large_headers()
            raise ValueError("request headers too large")  # httptools stops; uvicorn calls send_400_response

    def on_headers_complete(self) -> None:
        self._arm("body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._sent_bytes = False
        if self.cycle is not None and self.cycle.response_complete:
            self._arm("headers")  # answered early and the discarded body is done: bound the idle time
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._phase is None and not self.transport.is_closing():
            self._arm("headers")  # idle until the next request (uvicorn's keep-alive timer usually ends it first)

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
            return
        self._disarm()
        self.transport.write(self._refusal)
        self.transport.close()


class BoundedH11Protocol(_Deadlines, H11Protocol):
    """uvicorn's h11 protocol with the header/body deadlines (h11 bounds the header size itself)."""

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._sent_bytes = True
            if self._phase != "headers":
                self._arm("headers")
        super().data_received(data)
        self._sync()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._sync()

    def _sync(self) -> None:
        """Match the timer to what h11 now waits for from the client."""
        if self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body")
        elif state is h11.IDLE:
            if self._phase != "headers":
                self._sent_bytes = False
                self._arm("headers")
        elif self._phase is not None:  # DONE, MUST_CLOSE, ...: the request is in; the response is ours to send
            self._disarm()
