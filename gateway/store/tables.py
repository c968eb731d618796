"""The SQL schema: SQLAlchemy 2.0 typed models of every table the gateway keeps.

``gateway/store/migrations/`` is the only thing that changes the schema; its env.py compares against
``Base.metadata`` here (``tests/test_db.py`` checks they agree, like ``alembic check``).
The same models serve SQLite (the default, one file) and PostgreSQL (several replicas).

Conventions:
- Every time is stored in UTC. :class:`UTCDateTime` hands back timezone-aware datetimes on
  both databases (SQLite has no time zones; it stores naive UTC).
- Money is USD in double precision (``Float``; 15-16 significant digits, far below a cent for
  any budget). Budget checks allow 1e-9 USD of rounding (``gateway.store.budget.BUDGET_EPSILON_USD``).
- No raw API key is ever stored: ``api_keys.key_hash`` is the SHA-256 of the key and
  ``key_prefix`` a short display prefix.
- ``models.litellm_params`` keeps ``os.environ/NAME`` references as written, never the
  resolved secret.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import NoneType, UnionType
from typing import Any, ClassVar, Union, get_args, get_origin

from pydantic import BaseModel
from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedColumn, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

from gateway.spec import NAME_MAX_LENGTH, ModelSpec

#: Constraint and index names are deterministic, so migrations can refer to them on both databases.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BUDGET_PERIODS = ("day", "month")
#: What happens as a key's spend nears its budget: ``block`` refuses (429) what does not fit; ``pace`` also
#: adjusts the key's λ so its spend tracks budget × elapsed share of the period (docs/PACING.md).
BUDGET_POLICIES = ("block", "pace")
MODEL_SOURCES = ("config", "admin")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` on PostgreSQL, naive-UTC text on SQLite; always aware in Python."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps aware UTC times only")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class ApiKey(Base):
    """A client's key: its λ, λ range, budget for the current period, rate limit and model list."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the raw key
    key_prefix: Mapped[str] = mapped_column(String(16))  # "sk-ur-AbCd", for display only
    default_lambda: Mapped[float] = mapped_column(Float)
    lambda_min: Mapped[float] = mapped_column(Float, default=0.0)
    lambda_max: Mapped[float] = mapped_column(Float, default=10.0)
    budget_usd: Mapped[float | None] = mapped_column(Float)  # None: no cap
    budget_period: Mapped[str] = mapped_column(String(8), default="month")
    period_start: Mapped[datetime]
    spend_usd: Mapped[float] = mapped_column(Float, default=0.0)  # settled cost in the current period
    reserved_usd: Mapped[float] = mapped_column(Float, default=0.0)  # estimates held by in-flight requests
    total_spend_usd: Mapped[float] = mapped_column(Float, default=0.0)  # lifetime
    rpm_limit: Mapped[int | None] = mapped_column(Integer)  # None: unlimited
    allowed_models: Mapped[list[Any] | None] = mapped_column(JSON)  # None: every model
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    # its feedback counts when profiling.feedback_from is 'trusted' (docs/security/tenants.md)
    trusted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    # block: the budget's hard cap alone; pace: λ is also paced (docs/PACING.md; state in key_pacing)
    budget_policy: Mapped[str] = mapped_column(String(8), default="block", server_default="block")

    __table_args__ = (
        CheckConstraint("budget_period IN ('day', 'month')", name="budget_period"),
        CheckConstraint("budget_policy IN ('block', 'pace')", name="budget_policy"),
        CheckConstraint("lambda_min >= 0 AND lambda_min <= default_lambda AND default_lambda <= lambda_max",
                        name="lambda_range"),
        CheckConstraint("budget_usd IS NULL OR budget_usd >= 0", name="budget_nonneg"),
        CheckConstraint("rpm_limit IS NULL OR rpm_limit > 0", name="rpm_positive"),
    )


class KeyPacing(Base):
    """The budget pacer's state of a key with ``budget_policy: pace`` (gateway/pacing.py), shared by every replica.

    One row per paced key. A replica that steps the controller writes it back only if ``version`` is still the
    one it read (compare and set): concurrent steps of several replicas never interleave.
    """

    __tablename__ = "key_pacing"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    lam: Mapped[float] = mapped_column(Float)  # the λ in use
    integral: Mapped[float] = mapped_column(Float, default=0.0)  # the PI controller's integral
    exposure: Mapped[float] = mapped_column(Float, default=0.0)  # ∫ C(λ) dt this period (normalised cost × s)
    period_start: Mapped[datetime]  # the budget period the state belongs to
    updated_at: Mapped[datetime]  # when the controller last stepped (its clock)
    version: Mapped[int] = mapped_column(Integer, default=1)  # bumped by every write (compare and set)


class ReservationHolder(Base):
    """A gateway process that may hold budget reservations, and when it last said it is alive.

    ``holder`` is the process's id (``<host>-<pid>-<random>``, new at every start). Every process
    refreshes ``heartbeat_at`` several times per ``database.reservation_ttl_s``; the reservations of a
    holder whose heartbeat is older than that are released by any replica (``gateway/store/reservations.py``).
    """

    __tablename__ = "reservation_holders"

    holder: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class ReservationRow(Base):
    """One budget reservation of an in-flight request: the ledger behind ``api_keys.reserved_usd``.

    Written with the reservation (same transaction) and deleted by its settlement (same transaction as
    the charge), so a settlement retried or replayed finds no row and charges nothing twice. A
    reservation of a dead holder is *released* instead: ``released_at`` is set and its amount leaves
    ``reserved_usd``; the row stays (a tombstone) so a settlement that arrives later still charges the
    cost without releasing twice. Tombstones are forgotten after a week.
    """

    __tablename__ = "reservations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    holder: Mapped[str] = mapped_column(String(128), index=True)
    amount_usd: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    released_at: Mapped[datetime | None] = mapped_column(index=True)


class ModelRow(Base):
    """The live model registry: a :class:`gateway.spec.ModelSpec` per row, plus its state.

    The spec's columns (one per field: ``litellm_params`` with ``os.environ/NAME`` kept as written,
    prices, ``router_cost``, timeouts, ``routable``) are added below from the spec's fields, by
    :func:`spec_columns`; read and write them through ``gateway/store/models.py`` (``spec_from_row``).
    Every replica polls ``updated_at``/``version`` for changes.
    """

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH), unique=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    source: Mapped[str] = mapped_column(String(16), default="config")
    version: Mapped[int] = mapped_column(Integer, default=1)  # bumped on every change
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow, index=True)

    __table_args__ = (
        CheckConstraint("source IN ('config', 'admin')", name="source"),
        CheckConstraint("router_cost > 0", name="router_cost_positive"),
    )


#: Column type per spec field type (``str`` takes the field's ``max_length``).
_SPEC_TYPES: dict[Any, type[TypeEngine[Any]]] = {float: Float, bool: Boolean, int: Integer, str: String,
                                                 dict: JSON, list: JSON}


def spec_columns(spec: type[BaseModel] = ModelSpec) -> dict[str, MappedColumn[Any]]:
    """A column per field of ``spec``: its type (:data:`_SPEC_TYPES`), NULL only when the field may be None,
    and the field's default."""
    out: dict[str, MappedColumn[Any]] = {}
    for field, info in spec.model_fields.items():
        union = get_origin(info.annotation) in (Union, UnionType)
        kinds = [a for a in get_args(info.annotation) if a is not NoneType] if union else [info.annotation]
        kind = get_origin(kinds[0]) or kinds[0]
        if len(kinds) != 1 or kind not in _SPEC_TYPES or info.default_factory is not None:
            raise TypeError(f"{spec.__name__}.{field}: no column for {info.annotation} (default factory: "
                            f"{info.default_factory}); extend spec_columns")
        if kind is str:
            sql_type: TypeEngine[Any] = String(next((m.max_length for m in info.metadata
                                                     if hasattr(m, "max_length")), None))
        else:
            sql_type = _SPEC_TYPES[kind]()
        out[field] = mapped_column(sql_type, nullable=union and NoneType in get_args(info.annotation),
                                   default=None if info.is_required() else info.default)
    return out


def _add_spec_columns(row: type[Base], spec: type[BaseModel]) -> None:
    for field, column in spec_columns(spec).items():
        if field not in row.__table__.c:  # `name` is declared on ModelRow: the identity the queries use
            setattr(row, field, column)


_add_spec_columns(ModelRow, ModelSpec)


class ProfileRow(Base):
    """Ψ(h) of one model for one router version: the per-cluster error vector, with counts.

    No foreign key to ``models``: a profile may be computed before the model is registered.
    """

    __tablename__ = "model_profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200))
    router_version: Mapped[str] = mapped_column(String(64))  # fingerprint of the fitted router
    version: Mapped[int] = mapped_column(Integer, default=1)  # per (model, router_version)
    features: Mapped[list[Any]] = mapped_column(JSON)  # Ψ_k(h), one float per cluster
    counts: Mapped[list[Any]] = mapped_column(JSON)  # prompts behind each Ψ_k
    source: Mapped[str] = mapped_column(String(32))  # "validation" | "feedback" | "import" | ...
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("model_name", "router_version", "version"),
        Index(None, "router_version", "active"),
    )


class RequestRow(Base):
    """One request as logged by the background writer (``store.RequestLogWriter``).

    ``id`` is a row id the writer assigns once per submitted record (so a batch retried after
    an ambiguous failure is written once); ``request_id`` is the gateway's own request id
    (``req-<uuid4 hex>``, unique by construction: the id feedback addresses) and
    ``client_request_id`` the id the client sent, if any (``x-uniroute-client-request-id``; any
    client may send any id, so it identifies nothing). Rows logged before migration 0005 may carry
    a client-chosen ``request_id``, so ``request_id`` is indexed but not declared unique.
    """

    __tablename__ = "requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    client_request_id: Mapped[str | None] = mapped_column(String(128))
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    key_name: Mapped[str | None] = mapped_column(String(128))
    requested_model: Mapped[str] = mapped_column(String(200))
    routed_model: Mapped[str | None] = mapped_column(String(200))
    cluster: Mapped[int | None] = mapped_column(Integer)
    lam: Mapped[float | None] = mapped_column("lambda", Float)
    candidates: Mapped[list[Any] | None] = mapped_column(JSON)  # top-k {model, expected_error, cost, objective}
    attempts: Mapped[list[Any] | None] = mapped_column(JSON)  # [{model, status, error_type, latency_ms}]
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    upstream_latency_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    status_code: Mapped[int] = mapped_column(Integer)
    error_type: Mapped[str | None] = mapped_column(String(64))
    stream: Mapped[bool] = mapped_column(Boolean)
    endpoint: Mapped[str] = mapped_column(String(16), default="chat", server_default="chat")  # chat, responses, ...
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    prompt_text: Mapped[str | None] = mapped_column(Text)  # only when database.store_prompts is on
    # the provider's usage was impossible (negative, or far beyond the request's bound): the counted figure is logged
    usage_corrected: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())

    __table_args__ = (
        Index(None, "key_id", "started_at"),
        Index(None, "started_at"),
        Index(None, "routed_model", "started_at"),
    )


class Feedback(Base):
    """A quality signal for one request (e.g. thumbs up/down as 1/0): at most one per request.

    No foreign key to ``requests``: request rows are written asynchronously, so feedback can
    arrive before its request row is flushed. ``request_id`` is unique: the request's own key
    may rate it once (a repeat is 409), whatever it sends.
    """

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), index=True, unique=True)
    key_id: Mapped[int | None] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)  # in [0, 1]
    source: Mapped[str] = mapped_column(String(32), default="user")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (CheckConstraint("score >= 0 AND score <= 1", name="score_range"),)


class ProfileOutcome(Base):
    """One graded (or failed) answer of a model to one validation prompt, stored as it arrives.

    Profiling resumes from these rows: a prompt with a score is not asked again. ``score`` is
    None for a failure (``error`` says why), which never counts as a wrong answer.
    """

    __tablename__ = "profile_outcomes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200))
    router_version: Mapped[str] = mapped_column(String(64))  # the artifact version the prompts belong to
    prompt_id: Mapped[str] = mapped_column(String(128))
    cluster: Mapped[int] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)
    answer: Mapped[str | None] = mapped_column(Text)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("model_name", "router_version", "prompt_id"),)


class Lease(Base):
    """A named lease: at most one holder until ``expires_at`` (e.g. the re-profiling job)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime]
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReprofileRun(Base):
    """One run of the re-profiling job and its drift report (``GET /admin/reprofile/last``)."""

    __tablename__ = "reprofile_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    router_version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    report: Mapped[dict[str, Any]] = mapped_column(JSON)  # {models: {...}, drift: [...]}


class TenantProfile(Base):
    """One key's labels for one model on one router (its tenant-private profile overlay, docs/ROUTING_FEATURES.md).

    Stored as sufficient statistics per cluster k: ``counts[k]`` = Σ z_k(x) and ``errors[k]`` = Σ z_k(x)·(1 − s)
    over the key's labelled prompts x with score s for this model (z: the router's membership); with
    ``profiling.tenant_feedback`` the re-profiling pass adds a ``feedback`` row from the key's own feedback
    (one-hot on the request's cluster). The overlay sums a key's rows of both sources. The gateway
    shrinks them toward the global Ψ when it routes for this key only: Ψ'_k = (errors_k + m·Ψ_k) / (counts_k + m).
    No foreign key to ``api_keys`` (keys are revoked, never deleted; like ``feedback.key_id``).
    """

    __tablename__ = "tenant_profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[int] = mapped_column(Integer, index=True)
    router_version: Mapped[str] = mapped_column(String(64))  # the profile key: artifact version + variant
    model_name: Mapped[str] = mapped_column(String(200))
    errors: Mapped[list[Any]] = mapped_column(JSON)  # Σ z_k·(1 − score), one float per cluster
    counts: Mapped[list[Any]] = mapped_column(JSON)  # Σ z_k, one float per cluster
    labels: Mapped[int] = mapped_column(Integer)  # labelled prompts with a score for this model
    source: Mapped[str] = mapped_column(String(32), default="labels")  # "labels" (uploaded) | "feedback" (its own)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("key_id", "router_version", "model_name", "source"),)


class ModelImpact(Base):
    """One impact report of profiling a model (docs/IMPACT.md): what activating it was predicted to change, the
    profile it would activate while it waits (``status`` ``reported``), and, once it serves (``activated``), the
    follow-up with the realised figures from the request log and feedback.

    ``profiles`` holds every variant's Ψ and counts (``{variant: {"psi", "counts"}}``) so that a second call
    activates exactly what was reported, without grading again, when ``fingerprint`` (the graded outcomes and
    the router cost it came from) still matches. ``inputs`` keeps what the prediction was computed from (pool,
    costs, traffic mix) so that the follow-up can predict at the λ the traffic really had.
    """

    __tablename__ = "model_impacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(200), index=True)
    artifact_version: Mapped[str] = mapped_column(String(64))  # the router artifact the profile belongs to
    variant: Mapped[str] = mapped_column(String(32))  # the router variant the report was computed for
    status: Mapped[str] = mapped_column(String(16))  # reported | activated | superseded
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of the graded outcomes + router cost
    source: Mapped[str] = mapped_column(String(32))  # the profile source to activate with (validation[-partial])
    profiles: Mapped[dict[str, Any]] = mapped_column(JSON)  # {variant: {"psi": [...], "counts": [...]}}
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # ImpactReport.as_dict(); None: no report
    report_error: Mapped[str | None] = mapped_column(String(512))  # why there is no report
    inputs: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {pool: [...], candidate_cost, traffic}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    activated_at: Mapped[datetime | None] = mapped_column(index=True)
    followup: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the realised figures against the predicted
    followup_at: Mapped[datetime | None]
