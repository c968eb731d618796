"""Every Prometheus metric of the gateway, in one place (see docs/METRICS.md for the list).

Names follow LiteLLM's proxy where a counterpart exists (``litellm_spend_metric_total``,
``litellm_request_total_latency_metric``, ...), so LiteLLM dashboards keep working; the
rest are ``uniroute_*``. Units are base units (seconds, USD, tokens); counters end in
``_total`` on the wire (prometheus_client appends it).

Labels are bounded: model names are those of the registry (anything else is ``other``),
``api_key_alias`` is the key's NAME (operator-chosen; never the raw key or its hash),
status codes are HTTP codes, clusters are router cluster indices. Prompt text never
appears in a label.

Multiprocess mode: when ``PROMETHEUS_MULTIPROC_DIR`` is set before ``prometheus_client``
is imported (``uniroute serve --workers N`` and the ``uvicorn --workers`` recipe in the
docs do this), every worker writes its samples to files there and ``/metrics`` merges all
workers' files, so any worker answers for the whole server. Gauges declare how they
merge: in-flight requests are summed over live workers, budgets take the most recent
value written by any worker.

One :class:`Metrics` per process is built in the app's lifespan, on its own
:class:`~prometheus_client.CollectorRegistry` (tests build as many as they like).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from gateway.protocol_endpoints import ENDPOINTS

if TYPE_CHECKING:  # the request path depends on metrics, never the other way round
    from gateway.serving.interfaces import RequestRecord

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds. From a cache hit (5 ms) to a long generation (5 min).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                     float("inf"))
#: Seconds of gateway overhead (everything but the upstream call): finer at the low end.
OVERHEAD_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, float("inf"))

OTHER = "other"  # label value for a model name outside the registry
NONE = "none"  # label value when there is no model (refused before routing)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def _status_class(code: int) -> str:
    return f"{code // 100}xx" if 100 <= code < 600 else "other"


class Metrics:
    """The gateway's metrics. Call :meth:`observe_request` once per finished request."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self._known_models: frozenset[str] = frozenset()
        self._collect_hooks: list[Callable[[], None]] = []
        key = "api_key_alias"

        # -- traffic ----------------------------------------------------------------------------
        self.requests = Counter(
            "litellm_proxy_total_requests_metric",
            "Client requests by requested model, routed model, HTTP status, key name and endpoint",
            ["requested_model", "model", "status_code", "status_class", key, "endpoint"], registry=r)
        self.failed_requests = Counter(
            "litellm_proxy_failed_requests_metric",
            "Client requests that ended in an error, by error type",
            ["requested_model", "model", "exception_status", "exception_class", key, "endpoint"], registry=r)
        self.llm_requests = Counter(
            "litellm_requests_metric",
            "Successful requests answered by a backend model",
            ["model", "requested_model", key], registry=r)
        self.in_flight = Gauge(
            "litellm_in_flight_requests", "Requests being served right now (all workers)",
            registry=r, multiprocess_mode="livesum")
        self.requests_shed = Counter(
            "uniroute_requests_shed", "API requests refused with 503 overloaded because their worker was already "
            "serving server.max_in_flight requests", registry=r)

        # -- tokens and spend ----------------------------------------------------------------------
        labels = ["model", "requested_model", key]
        self.input_tokens = Counter("litellm_input_tokens_metric", "Prompt tokens", labels, registry=r)
        self.output_tokens = Counter("litellm_output_tokens_metric", "Completion tokens", labels, registry=r)
        self.total_tokens = Counter("litellm_total_tokens_metric", "Prompt + completion tokens", labels, registry=r)
        self.spend = Counter("litellm_spend_metric", "Spend in USD", labels, registry=r)

        # -- latency (seconds) --------------------------------------------------------------------
        self.total_latency = Histogram(
            "litellm_request_total_latency_metric", "Request latency as the client saw it, seconds",
            ["model", "requested_model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.upstream_latency = Histogram(
            "litellm_llm_api_latency_metric", "Latency of the successful upstream (LiteLLM) call, seconds",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.overhead_latency = Histogram(
            "litellm_overhead_latency_metric",
            "Gateway overhead (total latency minus upstream latency: auth, routing, budget, fallbacks), seconds",
            ["model"], buckets=OVERHEAD_BUCKETS_S, registry=r)
        self.ttft = Histogram(
            "litellm_llm_api_time_to_first_token_metric", "Time to first streamed token, seconds",
            ["model"], buckets=LATENCY_BUCKETS_S, registry=r)

        # -- routing ------------------------------------------------------------------------------
        self.routing_decisions = Counter(
            "uniroute_routing_decisions", "model=auto decisions: the router's first choice and the prompt's cluster",
            ["model", "cluster"], registry=r)
        self.prompt_embeddings = Counter(
            "uniroute_prompt_embeddings", "Prompt embeddings for model=auto by source: memory (the LRU), disk (the "
            "embedding cache) or computed (the embedder ran)", ["source"], registry=r)
        self.fallbacks = Counter(
            "uniroute_fallbacks", "Fallback hops from a failed model to the next candidate",
            ["from_model", "to_model"], registry=r)
        self.successful_fallbacks = Counter(
            "litellm_deployment_successful_fallbacks", "Requests answered by a fallback model",
            ["requested_model", "fallback_model", key], registry=r)
        self.failed_fallbacks = Counter(
            "litellm_deployment_failed_fallbacks", "Requests whose every fallback failed",
            ["requested_model", "fallback_model", key], registry=r)
        self.upstream_attempts = Counter(
            "uniroute_upstream_attempts", "Upstream calls made (each fallback hop is one), by model and outcome: "
            "success or the error type (timeout, rate_limit_exceeded, upstream_error, invalid_request_error)",
            ["model", "outcome"], registry=r)
        self.cooldowns_entered = Counter(
            "uniroute_cooldowns", "Times a model was put into cooldown after repeated failures (this worker)",
            ["model"], registry=r)
        self.models_in_cooldown = Gauge(
            "uniroute_models_in_cooldown", "Models in cooldown now (per worker; multiprocess: the max over workers)",
            registry=r, multiprocess_mode="livemax")
        self.registry_models = Gauge(
            "uniroute_registry_models", "Models in the live registry, by state (enabled, routable)",
            ["state"], registry=r, multiprocess_mode="mostrecent")

        # -- profile drift (the last re-profiling pass, read from the store by every replica) ------------------
        drift_labels = ["model", "cluster"]
        self.profile_drift = Gauge(
            "uniroute_profile_drift", "Realised error (1 − mean feedback score) minus the profile's Ψ, per model and "
            "cluster with at least profiling.drift_min_feedback feedback rows, from the last re-profiling pass",
            drift_labels, registry=r, multiprocess_mode="mostrecent")
        self.profile_drift_bound = Gauge(
            "uniroute_profile_drift_bound", "Hoeffding half-width of the realised error at profiling.drift_confidence: "
            "drift above it says the model does worse on the cluster than its profile",
            drift_labels, registry=r, multiprocess_mode="mostrecent")
        self.profile_drift_feedback = Gauge(
            "uniroute_profile_drift_feedback", "Feedback rows behind uniroute_profile_drift",
            drift_labels, registry=r, multiprocess_mode="mostrecent")

        # -- budgets and limits ------------------------------------------------------------------
        self.remaining_budget = Gauge(
            "litellm_remaining_api_key_budget_metric",
            "Budget left in the key's current period (limit minus settled spend), USD",
            [key], registry=r, multiprocess_mode="mostrecent")
        self.max_budget = Gauge(
            "litellm_api_key_max_budget_metric", "The key's budget per period, USD",
            [key], registry=r, multiprocess_mode="mostrecent")
        self.key_lambda = Gauge(
            "uniroute_key_lambda",
            "The λ a key with budget_policy 'pace' is served with now (docs/PACING.md)",
            [key], registry=r, multiprocess_mode="mostrecent")
        self.rate_limiter_errors = Counter(
            "uniroute_rate_limiter_errors", "Rate-limit checks that could not reach Redis", registry=r)

        # -- request log writer ----------------------------------------------------------------------
        self.request_log_written = Counter(
            "uniroute_request_log_written", "Request rows written to the database", registry=r)
        self.request_log_dropped = Counter(
            "uniroute_request_log_dropped", "Request rows dropped because the log buffer was full", registry=r)
        self.request_log_rejected = Counter(
            "uniroute_request_log_rejected", "Request rows the database refused as invalid (dropped, logged)",
            registry=r)
        self.request_log_errors = Counter(
            "uniroute_request_log_errors", "Failed batch writes of the request log (retried)", registry=r)
        self.request_log_buffer = Gauge(
            "uniroute_request_log_buffer_rows", "Request rows waiting to be written",
            registry=r, multiprocess_mode="livesum")
        self.request_journal_replayed = Counter(
            "uniroute_request_journal_replayed",
            "Request rows read back at start from the journal of a process that died (kill -9, crash)", registry=r)
        self.request_journal_errors = Counter(
            "uniroute_request_journal_errors", "Failed appends to the local request journal (rows kept in memory)",
            registry=r)

        # -- durability of budgets -----------------------------------------------------------------
        self.settlements_deferred = Counter(
            "uniroute_budget_settlements_deferred",
            "Budget settlements the request path could not write (database down, or slower than "
            "database.settle_timeout_s): written with the request's log row once the database answers",
            registry=r)
        self.usage_corrected = Counter(
            "uniroute_usage_corrected",
            "Requests whose provider-reported usage was impossible (negative, not an integer, or beyond "
            "budget.usage_tolerance x what the request could produce): logged and charged at the counted figure",
            registry=r)
        self.reservations_released = Counter(
            "uniroute_budget_reservations_released",
            "Budget reservations released without a settlement, by reason: holder_restarted (its process died and "
            "the next one on its host started), holder_expired (no heartbeat for database.reservation_ttl_s), "
            "abandoned (nobody will settle it: the request went away while it was being written, or its commit "
            "went unseen)",
            ["reason"], registry=r)

    # -- label hygiene ---------------------------------------------------------------------------
    def set_registry(self, models: Iterable[str], routable: Iterable[str] | None = None) -> None:
        """Tell the metrics which model names exist (the only ones used as label values)."""
        names = frozenset(models)
        self._known_models = names
        self.registry_models.labels(state="enabled").set(len(names))
        self.registry_models.labels(state="routable").set(len(frozenset(routable)) if routable is not None
                                                          else len(names))

    def model_label(self, name: str | None) -> str:
        if not name:
            return NONE
        if name == "auto" or name in self._known_models:
            return name
        return OTHER

    def add_collect_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` on the event loop before every ``/metrics`` answer (gauges computed from state)."""
        self._collect_hooks.append(hook)

    def collect_hooks(self) -> None:
        for hook in self._collect_hooks:
            try:
                hook()
            except Exception:  # a gauge must never break /metrics
                import logging

                logging.getLogger("uniroute.metrics").exception("metrics collect hook failed")

    # -- observations ------------------------------------------------------------------------------
    def cooldown_entered(self, model: str) -> None:
        self.cooldowns_entered.labels(model=self.model_label(model)).inc()

    def set_models_in_cooldown(self, count: int) -> None:
        self.models_in_cooldown.set(count)

    def set_key_lambda(self, key_name: str, lam: float) -> None:
        self.key_lambda.labels(api_key_alias=key_name).set(lam)

    def set_key_budget(self, key_name: str, budget_usd: float, remaining_usd: float) -> None:
        self.max_budget.labels(api_key_alias=key_name).set(budget_usd)
        self.remaining_budget.labels(api_key_alias=key_name).set(remaining_usd)

    def set_profile_drift(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """The drift gauges from the last re-profiling pass's ``cluster_drift`` rows; the pairs it did not measure
        (and models outside the registry) are dropped, so the series stay within registry models × K clusters."""
        gauges = (self.profile_drift, self.profile_drift_bound, self.profile_drift_feedback)
        for g in gauges:
            g.clear()
        for row in rows:
            model = str(row.get("model"))
            if model not in self._known_models:
                continue
            labels = {"model": model, "cluster": str(int(row["cluster"]))}
            self.profile_drift.labels(**labels).set(float(row["drift"]))
            self.profile_drift_bound.labels(**labels).set(float(row["bound"]))
            self.profile_drift_feedback.labels(**labels).set(float(row["feedback"]))

    def observe_embedding(self, source: str) -> None:
        """One request prompt's embedding came from ``source`` (memory, disk or computed)."""
        self.prompt_embeddings.labels(source=source).inc()

    def observe_request(self, record: RequestRecord) -> None:
        """Update every per-request metric from one finished request's record."""
        requested = self.model_label(record.requested_model)
        model = self.model_label(record.routed_model)
        key = record.key_name or "anonymous"
        status = int(record.status_code)
        endpoint = record.endpoint if record.endpoint in ENDPOINTS else OTHER
        self.requests.labels(requested_model=requested, model=model, status_code=str(status),
                             status_class=_status_class(status), api_key_alias=key, endpoint=endpoint).inc()
        ok = status < 400
        if ok:
            if record.routed_model:
                self.llm_requests.labels(model=model, requested_model=requested, api_key_alias=key).inc()
        else:
            self.failed_requests.labels(requested_model=requested, model=model, exception_status=str(status),
                                        exception_class=(record.error_type or "error")[:64], api_key_alias=key,
                                        endpoint=endpoint).inc()
        tok = {"model": model, "requested_model": requested, "api_key_alias": key}
        if record.prompt_tokens:
            self.input_tokens.labels(**tok).inc(record.prompt_tokens)
        if record.completion_tokens:
            self.output_tokens.labels(**tok).inc(record.completion_tokens)
        if record.prompt_tokens or record.completion_tokens:
            self.total_tokens.labels(**tok).inc((record.prompt_tokens or 0) + (record.completion_tokens or 0))
        if record.cost_usd:
            self.spend.labels(**tok).inc(record.cost_usd)
        if record.usage_corrected:
            self.usage_corrected.inc()

        if record.latency_ms is not None:
            self.total_latency.labels(model=model, requested_model=requested).observe(record.latency_ms / 1000)
            if record.upstream_latency_ms is not None:
                overhead = max(0.0, record.latency_ms - record.upstream_latency_ms)
                self.overhead_latency.labels(model=model).observe(overhead / 1000)
        if record.upstream_latency_ms is not None:
            self.upstream_latency.labels(model=model).observe(record.upstream_latency_ms / 1000)
        if record.ttft_ms is not None:
            self.ttft.labels(model=model).observe(record.ttft_ms / 1000)

        if record.requested_model == "auto" and (record.candidates or record.routed_model):
            first = record.candidates[0].get("model") if record.candidates else record.routed_model
            cluster = str(record.cluster) if record.cluster is not None else NONE
            self.routing_decisions.labels(model=self.model_label(first), cluster=cluster).inc()
        for att in record.attempts:
            self.upstream_attempts.labels(model=self.model_label(att.get("model")),
                                          outcome=(att.get("error_type") or "success")[:64]).inc()
        attempts = [a.get("model") for a in record.attempts if a.get("model")]
        for a, b in itertools.pairwise(attempts):
            self.fallbacks.labels(from_model=self.model_label(a), to_model=self.model_label(b)).inc()
        if len(attempts) > 1:
            counter = self.successful_fallbacks if ok else self.failed_fallbacks
            counter.labels(requested_model=requested, fallback_model=self.model_label(attempts[-1]),
                           api_key_alias=key).inc()

    # -- exposition ----------------------------------------------------------------------------------
    def render(self) -> bytes:
        """The text exposition: this registry, or every worker's files in multiprocess mode."""
        if multiprocess_enabled():
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        """Mark this worker dead so ``live*`` gauges stop counting it (multiprocess mode)."""
        if multiprocess_enabled():
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())


class MetricsApp:
    """A pure-ASGI app answering ``GET /metrics`` with the text exposition (405 for other methods)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        import asyncio

        if scope["type"] != "http":
            return
        if scope.get("method", "GET") not in ("GET", "HEAD"):
            body = b'{"error": {"message": "method not allowed: use GET /metrics", "type": "invalid_request_error", ' \
                   b'"param": null, "code": "method_not_allowed"}}'
            await send({"type": "http.response.start", "status": 405,
                        "headers": [(b"content-type", b"application/json"), (b"allow", b"GET, HEAD")]})
            await send({"type": "http.response.body", "body": body})
            return
        self.metrics.collect_hooks()
        render = self.metrics.render
        payload = await asyncio.to_thread(render) if multiprocess_enabled() else render()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode()),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else payload})


def metrics_app(metrics: Metrics) -> MetricsApp:
    """The ``/metrics`` ASGI app for ``metrics`` (mount it, or serve it alone)."""
    return MetricsApp(metrics)


def prepare_multiprocess_dir(workers: int, base: str | os.PathLike[str] | None = None) -> str | None:
    """Before starting ``workers`` > 1 processes: make sure ``PROMETHEUS_MULTIPROC_DIR`` names an
    empty folder (a fresh temporary one unless set), so ``/metrics`` merges every worker.

    Must run in the parent before any worker imports prometheus_client. Returns the folder
    when this call created it (the caller removes it after the server stops)."""
    if workers <= 1:
        return None
    current = os.environ.get(MULTIPROC_ENV)
    if current:
        from pathlib import Path

        folder = Path(current)
        folder.mkdir(parents=True, exist_ok=True)
        for f in folder.glob("*.db"):  # samples of a previous run
            f.unlink()
        return None
    import tempfile

    created = tempfile.mkdtemp(prefix="uniroute-prometheus-", dir=base)
    os.environ[MULTIPROC_ENV] = created
    return created
