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
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.spec import ModelSpec

#: Environment variable naming the config file.
CONFIG_ENV = "UNIROUTE_CONFIG"
#: Environment variable naming the replay dataset in the default config.
DATASET_ENV = "UNIROUTE_DATASET"

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
ENV_REF = "os.environ/"


class ConfigError(ValueError):
    """The config file is missing or invalid; the message names the file and the setting."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False


class RouterConfig(_Section):
    policy: Literal["cheapest", "uniroute"] = "cheapest"
    variant: Literal["learnedmap", "kmeans"] = "learnedmap"
    artifact: str | None = None  # folder of a fitted UniRoute router (`uniroute router fit --out`)
    default_lambda: float = Field(default=0.1, ge=0.0)
    lambda_min: float = Field(default=0.0, ge=0.0)
    lambda_max: float = Field(default=10.0, ge=0.0)
    # Calibration: set one of these to derive default_lambda from the artifact's validation prompts.
    target_cost: float | None = Field(default=None, gt=0.0, le=1.0)  # mean normalised cost
    target_fraction_of_best: float | None = Field(default=None, gt=0.0, le=1.0)  # × the best model's cost
    # Embedding on the request path (uniroute only)
    embed_cache_dir: str | None = None  # disk cache of prompt embeddings (default: $UNIROUTE_CACHE_DIR)
    max_batch: int = Field(default=32, ge=1)  # micro-batch size across concurrent requests
    max_wait_ms: float = Field(default=2.0, ge=0.0)  # how long a prompt waits for company

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
    # cooldown (gateway/serving/cooldown.py): this many retryable failures within the window put a model
    # into cooldown for cooldown_s (at least a 429's Retry-After); `auto` routes around it. 0 = off.
    cooldown_failures: int = Field(default=3, ge=0)
    cooldown_window_s: float = Field(default=60.0, gt=0.0)
    cooldown_s: float = Field(default=30.0, ge=0.0)


class ForwardingConfig(_Section):
    """How requests reach the backends (always through ``litellm.acompletion``; see gateway/serving/forwarding.py)."""

    http_client: Literal["aiohttp", "httpx"] = "aiohttp"  # HTTP stack of the shared OpenAI-wire clients
    raw_openai_streams: bool = True  # read OpenAI-wire streams from the SDK stream, not LiteLLM's chunk wrapper


class ReplayModelsConfig(_Section):
    """Expand the models of a routing-benchmark folder into registry entries."""

    dataset: str
    api_base: str = "http://127.0.0.1:8100/v1"
    api_key: str = "replay"
    usd_per_1m_tokens_per_cost_unit: float = Field(default=0.01, gt=0.0)
    timeout_s: float = Field(default=60.0, gt=0.0)


AuthMode = Literal["open", "keys"]


class AuthConfig(_Section):
    """``keys``: every request needs an API key (``uniroute keys create``). ``open``: no keys, everyone is
    'anonymous' with the router's λ and no budget or rate limit (the demo)."""

    mode: AuthMode = "keys"  # the one default of auth.mode
    cache_ttl_s: float = Field(default=1.0, gt=0.0, le=60.0)  # bound on how stale a replica's key cache is


class DatabaseConfig(_Section):
    auto_migrate: bool = True  # apply migrations at start (else: `uniroute db upgrade`)
    pool_size: int = Field(default=5, ge=1)  # PostgreSQL connection pool per worker
    max_overflow: int = Field(default=10, ge=0)
    store_prompts: bool = False  # keep the prompt text in the request log
    log_batch_size: int = Field(default=500, ge=1)
    log_flush_interval_s: float = Field(default=0.5, gt=0.0)
    log_max_buffer: int = Field(default=100_000, ge=1)  # request rows held while the database is unreachable
    spill_dir: str = "var/request-log-spill"  # rows unwritable at shutdown go here, and in at next start
    log_close_timeout_s: float = Field(default=15.0, ge=0.0)  # how long shutdown keeps retrying before spilling
    # durability (docs/security/durability.md)
    journal: bool = True  # append every finished request to a journal in spill_dir before its response ends (kill -9)
    journal_fsync: bool = False  # fsync each journal append: survives a machine crash too, one disk flush per request
    settle_timeout_s: float = Field(default=2.0, gt=0.0)  # longest a response waits for its budget charge to be written
    reservation_ttl_s: float = Field(default=120.0, gt=0.0)  # a process silent this long loses its budget reservations
    sqlite_busy_timeout_s: float = Field(default=30.0, gt=0.0)  # how long SQLite waits for a lock before a 503


class RateLimitConfig(_Section):
    fail_open: bool = True  # when Redis is unreachable: serve (true) or refuse with 503 (false)
    redis_prefix: str = Field(default="uniroute:rpm:", min_length=1)  # one per deployment sharing a Redis


class RegistryConfig(_Section):
    poll_interval_s: float = Field(default=2.0, gt=0.0, le=5.0)  # how often each replica re-reads `models`


class ProfilingConfig(_Section):
    grader: Literal["multiple_choice", "exact", "numeric", "judge"] = "multiple_choice"
    judge_model: str | None = None  # registry model the `judge` grader asks
    concurrency: int = Field(default=16, ge=1, le=512)
    attempts: int = Field(default=4, ge=1)  # per prompt, with exponential backoff (429: at least Retry-After)
    max_tokens: int | None = Field(default=None, ge=1)  # per answer (None: the provider's default)
    min_graded_per_cluster: int = Field(default=3, ge=0)  # below this in any cluster: not activated
    reprofile_interval_s: float = Field(default=0.0, ge=0.0)  # 0 = the scheduled re-profiling job is off
    feedback_weight: float = Field(default=1.0, ge=0.0)  # one feedback row = this many validation prompts
    max_feedback_weight_ratio: float = Field(default=4.0, ge=0.0)  # feedback weight ≤ ratio × prior count
    lease_ttl_s: float = Field(default=300.0, gt=0.0)  # how long a replica holds the re-profiling lease


class GatewayConfig(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    database_url: str = "sqlite:///var/uniroute.db"
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    redis_url: str | None = None  # redis://127.0.0.1:6379/0: rate limits shared by every replica
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    fallback: FallbackConfig = Field(default_factory=FallbackConfig)
    forwarding: ForwardingConfig = Field(default_factory=ForwardingConfig)
    models: list[ModelSpec] = Field(default_factory=list)  # litellm_params as written (gateway/spec.py)
    replay_models: ReplayModelsConfig | None = None
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    profiling: ProfilingConfig = Field(default_factory=ProfilingConfig)
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


_SECRET_PARAM = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def mask_secrets(params: Mapping[str, Any], placeholder: str) -> dict[str, Any]:
    """litellm_params with every literal value under a secret-looking name (``api_key``,
    ``aws_secret_access_key``, ...) replaced by ``placeholder``; ``os.environ/NAME`` references stay."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if _SECRET_PARAM.search(k) and not (isinstance(v, str) and v.startswith(ENV_REF)) and v not in ("", None):
            out[k] = placeholder
        else:
            out[k] = v
    return out


def resolve_env_refs(params: dict[str, Any], where: str) -> dict[str, Any]:
    """Replace ``os.environ/NAME`` values (LiteLLM proxy convention) by the variable's value."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, str) and v.startswith(ENV_REF):
            name = v[len(ENV_REF):]
            got = os.environ.get(name)
            if got is None:
                raise ConfigError(f"{where}.{k}: environment variable {name} is not set")
            out[k] = got
        else:
            out[k] = v
    return out


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
