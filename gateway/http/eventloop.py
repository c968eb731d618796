"""The event loop ``uniroute serve`` runs: uvloop, with TCP servers that accept pending connections in batches.

libuv (under uvloop) accepts **one connection per loop iteration** since libuv pull request 3696 (2022;
the libuv of uvloop 0.23 behaves so, tests/test_eventloop.py): it calls ``accept()`` once when the
listening socket is readable and waits for the next iteration for the next one. An idle loop iterates in
microseconds, so nobody notices; a gateway at its CPU limit iterates every 10-20 ms (each iteration runs
every ready request's callbacks), so a burst of 200 new connections waits up to 200 iterations, 2-4 s,
in the kernel's accept queue with their first request already sent: the client sees a slow answer that
the gateway's own log (which starts at the request) never shows, and the overload limit
(``server.max_in_flight``) cannot answer those requests with a quick 503 because it never sees them.
Measured: ``benchmarks/vs_litellm_proxy.py`` at concurrency 256, admitted p99 3.7-3.9 s with uvloop's
accept, against a queue of 60-80 connections on the listening socket (docs/PERFORMANCE.md).

:class:`BatchAcceptLoop` is uvloop's loop with one change: :meth:`~BatchAcceptLoop.create_server` for TCP
without TLS listens itself and, each time the socket is readable, accepts up to :data:`ACCEPT_BATCH`
pending connections (what asyncio's own loop does, with its ``backlog`` as the batch) and hands each to
uvloop's ``connect_accepted_socket``, so the connections themselves are uvloop's as before. TLS and Unix
sockets keep uvloop's own server.

With ``server.workers`` > 1 the workers share one listening socket, and the first to wake would take a
whole burst: a client that opens 16 keep-alive connections at once got all 16 served by one worker while
the other idled (seen in the two-worker benchmark at concurrency 16). There each readiness takes at most
the queue's length / (2 × workers) (read with ``TCP_INFO``: a listening socket's ``tcpi_unacked`` is its
accept queue), at least one: idle workers take turns in small bites and share a burst; a long queue (every
worker busy) is still taken in batches.

``uniroute serve`` names :func:`new_event_loop` as uvicorn's loop (``loop="module:function"``, a loop
factory) when uvloop is installed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

import uvloop

from gateway.config import serve_overrides

logger = logging.getLogger("uniroute.http")

#: connections accepted per readiness of the listening socket
ACCEPT_BATCH = 32
#: accept() errors that mean "out of a resource": accepting pauses for :data:`PAUSE_S` (as asyncio does)
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PAUSE_S = 1.0


def accept_queue_length(sock: socket.socket) -> int | None:
    """Connections waiting in a listening TCP socket's accept queue (Linux ``TCP_INFO``; None elsewhere)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (AttributeError, OSError):
        return None
    return int(struct.unpack_from("=I", info, 24)[0]) if len(info) >= 28 else None  # tcpi_unacked


class BatchAcceptServer(asyncio.AbstractServer):
    """A listening TCP server on ``loop`` that accepts up to ``batch`` connections per readiness; ``shares``:
    how many processes accept from the same socket (then a readiness takes at most queue / (2 × shares))."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: Iterable[socket.socket],
                 protocol_factory: Callable[[], asyncio.BaseProtocol], backlog: int, batch: int = ACCEPT_BATCH,
                 shares: int = 1) -> None:
        self._loop = loop
        self._sockets = list(sockets)
        self._protocol_factory = protocol_factory
        self._backlog = backlog
        self._batch = batch
        self._shares = shares
        self._serving = False
        self._connecting: set[asyncio.Task[Any]] = set()

    # -- asyncio.AbstractServer
    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if self._serving:
            return
        self._serving = True
        for sock in self._sockets:
            sock.setblocking(False)
            sock.listen(self._backlog)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def serve_forever(self) -> None:
        await self.start_serving()
        await asyncio.Future()  # until cancelled

    def close(self) -> None:
        if not self._sockets:
            return
        self._serving = False
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    async def wait_closed(self) -> None:
        # the accepted connections are the server's user's (uvicorn closes them itself); only the ones
        # still being handed over are waited for
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)

    # -- accepting
    def _accept(self, sock: socket.socket) -> None:
        batch = self._batch
        if self._shares > 1 and (queued := accept_queue_length(sock)) is not None:
            batch = max(1, min(batch, queued // (2 * self._shares)))
        for _ in range(batch):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the queue
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                logger.error("accepting a connection failed (%s): accepting paused for %.0f s", exc, PAUSE_S)
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(PAUSE_S, self._resume, sock)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    def _resume(self, sock: socket.socket) -> None:
        if self._serving and sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol_factory, conn)
        except OSError as exc:  # the peer reset the connection before it was set up
            logger.debug("an accepted connection failed to open: %s", exc)
            conn.close()


class BatchAcceptLoop(uvloop.Loop):  # type: ignore[misc]  # uvloop.Loop is a Cython class
    """uvloop's loop whose plain TCP servers are :class:`BatchAcceptServer` (``shares``: worker processes
    accepting from a socket handed in with ``sock=``)."""

    def __init__(self, shares: int = 1) -> None:
        super().__init__()
        self.shares = shares

    async def create_server(  # type: ignore[override]  # an AbstractServer: all uvicorn uses of a server
            self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: Any = None, port: Any = None, *,
            sock: socket.socket | None = None, backlog: int = 100, ssl: Any = None,
            reuse_address: bool | None = None, reuse_port: bool | None = None, start_serving: bool = True,
            **kwargs: Any) -> asyncio.AbstractServer:
        plain_tcp = ssl is None and not kwargs and (sock is None or sock.family in (socket.AF_INET, socket.AF_INET6))
        if not plain_tcp or (sock is None and (host is None or port is None)):
            return await super().create_server(protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl,
                                               reuse_address=reuse_address, reuse_port=reuse_port,
                                               start_serving=start_serving, **kwargs)
        sockets = [sock] if sock is not None else await self._bind(host, port, reuse_port)
        # a socket handed in is uvicorn's, bound once and shared by its workers; one bound here is this loop's
        server = BatchAcceptServer(self, sockets, protocol_factory, backlog, shares=self.shares if sock else 1)
        if start_serving:
            await server.start_serving()
        return server

    async def _bind(self, host: str | list[str], port: int, reuse_port: bool | None) -> list[socket.socket]:
        """Listening sockets for every address of ``host``, as asyncio's ``create_server`` binds them."""
        hosts = [host] if isinstance(host, str) else list(host)
        infos = []
        for h in hosts:
            infos += await self.getaddrinfo(h or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM,
                                            flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, type_, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, type_, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return sockets


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvicorn's loop factory (``loop="gateway.http.eventloop:new_event_loop"``); the number of workers sharing
    the socket comes from ``uniroute serve`` (:func:`gateway.config.serve_overrides`)."""
    return BatchAcceptLoop(shares=max(1, int(serve_overrides().get("workers", 1))))
