"""``GET /health/liveliness`` on a port of its own, answered by a thread: a liveness probe that a busy
event loop does not delay.

On the main port the probe is an HTTP request like any other: it waits for the event loop's next
iteration, and a worker with ``server.max_in_flight`` requests in flight runs many requests' callbacks
per iteration (at concurrency 256 on two cores its p99 was 0.4-0.6 s; docs/PERFORMANCE.md). An orchestrator
that kills a process whose liveness probe is slow would kill a gateway for being busy. Here a thread of
each worker answers on ``server.health_port``: it needs the GIL only (Python hands it over within its
switch interval, 5 ms) and says whether the event loop still turns: the loop stamps a heartbeat every
:data:`BEAT_S`, and a heartbeat older than ``server.health_stall_s`` (a loop blocked by a bug, a deadlock)
answers ``503 {"status": "stalled", ...}``, which is what a liveness probe is for. The answer names the
worker (``pid``) and how late its loop is (``loop_lag_s``).

With ``server.workers`` > 1 every worker binds the same port (``SO_REUSEPORT``): the kernel hands each
probe connection to one of them. At most :data:`MAX_CONNECTIONS` connections are served at once (more are
closed at once), and a connection that sends nothing for ``timeout_s`` is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

logger = logging.getLogger("uniroute.health")

PATH = "/health/liveliness"
#: the event loop's heartbeat period (seconds)
BEAT_S = 0.25
#: connections served at once; one more is closed without an answer
MAX_CONNECTIONS = 16


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], listener: LivenessListener) -> None:
        self.listener = listener
        self.allow_reuse_port = listener.reuse_port and hasattr(socket, "SO_REUSEPORT")
        if ":" in address[0]:  # an IPv6 host ("::", "::1")
            self.address_family = socket.AF_INET6
        self.slots = threading.BoundedSemaphore(listener.max_connections)
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # not HTTPServer's: its getfqdn() may wait on DNS
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed at once rather than queued
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as probes use it
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.listener.timeout_s)  # an idle or silent client is closed

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != PATH:
            self._send(404, {"error": {"message": f"not found: this port answers GET {PATH} only",
                                       "type": "invalid_request_error", "code": "not_found"}})
            return
        lag = self.server.listener.loop_lag_s()
        stalled = lag > self.server.listener.stall_s
        self._send(503 if stalled else 200,
                   {"status": "stalled" if stalled else "ok", "loop_lag_s": round(lag, 3), "pid": os.getpid()})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes are not logged (20 a second would drown the log)


class LivenessListener:
    """Serve :data:`PATH` on ``host:port`` from a thread while ``loop`` is watched (``reuse_port``: the workers
    of one server share the port).

    ``loop_lag_s()``: how long past its due time the loop's last heartbeat is (0 while it keeps time)."""

    def __init__(self, host: str, port: int, *, stall_s: float = 10.0, timeout_s: float = 5.0,
                 max_connections: int = MAX_CONNECTIONS, reuse_port: bool = False) -> None:
        self.host, self.port, self.reuse_port = host, port, reuse_port
        self.stall_s, self.timeout_s, self.max_connections = stall_s, timeout_s, max_connections
        self._beat = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def loop_lag_s(self) -> float:
        return max(0.0, time.monotonic() - self._beat - BEAT_S)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._beat = time.monotonic()
        self._handle = loop.call_later(BEAT_S, self._tick, loop)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]  # the port bound (port 0: a free one)
        self._tick(loop)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="uniroute-liveness", daemon=True)
        self._thread.start()
        logger.info("liveness probe on http://%s:%d%s (a thread; 503 when the event loop stalls %.0f s)",
                    self.host, self.port, PATH, self.stall_s)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = self._handle = None
