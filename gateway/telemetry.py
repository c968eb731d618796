"""OpenTelemetry traces (optional: ``telemetry.otlp_endpoint``; off by default).

One span per request (``uniroute.request``: from the service's record to its log row, streams included),
with child spans for routing (``uniroute.route``, and under it ``uniroute.embed`` and ``uniroute.rank``) and
one per upstream attempt (``{operation} {model}``, kind CLIENT). Attributes follow the OpenTelemetry GenAI
semantic conventions (``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``, ``error.type``) plus the UniRoute facts
(``uniroute.lambda``, ``uniroute.cluster``, ``uniroute.candidates``, ``uniroute.cost_usd``, ...). Spans are
exported in batches over OTLP/HTTP (protobuf) by ``opentelemetry-sdk`` with its own tracer provider (the
process-wide one is left alone), flushed when the gateway stops.

:data:`NO_TRACING` is the default everywhere: its methods do nothing, so the request path pays nothing
when tracing is off. Layer-free: this module imports no other gateway module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.serving.interfaces import RequestRecord

#: The GenAI operation name of each endpoint (gen_ai.operation.name)
OPERATIONS = {"chat": "chat", "responses": "chat", "messages": "chat", "embeddings": "embeddings"}


def _attrs(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OpenTelemetry takes str, bool, int, float and lists of one of them; None is left out."""
    return {k: v for k, v in attributes.items() if v is not None}


class Tracing:
    """Spans of the request path, exported through ``tracer`` (``opentelemetry.trace.Tracer``); see the module."""

    enabled = True

    def __init__(self, tracer: Any, provider: Any = None) -> None:
        self.tracer = tracer
        self.provider = provider

    def request(self, endpoint: str, requested_model: str, request_id: str, stream: bool) -> Any:
        """Start a request's span (ended by :meth:`end_request`)."""
        from opentelemetry.trace import SpanKind

        return self.tracer.start_span(f"uniroute.request {endpoint}", kind=SpanKind.SERVER, attributes=_attrs({
            "gen_ai.operation.name": OPERATIONS.get(endpoint, endpoint), "gen_ai.request.model": requested_model,
            "uniroute.endpoint": endpoint, "uniroute.request_id": request_id, "uniroute.stream": stream}))

    @contextlib.contextmanager
    def current(self, span: Any) -> Iterator[None]:
        """Make ``span`` the parent of the spans started inside (routing, upstream attempts)."""
        if span is None:
            yield
            return
        from opentelemetry.trace import use_span

        with use_span(span, end_on_exit=False):
            yield

    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, Any] | None = None, client: bool = False) -> Iterator[Any]:
        """A child span of the current one; an exception escaping it marks it failed (``error.type``)."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        with self.tracer.start_as_current_span(name, kind=kind, attributes=_attrs(attributes or {}),
                                               record_exception=False, set_status_on_exception=False) as span:
            try:
                yield span
            except BaseException as exc:
                span.set_attribute("error.type", str(getattr(exc, "error_type", None) or type(exc).__name__))
                span.set_status(Status(StatusCode.ERROR))
                raise

    def end_request(self, span: Any, record: RequestRecord) -> None:
        """Put the finished request's facts on its span and end it."""
        if span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        span.set_attributes(_attrs({
            "gen_ai.response.model": record.routed_model, "gen_ai.usage.input_tokens": record.prompt_tokens,
            "gen_ai.usage.output_tokens": record.completion_tokens, "uniroute.lambda": record.lam,
            "uniroute.cluster": record.cluster, "uniroute.cost_usd": record.cost_usd,
            "uniroute.candidates": [str(c.get("model")) for c in record.candidates] or None,
            "uniroute.attempts": len(record.attempts), "uniroute.key_name": record.key_name,
            "http.response.status_code": record.status_code}))
        if record.status_code >= 400:
            span.set_attribute("error.type", record.error_type or str(record.status_code))
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def shutdown(self) -> None:
        """Export what is pending and stop."""
        if self.provider is not None:
            self.provider.shutdown()


class _NoTracing(Tracing):
    """Tracing off: every method does nothing."""

    enabled = False

    def __init__(self) -> None:
        super().__init__(None)

    def request(self, endpoint: str, requested_model: str, request_id: str, stream: bool) -> Any:
        return None

    @contextlib.contextmanager
    def span(self, name: str, attributes: Mapping[str, Any] | None = None, client: bool = False) -> Iterator[Any]:
        yield None

    def end_request(self, span: Any, record: RequestRecord) -> None:
        return None


NO_TRACING: Tracing = _NoTracing()


def otlp_tracing(endpoint: str, service_name: str = "uniroute-gateway", schedule_delay_ms: int = 1000) -> Tracing:
    """Tracing exported over OTLP/HTTP to ``endpoint`` (e.g. ``http://collector:4318/v1/traces``)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    import gateway

    provider = TracerProvider(resource=Resource.create({"service.name": service_name,
                                                        "service.version": gateway.__version__}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint),
                                                   schedule_delay_millis=schedule_delay_ms))
    return Tracing(provider.get_tracer("uniroute.gateway", gateway.__version__), provider)
