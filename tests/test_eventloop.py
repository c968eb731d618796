"""The gateway's event loop (gateway/http/eventloop.py): uvloop whose TCP servers accept in batches.

A burst of new connections to a busy loop is accepted within a few loop iterations, not one connection per
iteration as uvloop's own server does (libuv pull request 3696); the server serves uvicorn as uvloop's does,
stops accepting when closed, and pauses accepting for a second when the process is out of file descriptors.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop

from gateway.http import eventloop
from tests.procs import connect_without_waiting, free_port

BURST = 100
BUSY_ITERATIONS = 20  # far fewer than BURST: one accept per iteration cannot take the burst in time


def _counting(made: list[asyncio.BaseTransport]) -> Callable[[], asyncio.Protocol]:
    """A protocol factory whose connections are appended to ``made``."""

    class Counting(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(transport)

    return Counting


def _close(clients: list[socket.socket], made: list[asyncio.BaseTransport], server: asyncio.AbstractServer) -> None:
    for client in clients:
        client.close()
    for transport in made:
        transport.close()
    server.close()


def _burst_accepted(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> int:
    """Connections a server on a loop from ``loop_factory`` has set up after a burst of :data:`BURST` clients
    connected while it was busy, once the loop ran :data:`BUSY_ITERATIONS` iterations of 5 ms each."""

    async def main() -> int:
        made: list[asyncio.BaseTransport] = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_counting(made), "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        clients = connect_without_waiting(port, BURST)  # they wait in the accept queue, handshakes done
        time.sleep(0.2)
        for _ in range(BUSY_ITERATIONS):  # a busy loop: each iteration takes 5 ms of callbacks
            time.sleep(0.005)
            await asyncio.sleep(0)
        got = len(made)
        _close(clients, made, server)
        await server.wait_closed()
        return got

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def test_a_burst_of_connections_to_a_busy_loop_is_accepted_in_a_few_iterations() -> None:
    assert _burst_accepted(eventloop.new_event_loop) == BURST
    # what it fixes: uvloop's own server accepts one connection per iteration
    assert _burst_accepted(uvloop.new_event_loop) < BURST // 2


def test_uvicorn_serves_on_it_and_stops_accepting_when_closed() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="gateway.http.eventloop:new_event_loop",
                            lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    seen: dict[str, Any] = {}

    async def main() -> None:
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        seen["loop"] = type(asyncio.get_running_loop())
        seen["servers"] = [type(s) for s in server.servers]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            answers = await asyncio.gather(*(client.get("/") for _ in range(50)))
        seen["answers"] = [(r.status_code, r.text) for r in answers]
        server.should_exit = True
        await serving

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())
    assert seen["loop"] is eventloop.BatchAcceptLoop
    assert seen["servers"] == [eventloop.BatchAcceptServer]
    assert seen["answers"] == [(200, "ok")] * 50
    with pytest.raises(ConnectionRefusedError):  # closed: the port no longer listens
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


class _OutOfDescriptors:
    """A listening socket whose accept() fails as a process out of file descriptors does."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.calls = 0

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        raise OSError(errno.EMFILE, "Too many open files")

    def fileno(self) -> int:
        return self.sock.fileno()


def test_out_of_file_descriptors_pauses_accepting_then_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventloop, "PAUSE_S", 0.2)
    fake = _OutOfDescriptors()

    async def main() -> tuple[int, bool, bool]:
        loop = asyncio.get_running_loop()
        server = eventloop.BatchAcceptServer(loop, [], asyncio.Protocol, backlog=8)
        server._sockets = [fake]  # type: ignore[list-item]
        server._serving = True
        readers: list[int] = []
        monkeypatch.setattr(loop, "add_reader", lambda fd, *a: readers.append(fd))
        monkeypatch.setattr(loop, "remove_reader", readers.remove)
        readers.append(fake.fileno())
        server._accept(fake)  # type: ignore[arg-type]
        paused = fake.fileno() not in readers
        await asyncio.sleep(0.4)
        return fake.calls, paused, fake.fileno() in readers

    try:
        with asyncio.Runner(loop_factory=eventloop.new_event_loop) as runner:
            calls, paused, resumed = runner.run(main())
    finally:
        fake.sock.close()
    assert calls == 1 and paused and resumed


@pytest.mark.parametrize(("shares", "expected"), [(1, 16), (2, 4), (4, 2)])
def test_a_socket_shared_by_workers_is_taken_in_bites(shares: int, expected: int) -> None:
    """With ``shares`` worker processes on one socket, a readiness takes at most queue / (2 × shares) of the
    16 waiting connections (the first worker to wake would otherwise take the whole burst); alone, all."""

    async def main() -> tuple[int | None, int]:
        made: list[asyncio.BaseTransport] = []
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        listener.setblocking(False)  # as start_serving sets it (not called: readiness is simulated below)
        server = eventloop.BatchAcceptServer(loop, [listener], _counting(made), backlog=64, shares=shares)
        clients = connect_without_waiting(listener.getsockname()[1], 16)
        time.sleep(0.2)
        queued = eventloop.accept_queue_length(listener)
        server._accept(listener)  # one readiness of the listening socket
        for _ in range(5):
            await asyncio.sleep(0)  # the accepted connections are handed to uvloop
        got = len(made)
        _close(clients, made, server)
        return queued, got

    with asyncio.Runner(loop_factory=eventloop.new_event_loop) as runner:
        queued, got = runner.run(main())
    assert queued == 16
    assert got == expected
