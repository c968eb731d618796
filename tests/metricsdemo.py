"""A tiny ASGI app exposing gateway.metrics, for the multiprocess and Prometheus tests.

``POST /hit?model=M&status=S`` records one finished request through
``Metrics.observe_request`` and answers with the worker's pid; ``GET /metrics`` serves
``metrics_app``. Run it with ``uvicorn --app-dir tests --factory metricsdemo:create_app``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from gateway.metrics import Metrics, metrics_app
from gateway.serving.interfaces import RequestRecord

App = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def create_app() -> App:
    metrics = Metrics()
    metrics.set_registry(["small", "large"])
    serve_metrics = metrics_app(metrics)
    counter = [0]

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    metrics.shutdown()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/metrics":
            await serve_metrics(scope, receive, send)
            return
        q = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        counter[0] += 1
        now = datetime.now(UTC)
        metrics.observe_request(RequestRecord(
            request_id=f"{os.getpid()}-{counter[0]}", started_at=now, finished_at=now, stream=False,
            requested_model="auto", routed_model=q.get("model", "small"), key_name="demo",
            status_code=int(q.get("status", "200")), prompt_tokens=10, completion_tokens=5, cost_usd=0.002,
            latency_ms=120.0, upstream_latency_ms=100.0, cluster=1,
        ))
        body = str(os.getpid()).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": body})

    return app
