"""The gateway's configuration: ``config.yaml`` read into typed pydantic objects.

Loading does three things on top of plain YAML:

- ``${VAR}`` and ``${VAR:-default}`` in any string are replaced by the environment
  variable (or the default). An unset ``${VAR}`` without a default is an error.
- ``os.environ/NAME`` as a whole ``litellm_params`` value names an environment variable, as in
  LiteLLM's own proxy config: an unset variable is an error naming it. The ``models:`` entries
  (:class:`gateway.spec.ModelSpec`) keep the reference as written; it is resolved when the registry
  entry is built (``gateway/serving/registry.py``), so the ``models`` table never holds the secret.
- Relative paths (``replay_models.dataset``, ``router.artifact``, a relative
  ``sqlite:///`` database URL) resolve against the folder holding the config file.

``replay_models`` expands into one registry entry per row of a routing-benchmark
``models.csv`` (see ``docs``/``README``): each recorded LLM becomes a model served by the
replay upstream, with the dataset's cost as the router cost and prices derived from it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.secrets import mask, resolve
from gateway.spec import ModelSpec

#: Environment variable naming the config file.
CONFIG_ENV = "UNIROUTE_CONFIG"
#: set by `uniroute serve` for its workers: the server settings its command line overrode (JSON)
SERVE_OVERRIDES_ENV = "UNIROUTE_SERVE_OVERRIDES"
#: Environment variable naming the replay dataset in the default config.
DATASET_ENV = "UNIROUTE_DATASET"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """The config file is missing or invalid; the message names the file and the setting."""


class _Section(BaseModel):
    # a string right under a field is its description: docs/CONFIG.md is generated from them (gateway/configdoc.py);
    # every number is finite (.inf / .nan in YAML are refused)
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    """Address the gateway listens on (`uniroute serve --host` overrides)."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port the gateway listens on (`--port` overrides)."""
    workers: int = Field(default=1, ge=1)
    """uvicorn worker processes (`--workers` overrides); metrics are merged across them."""
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    """Larger request bodies get 413."""
    max_in_flight: int = Field(default=64, ge=1)
    """API requests (`/v1/*`) one worker serves at once, streams counted while open; one more gets 503 `overloaded` with `Retry-After: 1` at once instead of queueing (counted in `uniroute_requests_shed_total`, logged). Health, metrics and admin routes are never refused. Raise it when the upstreams are slow (each open stream holds a slot); docs/PERFORMANCE.md."""
    health_port: int | None = Field(default=None, ge=0, le=65535)
    """A second port (on `host`) where a thread of each worker answers `GET /health/liveliness`, however busy the event loop is; point liveness probes here. The main port's probe waits behind the requests in flight (0.4-0.6 s at p99 at concurrency 256; docs/PERFORMANCE.md). It answers 503 `stalled` when the event loop has not turned for `health_stall_s`. Workers share it (SO_REUSEPORT). Unset: off."""
    health_stall_s: float = Field(default=10.0, gt=0.0)
    """`health_port` answers 503 when the event loop has been blocked this long."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Log level of the gateway and uvicorn."""
    access_log: bool = False
    """uvicorn's access log."""
    header_timeout_s: float = Field(
        default=10.0, gt=0.0,
        description="a connection must deliver a request's headers within this time (from its first byte, or from "
                    "the connection's opening) or it is closed with 408 (`uniroute serve` only; docs/security)")
    body_timeout_s: float = Field(
        default=30.0, gt=0.0,
        description="a request's body must have arrived completely this long after its headers, or the request "
                    "gets 408 and the connection is closed")
    max_header_bytes: int = Field(
        default=64 * 1024, ge=1024,
        description="request line plus headers larger than this get 431 and the connection is closed")

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServerConfig:
        if self.health_port is not None and self.health_port != 0 and self.health_port == self.port:
            raise ValueError(f"health_port {self.health_port} is also the port: the liveness listener needs a port "
                             "of its own (for example port + 1), or leave health_port unset")
        return self


class RouterConfig(_Section):
    policy: Literal["cheapest", "uniroute"] = "cheapest"
    """Routing policy for `auto`: `uniroute`, or the prompt-agnostic placeholder `cheapest` (cheapest `router_cost` first)."""
    variant: Literal["learnedmap", "kmeans"] = "learnedmap"
    """UniRoute only: `learnedmap` (z(x) = softmax(θᵀφ(x)); alias `learned_map`) or `kmeans` (nearest centroid)."""
    artifact: str | None = None
    """UniRoute only (required): folder written by `uniroute router fit --dataset DIR --out DIR`; its `profiles.json` seeds the `model_profiles` table. The artifact fixes the embedder (the demo's: the static embedding distilled from MiniLM)."""
    default_lambda: float = Field(default=0.1, ge=0.0)
    """λ when the request sets none (a key's own λ wins in `auth.mode: keys`)."""
    lambda_min: float = Field(default=0.0, ge=0.0)
    """Lowest λ a request or key may use."""
    lambda_max: float = Field(default=10.0, ge=0.0)
    """Highest λ a request or key may use."""
    target_cost: float | None = Field(default=None, gt=0.0, le=1.0)
    """Derive `default_lambda` so that the expected mean normalised cost on the artifact's validation prompts is this (as `uniroute router calibrate`)."""
    target_fraction_of_best: float | None = Field(default=None, gt=0.0, le=1.0)
    """Or: derive `default_lambda` for this fraction of the most accurate model's cost."""
    embed_cache_dir: str | None = None
    """On-disk cache of prompt embeddings (default `$UNIROUTE_CACHE_DIR`, else `~/.cache/uniroute`); the gateway only reads it."""
    max_batch: int = Field(default=32, ge=1)
    """Micro-batch size of embeddings across concurrent requests."""
    max_wait_ms: float = Field(default=2.0, ge=0.0)
    """How long a prompt waits for company in a micro-batch (0 for a fast static embedder)."""
    pace_interval_s: float = Field(default=1.0, gt=0.0)
    """Keys with `budget_policy: pace`: how often their λ is re-paced to their budget (the replicas together; docs/PACING.md)."""

    @field_validator("variant", mode="before")
    @classmethod
    def _variant_alias(cls, v: Any) -> Any:
        return "learnedmap" if v == "learned_map" else v

    @model_validator(mode="after")
    def _range(self) -> RouterConfig:
        if self.policy == "uniroute" and not self.artifact:
            raise ValueError("router.policy 'uniroute' needs router.artifact (a folder written by "
                             "`uniroute router fit --out DIR`)")
        if self.target_cost is not None and self.target_fraction_of_best is not None:
            raise ValueError("set at most one of router.target_cost and router.target_fraction_of_best")
        if not self.lambda_min <= self.default_lambda <= self.lambda_max:
            raise ValueError(f"need lambda_min <= default_lambda <= lambda_max, got "
                             f"{self.lambda_min} <= {self.default_lambda} <= {self.lambda_max}")
        return self


class FallbackConfig(_Section):
    max_attempts: int = Field(default=3, ge=1)
    """Models tried down the ranking for `auto` (timeouts, 429s, 5xx, connection errors)."""
    cooldown_failures: int = Field(default=3, ge=0)
    """This many retryable failures of a model within `cooldown_window_s` put it into cooldown: `auto` tries it last (gateway/serving/cooldown.py). 0 turns cooldown off."""
    cooldown_window_s: float = Field(default=60.0, gt=0.0)
    """The window in which failures are counted."""
    cooldown_s: float = Field(default=30.0, ge=0.0)
    """How long a cooldown lasts (at least a 429's Retry-After)."""


class ForwardingConfig(_Section):
    """How requests reach the backends (always through ``litellm.acompletion``; see gateway/serving/forwarding.py)."""

    http_client: Literal["aiohttp", "httpx"] = "aiohttp"
    """HTTP stack of the shared OpenAI-wire clients: `aiohttp` (the OpenAI SDK's `DefaultAioHttpClient`, cheaper per request) or `httpx` (the SDK's default)."""
    raw_openai_streams: bool = True
    """Read OpenAI-wire streams from the SDK stream `litellm.acompletion` opened rather than through LiteLLM's per-chunk wrapper (docs/PERFORMANCE.md)."""
    max_response_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024,
        description="an upstream answer (non-streaming), or one event of a stream, larger than this (after "
                    "decompression) fails as 502 once this many bytes arrived; it is never buffered whole. "
                    "Enforced on the shared OpenAI-wire clients (gateway/serving/bounded.py)")


class LimitsConfig(_Section):
    """Cheap structural limits on request bodies, checked while the body arrives and before it is parsed or
    validated (gateway/http/bodies.py). Over a limit: 400 naming the limit and this config key."""

    max_messages: int = Field(default=2048, ge=1, description="messages in one chat or Anthropic Messages request; "
                                                                "`input` items in one Responses API request")
    max_content_parts: int = Field(default=512, ge=1,
                                   description="content parts (text, image, ...) in one message's (or "
                                               "Responses `input` item's) content list")
    max_tools: int = Field(default=128, ge=0, description="entries of `tools` (and of the legacy `functions`)")
    max_embedding_inputs: int = Field(default=2048, ge=1,
                                      description="entries of a `/v1/embeddings` request's `input` list (OpenAI's "
                                                  "own limit is 2,048)")
    max_json_depth: int = Field(
        default=64, ge=2, le=128,
        description="nesting depth of any JSON request body (arrays and objects); deeper bodies would reach "
                    "recursion limits further down (orjson, pydantic, LiteLLM)")
    max_json_items: int = Field(
        default=100_000, ge=10,
        description="JSON values of any request body (array elements and object members, at any depth; each "
                    "container counts once): bounds what the parser must build")
    offload_bytes: int = Field(
        default=64 * 1024, ge=0,
        description="a body larger than this is parsed, validated and token-counted in a worker thread, off "
                    "the event loop (smaller ones inline: the thread hop would cost more than the work)")


class BudgetConfig(_Section):
    """How a request's cost is bounded before it is sent: the estimate the budget reserves
    (gateway/serving/estimate.py, docs/security/budgets.md). Over-estimating only holds budget a little
    longer; under-estimating is what lets a key overspend."""

    prompt_factor: float = Field(default=1.5, ge=1.0, le=100.0)
    """The counted prompt tokens are multiplied by this (tokenizers differ per model: the count is LiteLLM's tokenizer for the first model tried, the bill is the provider's)."""
    prompt_slack_tokens: int = Field(default=64, ge=0)
    """Tokens added to every prompt estimate (the chat template's start and end)."""
    message_overhead_tokens: int = Field(default=8, ge=0)
    """Tokens added per message (role and separators of the chat template)."""
    tool_prompt_tokens: int = Field(default=512, ge=0)
    """Tokens added when the request has `tools` or `functions` (the system prompt a provider writes around them)."""
    image_tokens: int = Field(default=2500, ge=0)
    """Tokens an image not marked `detail: low` may cost (the largest of the providers' documented formulas: OpenAI's 32-px patches are capped at 1536 × 1.62; the image is never fetched to measure it)."""
    low_detail_image_tokens: int = Field(default=85, ge=0)
    """Tokens an image with `detail: low` costs (OpenAI's fixed figure)."""
    bytes_bound_below: int = Field(default=4096, ge=0)
    """A prompt whose text is at most this many UTF-8 bytes is bounded by that byte count (a token is at least one byte) instead of being tokenized: cheap, and a true bound. For a key without a budget every prompt is bounded by its bytes, whatever its length (nothing is reserved; no token counting on its fast path)."""
    default_max_output_tokens: int = Field(default=4096, ge=1)
    """The output bound of a request without `max_tokens` to a model whose maximum output is known neither from its `max_output_tokens` nor from LiteLLM's model info; for a key with a budget it is then sent upstream as `max_tokens`, so the bound holds."""
    usage_tolerance: float = Field(default=2.0, ge=1.0, le=1000.0)
    """Provider usage beyond this multiple of the request's bound (prompt tokens over the prompt estimate, completion tokens over the output bound), or negative, is replaced by the counted figure, flagged `usage_corrected` in the request log and counted in `uniroute_usage_corrected_total`."""


class ReplayModelsConfig(_Section):
    """Expand the models of a routing-benchmark folder into registry entries."""

    dataset: str
    """Routing benchmark folder (docs/DATA.md); one model per row of its `models.csv`, named as there, served by `uniroute replay`."""
    api_base: str = "http://127.0.0.1:8100/v1"
    """Where `uniroute replay` listens."""
    api_key: str = "replay"
    """Key sent to the replay upstream (it accepts any)."""
    usd_per_1m_tokens_per_cost_unit: float = Field(default=0.01, gt=0.0)
    """Both prices of a replayed model: its `models.csv` cost × this (its `router_cost` is that cost)."""
    timeout_s: float = Field(default=60.0, gt=0.0)
    """Each replayed model's `timeout_s`."""


AuthMode = Literal["open", "keys"]


class AuthConfig(_Section):
    """``keys``: every request needs an API key (``uniroute keys create``). ``open``: no keys, everyone is
    'anonymous' with the router's λ and no budget or rate limit (the demo)."""

    mode: AuthMode = "keys"
    """`keys`: every request needs an API key (`uniroute keys create`); `open`: no keys, everyone is `anonymous` with the router's λ and no budget or limit (the shipped demo config)."""
    cache_ttl_s: float = Field(default=1.0, gt=0.0, le=60.0)
    """How long a replica caches a key's policy (bounds how stale a revocation can be)."""


class DatabaseConfig(_Section):
    auto_migrate: bool = True
    """Apply migrations at start (else run `uniroute db upgrade`)."""
    pool_size: int = Field(default=5, ge=1)
    """PostgreSQL connections per worker."""
    max_overflow: int = Field(default=10, ge=0)
    """PostgreSQL connections per worker beyond `pool_size` under load."""
    store_prompts: bool = False
    """Keep the prompt text (last user message) in the request log."""
    log_batch_size: int = Field(default=500, ge=1)
    """Rows per insert of the background request-log writer."""
    log_flush_interval_s: float = Field(default=0.5, gt=0.0)
    """How often the request-log writer flushes."""
    log_max_buffer: int = Field(default=100_000, ge=1)
    """Request rows held in memory while the database is unreachable (beyond: dropped, counted and logged)."""
    spill_dir: str = "var/request-log-spill"
    """Rows unwritable at shutdown are spilled here, and written at the next start."""
    log_close_timeout_s: float = Field(default=15.0, ge=0.0)
    """How long shutdown keeps retrying the database before spilling."""
    journal: bool = True
    """Append every finished request to a journal in `spill_dir` before its response ends, replayed at start: `kill -9` loses no answered request's row (docs/security/durability.md)."""
    journal_fsync: bool = False
    """fsync each journal append: survives a machine crash too, at one disk flush per request."""
    settle_timeout_s: float = Field(default=2.0, gt=0.0)
    """The longest a response waits for its budget charge to be written; past it the charge is written with the request's log row when the database is back."""
    reservation_ttl_s: float = Field(default=120.0, gt=0.0)
    """A gateway process silent this long loses its budget reservations (any replica releases them)."""
    sqlite_busy_timeout_s: float = Field(default=30.0, gt=0.0)
    """How long SQLite waits for a lock before the request gets a 503."""


class RateLimitConfig(_Section):
    fail_open: bool = True
    """When Redis is unreachable: serve (true) or refuse with 503 (false)."""
    redis_prefix: str = Field(default="uniroute:rpm:", min_length=1)
    """Key prefix in Redis; one per deployment sharing a Redis."""


MetricsAuth = Literal["auto", "token", "none"]


class MetricsConfig(_Section):
    auth: MetricsAuth = "auto"
    """Who may read `GET /metrics` (it names every API key with its spend and budget): `token` needs `Authorization: Bearer` with `$UNIROUTE_METRICS_TOKEN` or the admin key `$UNIROUTE_ADMIN_KEY` (403 while neither is set); `none` lets anyone read it; `auto` is `token` with `auth.mode: keys` and `none` with `auth.mode: open` (docs/security/tenants.md)."""


class TelemetryConfig(_Section):
    """OpenTelemetry traces (gateway/telemetry.py): off unless `otlp_endpoint` is set."""

    otlp_endpoint: str | None = None
    """OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces` (needs `pip install 'uniroute-gateway[otel]'`). Set: one span per request with child spans for routing and each upstream attempt, GenAI semantic-convention attributes plus λ, cluster and candidates. Unset: no tracing, no cost."""
    service_name: str = "uniroute-gateway"
    """The `service.name` of the exported spans."""
    schedule_delay_ms: int = Field(default=1000, ge=10, le=60_000)
    """Spans are exported in batches, at most this long after they end (and at shutdown)."""


class AdminConfig(_Section):
    """What the admin API (``/admin/models``) may put into a model's ``litellm_params`` (docs/security/secrets.md)."""

    env_allowlist: list[str] = Field(default_factory=lambda: ["*_API_KEY"])
    """Environment variables a model added or changed through the admin API may name as `os.environ/NAME`: exact names, or patterns (`*_API_KEY`) that never match a `UNIROUTE_*` variable (name one exactly to allow it). Anything else is a 400 naming this list. `[]`: no references through the admin API."""
    allow_literal_keys: bool = False
    """Accept literal secrets (an `api_key` value, an `Authorization` header, a URL password, ...) through the admin API; they are stored encrypted with the Fernet key in `$UNIROUTE_SECRET_KEY` and decrypted only in memory. `false`: a 400 asking for `os.environ/NAME`."""


class RegistryConfig(_Section):
    poll_interval_s: float = Field(default=2.0, gt=0.0, le=5.0)
    """How often each replica re-reads the `models` and `model_profiles` tables."""


class ProfilingConfig(_Section):
    grader: Literal["multiple_choice", "exact", "numeric", "judge"] = "multiple_choice"
    """How an answer is scored against the reference."""
    judge_model: str | None = None
    """Registry model the `judge` grader asks (rating 0-10)."""
    concurrency: int = Field(default=16, ge=1, le=512)
    """Profiling requests in flight."""
    attempts: int = Field(default=4, ge=1)
    """Tries per prompt, with exponential backoff (a 429 waits at least its Retry-After)."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Answer length per profiling prompt (default: the provider's)."""
    min_graded_per_cluster: int = Field(default=3, ge=0)
    """A model is activated only when every cluster has this many graded answers, or all its prompts when it has fewer (else `--allow-partial`)."""
    reprofile_interval_s: float = Field(default=0.0, ge=0.0)
    """Period of the re-profiling job inside `serve` (0: off); a replica skips its pass when any replica finished one
    less than this long ago."""
    feedback_weight: float = Field(default=1.0, ge=0.0)
    """Weight of one feedback row, in validation prompts."""
    max_feedback_weight_ratio: float = Field(default=4.0, ge=0.0)
    """Cap of the feedback weight per cluster, as a multiple of the validation count."""
    max_key_share: float = Field(default=0.1, gt=0.0, le=1.0)
    """The largest share of a cluster's evidence (validation prompts + weighted feedback) that one API key's feedback may have in a re-profiling pass: one key moves a cluster's Ψ by at most this much, however much feedback it sends. 1 turns the per-key cap off (docs/security/tenants.md)."""
    feedback_from: Literal["all", "trusted"] = "all"
    """Whose feedback re-profiling counts: `all` keys (each within `max_key_share`), or only keys marked `trusted` (`uniroute keys create --trusted`, `"trusted": true` on `POST /admin/keys`); anonymous feedback never counts with `trusted`."""
    impact_window_s: float = Field(default=7 * 86400.0, gt=0.0)
    """The impact report of profiling (docs/IMPACT.md) weighs clusters by the `auto` requests of the request log this far back."""
    impact_followup_s: float = Field(default=86400.0, ge=0.0)
    """This long after a model is activated by profiling, its impact report is repeated with the realised figures: its share of the `auto` requests logged since, their mean cost and, where feedback exists, their error, next to what was predicted (`uniroute impact NAME`; docs/IMPACT.md). Run by the scheduler inside `serve`, one replica at a time (the `impact-followup` lease). 0: off (`uniroute impact NAME --now` still computes it)."""
    lease_ttl_s: float = Field(default=300.0, gt=0.0)
    """The longest a re-profiling pass holds its database lease (released when the pass ends; this bounds a pass
    whose replica died)."""
    drift_min_feedback: int = Field(default=20, ge=1)
    """Feedback rows a (model, cluster) needs before a re-profiling pass measures its drift, realised error − Ψ (the `uniroute_profile_drift` gauge; docs/ROUTING_FEATURES.md)."""
    drift_confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
    """Confidence of the drift bound (Hoeffding): a drift above `uniroute_profile_drift_bound` says the model does worse on the cluster than its profile, at this confidence."""
    tenant_prior_weight: float = Field(default=20.0, gt=0.0)
    """m of the tenant-private profiles: a key's own labels on a cluster weigh n/(n+m) against the global Ψ when it routes (n: its labels there; docs/ROUTING_FEATURES.md)."""
    tenant_feedback: bool = False
    """Each key's own feedback also forms its tenant-private profile (like uploaded labels, one-hot on the request's cluster), rebuilt by every re-profiling pass; for that key's routing only."""
    drift_demote: bool = False
    """Demote a model on a cluster whose drift exceeds the bound at the next re-profiling pass (Ψ_k := the lower confidence bound of its realised error), that cluster only; never on one key's feedback alone."""


class GatewayConfig(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    """Where and how the gateway listens."""
    database_url: str = "sqlite:///var/uniroute.db"
    """Keys, budgets, registry, profiles and the request log; `postgresql+psycopg://user@host/db` for several replicas (`$UNIROUTE_DATABASE_URL` wins for CLI commands)."""
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    """The store's behaviour."""
    auth: AuthConfig = Field(default_factory=AuthConfig)
    """API keys."""
    redis_url: str | None = None
    """`redis://127.0.0.1:6379/0`: per-key rate limits shared by every replica (without it: per process)."""
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    """Rate limiting."""
    router: RouterConfig = Field(default_factory=RouterConfig)
    """How `model: "auto"` is routed."""
    fallback: FallbackConfig = Field(default_factory=FallbackConfig)
    """Fallbacks and cooldown."""
    forwarding: ForwardingConfig = Field(default_factory=ForwardingConfig)
    """How calls reach the providers."""
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    """Cheap structural limits on request bodies (checked before parsing)."""
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    """How a request's cost is estimated and checked against its key's budget."""
    models: list[ModelSpec] = Field(default_factory=list)
    """The registry's seed: one entry per model (gateway/spec.py; then `uniroute models` / `/admin/models`)."""
    replay_models: ReplayModelsConfig | None = None
    """Add every model of a routing benchmark folder, served by `uniroute replay` (an explicit `models[]` entry of the same name wins)."""
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """The live registry."""
    profiling: ProfilingConfig = Field(default_factory=ProfilingConfig)
    """Profiling and re-profiling."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """Who may read `/metrics`."""
    admin: AdminConfig = Field(default_factory=AdminConfig)
    """What the admin API may write into a model's `litellm_params` (environment references, literal keys)."""
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    """OpenTelemetry traces over OTLP/HTTP (off by default)."""
    #: folder of the config file (relative paths resolve against it); not a YAML key
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)

    @model_validator(mode="after")
    def _unique(self) -> GatewayConfig:
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"model name {m.name!r} appears twice")
            seen.add(m.name)
        return self

    def resolve_path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()


def default_config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or "config.yaml")


def expand_vars(value: Any, where: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a YAML tree."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            got = os.environ.get(name)
            if got is not None and (got != "" or default is None):
                return got
            if default is not None:
                return default
            raise ConfigError(f"{where or 'config'}: environment variable {name} is not set (and has no default)")
        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_vars(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_vars(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def mask_secrets(params: Mapping[str, Any], placeholder: str) -> dict[str, Any]:
    """litellm_params with every secret-looking value, however nested (``api_key``, ``aws_secret_access_key``,
    ``extra_headers.Authorization``, a URL's password, ...), replaced by ``placeholder``; ``os.environ/NAME``
    references stay (:func:`gateway.secrets.mask`)."""
    masked: dict[str, Any] = mask(dict(params), placeholder)
    return masked


def resolve_env_refs(params: dict[str, Any], where: str) -> dict[str, Any]:
    """Replace ``os.environ/NAME`` values (LiteLLM proxy convention, at any depth) by the variable's value and
    decrypt ``encrypted/…`` values (:func:`gateway.secrets.resolve`); a :class:`ConfigError` says what is
    missing."""
    try:
        return resolve(params, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _replay_entries(cfg: ReplayModelsConfig, base: GatewayConfig, source: str) -> list[ModelSpec]:
    folder = base.resolve_path(cfg.dataset)
    models_csv = folder / "models.csv"
    if not models_csv.is_file():
        raise ConfigError(
            f"{source}: replay_models.dataset {str(folder)!r} is not a routing benchmark folder "
            f"(no models.csv). Set ${DATASET_ENV} to a dataset folder, or remove replay_models."
        )
    entries: list[ModelSpec] = []
    with open(models_csv, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            name = (row.get("model") or "").strip()
            if not name:
                continue
            try:
                cost = float(row.get("cost") or "")
            except ValueError:
                raise ConfigError(f"{models_csv}:{reader.line_num}: cost of {name!r} is not a number") from None
            if not math.isfinite(cost) or cost <= 0:
                raise ConfigError(f"{models_csv}:{reader.line_num}: cost of {name!r} must be > 0")
            price = cost * cfg.usd_per_1m_tokens_per_cost_unit
            entries.append(ModelSpec(
                name=name,
                litellm_params={"model": f"openai/{name}", "api_base": cfg.api_base, "api_key": cfg.api_key},
                input_cost_per_1m=price,
                output_cost_per_1m=price,
                router_cost=cost,
                timeout_s=cfg.timeout_s,
            ))
    if not entries:
        raise ConfigError(f"{models_csv}: no models")
    return entries


def _format_validation(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    return f"{source}: invalid config: " + "; ".join(parts)


def parse_config(data: dict[str, Any] | None, *, base_dir: Path | None = None, source: str = "config") -> GatewayConfig:
    """Validate an already-read YAML tree (variables are expanded here)."""
    raw = expand_vars(data or {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    try:
        cfg = GatewayConfig.model_validate({**raw, "base_dir": base_dir or Path.cwd()})
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
    for i, m in enumerate(cfg.models):  # fail fast on an unset os.environ/NAME; the spec keeps the reference
        resolve_env_refs(m.litellm_params, f"models[{i}].litellm_params")
    models = list(cfg.models)
    if cfg.replay_models is not None:
        known = {m.name for m in models}
        for entry in _replay_entries(cfg.replay_models, cfg, source):
            if entry.name not in known:  # an explicit entry of the same name wins
                models.append(entry)
    update: dict[str, Any] = {"models": models}
    if cfg.router.artifact:
        update["router"] = cfg.router.model_copy(update={"artifact": str(cfg.resolve_path(cfg.router.artifact))})
    update["database_url"] = _resolve_sqlite(cfg.database_url, cfg)
    update["database"] = cfg.database.model_copy(update={"spill_dir": str(cfg.resolve_path(cfg.database.spill_dir))})
    return cfg.model_copy(update=update)


def _resolve_sqlite(url: str, cfg: GatewayConfig) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        return prefix + str(cfg.resolve_path(url[len(prefix):]))
    return url


def with_server_overrides(config: GatewayConfig, overrides: dict[str, Any],
                          source: str = "server settings with the command line's") -> GatewayConfig:
    """``config`` with its ``server`` settings replaced by ``overrides`` (``uniroute serve --host/--port/--workers``),
    validated as the config's own are (a ``--port`` that is the ``health_port`` is refused: :class:`ConfigError`)."""
    if not overrides:
        return config
    try:
        server = ServerConfig.model_validate({**config.server.model_dump(), **overrides})
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None
    return config.model_copy(update={"server": server})


def serve_overrides() -> dict[str, Any]:
    """What ``uniroute serve`` told its workers it overrode (:data:`SERVE_OVERRIDES_ENV`; empty elsewhere)."""
    return dict(json.loads(os.environ.get(SERVE_OVERRIDES_ENV) or "{}"))


def load_config(path: str | os.PathLike[str] | None = None) -> GatewayConfig:
    """Read ``path`` (default ``$UNIROUTE_CONFIG`` or ``./config.yaml``)."""
    p = Path(path) if path is not None else default_config_path()
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found (pass --config or set ${CONFIG_ENV})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return parse_config(data, base_dir=p.resolve().parent, source=str(p))
