"""The live model catalog: the ``models`` and ``model_profiles`` tables as the registry's source of truth.

- CRUD of registry rows (admin API and ``uniroute models``). ``litellm_params`` are stored as
  written: ``os.environ/NAME`` references stay references and are resolved only in memory
  when a replica builds its :class:`gateway.serving.registry.Registry`.
- Profiles Ψ(h), versioned per (model, router key): a new row per version, the previous kept
  with ``active = false``, exactly one active. The router key is ``"<artifact version>:<variant>"``
  (the membership z(x), hence Ψ, differs per variant).
- :class:`RegistryPoller`: every replica re-reads both tables every ``registry.poll_interval_s``
  when a cheap change token (row counts, max ``updated_at``, version sums, max profile id)
  moved, and swaps a whole new snapshot into the registry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.config import mask_secrets, resolve_env_refs
from gateway.errors import ConflictError, InvalidRequestError, NotFoundError
from gateway.serving import registry as reg
from gateway.store.engine import Store
from gateway.store.tables import ModelRow, ProfileRow, utcnow
from gateway.tasks import cancel_and_wait

logger = logging.getLogger("uniroute.catalog")


def profile_key(artifact_version: str, variant: str) -> str:
    """The ``model_profiles.router_version`` a profile belongs to: artifact version + variant."""
    return f"{artifact_version}:{variant}"


# ------------------------------------------------------------------------------ model specs
class ModelSpec(BaseModel):
    """A registry entry as the admin API and the CLI accept it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    litellm_params: dict[str, Any]
    input_cost_per_1m: float = Field(default=0.0, ge=0.0)
    output_cost_per_1m: float = Field(default=0.0, ge=0.0)
    router_cost: float = Field(gt=0.0)
    timeout_s: float = Field(default=60.0, gt=0.0)
    connect_timeout_s: float | None = Field(default=None, gt=0.0)
    first_token_timeout_s: float | None = Field(default=None, gt=0.0)
    routable: bool = True

    @field_validator("litellm_params")
    @classmethod
    def _has_model(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(v.get("model"), str) or not v["model"]:
            raise ValueError("litellm_params needs 'model' (e.g. 'openai/gpt-4o-mini')")
        return v


class ModelPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    litellm_params: dict[str, Any] | None = None
    input_cost_per_1m: float | None = Field(default=None, ge=0.0)
    output_cost_per_1m: float | None = Field(default=None, ge=0.0)
    router_cost: float | None = Field(default=None, gt=0.0)
    timeout_s: float | None = Field(default=None, gt=0.0)
    connect_timeout_s: float | None = Field(default=None, gt=0.0)
    first_token_timeout_s: float | None = Field(default=None, gt=0.0)
    routable: bool | None = None
    enabled: bool | None = None


SPEC_FIELDS = ("name, litellm_params, input_cost_per_1m, output_cost_per_1m, router_cost, timeout_s, "
               "connect_timeout_s, first_token_timeout_s, routable")
PATCH_FIELDS = ("litellm_params, input_cost_per_1m, output_cost_per_1m, router_cost, timeout_s, connect_timeout_s, "
                "first_token_timeout_s, routable, enabled")


def validation_message(exc: ValidationError, what: str, fields: str) -> str:
    parts = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
    return f"invalid {what}: " + "; ".join(parts) + f" (fields: {fields})"


def parse_spec(data: Any) -> ModelSpec:
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequestError(validation_message(exc, "model", SPEC_FIELDS)) from None


def parse_patch(data: Any) -> ModelPatch:
    try:
        patch = ModelPatch.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequestError(validation_message(exc, "model update", PATCH_FIELDS)) from None
    if patch.litellm_params is not None and not patch.litellm_params.get("model"):
        raise InvalidRequestError("litellm_params needs 'model'", param="litellm_params")
    return patch


def _redacted(params: Mapping[str, Any]) -> dict[str, Any]:
    """litellm params for display: env references shown, literal secrets masked."""
    return mask_secrets(params, "***")


def model_summary(row: ModelRow, profile: ProfileRow | None = None) -> dict[str, Any]:
    return {
        "name": row.name, "litellm_params": _redacted(row.litellm_params),
        "input_cost_per_1m": row.input_cost_per_1m, "output_cost_per_1m": row.output_cost_per_1m,
        "router_cost": row.router_cost, "timeout_s": row.timeout_s, "connect_timeout_s": row.connect_timeout_s,
        "first_token_timeout_s": row.first_token_timeout_s, "routable": row.routable,
        "enabled": row.enabled, "source": row.source, "version": row.version,
        "created_at": row.created_at.isoformat(), "updated_at": row.updated_at.isoformat(),
        "profile": None if profile is None else profile_summary(profile),
    }


def profile_summary(p: ProfileRow) -> dict[str, Any]:
    return {"version": p.version, "router": p.router_version, "source": p.source, "active": p.active,
            "created_at": p.created_at.isoformat(), "psi": [float(v) for v in p.features],
            "counts": [round(float(v), 3) for v in p.counts]}


# ------------------------------------------------------------------------------------ CRUD
def _known(s: Any) -> str:
    names = list(s.scalars(sa.select(ModelRow.name).order_by(ModelRow.name)))
    return ", ".join(names) or "none"


def _get(s: Any, name: str) -> ModelRow:
    row = s.scalars(sa.select(ModelRow).where(ModelRow.name == name)).one_or_none()
    if row is None:
        raise NotFoundError(f"unknown model {name!r}; known: {_known(s)}", param="name", code="model_not_found")
    return row


def list_models(store: Store) -> list[ModelRow]:
    with store.session() as s:
        return list(s.scalars(sa.select(ModelRow).order_by(ModelRow.name)))


def get_model(store: Store, name: str) -> ModelRow:
    with store.session() as s:
        return _get(s, name)


def add_model(store: Store, spec: ModelSpec) -> ModelRow:
    try:
        with store.session() as s:
            if s.scalars(sa.select(ModelRow.id).where(ModelRow.name == spec.name)).first() is not None:
                raise ConflictError(f"model {spec.name!r} already exists; update it with PATCH /admin/models/"
                                    f"{spec.name} (or `uniroute models update`)", param="name", code="model_exists")
            row = ModelRow(name=spec.name, litellm_params=dict(spec.litellm_params),
                           input_cost_per_1m=spec.input_cost_per_1m, output_cost_per_1m=spec.output_cost_per_1m,
                           router_cost=spec.router_cost, timeout_s=spec.timeout_s,
                           connect_timeout_s=spec.connect_timeout_s,
                           first_token_timeout_s=spec.first_token_timeout_s, routable=spec.routable,
                           enabled=True, source="admin", version=1)
            s.add(row)
            s.flush()
            return row
    except sa.exc.IntegrityError:
        raise ConflictError(f"model {spec.name!r} already exists", param="name", code="model_exists") from None


def update_model(store: Store, name: str, patch: ModelPatch) -> ModelRow:
    with store.session() as s:
        row = _get(s, name)
        values = patch.model_dump(exclude_none=True)
        changed = False
        for f, v in values.items():
            if getattr(row, f) != v:
                setattr(row, f, v)
                changed = True
        if changed:
            row.version += 1
            row.updated_at = utcnow()
        return row


def set_enabled(store: Store, name: str, enabled: bool) -> ModelRow:
    return update_model(store, name, ModelPatch(enabled=enabled))


def set_routable(store: Store, name: str, routable: bool) -> ModelRow:
    return update_model(store, name, ModelPatch(routable=routable))


def remove_model(store: Store, name: str) -> ModelRow:
    """Delete the row (its profiles stay, inactive history). A ``config`` model returns at the next start
    unless it is also removed from config.yaml."""
    with store.session() as s:
        row = _get(s, name)
        s.delete(row)
        return row


# -------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class StoredProfile:
    model: str
    psi: np.ndarray
    counts: np.ndarray
    version: int
    source: str


def active_profiles(store: Store, key: str) -> dict[str, StoredProfile]:
    with store.session() as s:
        rows = s.scalars(sa.select(ProfileRow).where(ProfileRow.router_version == key, ProfileRow.active.is_(True)))
        return {r.model_name: StoredProfile(r.model_name, np.asarray(r.features, dtype=np.float64),
                                            np.asarray(r.counts, dtype=np.float64), r.version, r.source)
                for r in rows}


def active_profile_row(store: Store, name: str, key: str | None) -> ProfileRow | None:
    if key is None:
        return None
    with store.session() as s:
        return s.scalars(sa.select(ProfileRow).where(ProfileRow.model_name == name, ProfileRow.router_version == key,
                                                     ProfileRow.active.is_(True))).first()


def profile_history(store: Store, name: str, key: str | None = None) -> list[ProfileRow]:
    with store.session() as s:
        q = sa.select(ProfileRow).where(ProfileRow.model_name == name)
        if key is not None:
            q = q.where(ProfileRow.router_version == key)
        return list(s.scalars(q.order_by(ProfileRow.router_version, ProfileRow.version)))


def save_profile(store: Store, name: str, key: str, psi: Sequence[float] | np.ndarray,
                 counts: Sequence[float] | np.ndarray, source: str) -> int:
    """Store a new active version of ``name``'s profile; the previous one stays, inactive. Returns the version."""
    psi_l = [float(v) for v in psi]
    counts_l = [float(v) for v in counts]
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in psi_l):
        raise ValueError(f"profile of {name!r} must hold errors in [0, 1]")
    for attempt in range(5):
        try:
            with store.session() as s:
                last = s.scalar(sa.select(sa.func.max(ProfileRow.version))
                                .where(ProfileRow.model_name == name, ProfileRow.router_version == key)) or 0
                s.execute(sa.update(ProfileRow)
                          .where(ProfileRow.model_name == name, ProfileRow.router_version == key,
                                 ProfileRow.active.is_(True))
                          .values(active=False))
                s.add(ProfileRow(model_name=name, router_version=key, version=last + 1, features=psi_l,
                                 counts=counts_l, source=source, active=True))
                return int(last + 1)
        except sa.exc.IntegrityError:  # a concurrent writer took that version number
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def seed_profiles(store: Store, key: str, profiles: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Import profiles (e.g. the artifact's profiles.json) when the table has none for ``key``."""
    with store.session() as s:
        if s.scalar(sa.select(sa.func.count()).select_from(ProfileRow).where(ProfileRow.router_version == key)):
            return 0
        for name, (psi, counts) in sorted(profiles.items()):
            s.add(ProfileRow(model_name=name, router_version=key, version=1, features=[float(v) for v in psi],
                             counts=[float(v) for v in counts], source="import", active=True))
        return len(profiles)


# ------------------------------------------------------------------------ registry snapshot
def change_token(store: Store, key: str | None) -> tuple[Any, ...]:
    """Cheap: changes whenever a model row or an active profile for ``key`` changes."""
    with store.session() as s:
        m = s.execute(sa.select(sa.func.count(), sa.func.max(ModelRow.updated_at),
                                sa.func.coalesce(sa.func.sum(ModelRow.version), 0))).one()
        p: tuple[Any, ...] = ()
        if key is not None:
            p = tuple(s.execute(sa.select(sa.func.count(), sa.func.max(ProfileRow.id))
                                .where(ProfileRow.router_version == key, ProfileRow.active.is_(True))).one())
        return (*tuple(m), *p)


def resolve_params(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Resolve ``os.environ/NAME`` references of a stored model (the config's own resolver)."""
    return resolve_env_refs(dict(params), f"model {name!r}: litellm_params")


def entry_from_row(row: ModelRow, psi: np.ndarray | None = None, created: int = 0) -> reg.ModelEntry:
    return reg.ModelEntry(
        name=row.name, litellm_params=MappingProxyType(resolve_params(row.litellm_params, row.name)),
        input_cost_per_token=row.input_cost_per_1m / 1e6, output_cost_per_token=row.output_cost_per_1m / 1e6,
        router_cost=row.router_cost, timeout_s=row.timeout_s, routable=row.routable, psi=psi,
        connect_timeout_s=row.connect_timeout_s, first_token_timeout_s=row.first_token_timeout_s,
        created=int(row.created_at.timestamp()) if row.created_at else created,
    )


def load_entries(store: Store, key: str | None) -> list[reg.ModelEntry]:
    """Every enabled model, with its active Ψ for ``key`` (None: no profiles, e.g. the cheapest policy)."""
    profiles = active_profiles(store, key) if key is not None else {}
    out = []
    for row in list_models(store):
        if not row.enabled:
            continue
        prof = profiles.get(row.name)
        try:
            out.append(entry_from_row(row, None if prof is None else prof.psi))
        except ValueError as exc:
            logger.error("registry: %s; model left out", exc)
    return out


class RegistryPoller:
    """Keeps one replica's registry equal to the database, within ``interval_s``."""

    def __init__(self, store: Store, registry: reg.Registry, key: str | None, interval_s: float = 2.0) -> None:
        self.store = store
        self.registry = registry
        self.key = key
        self.interval_s = interval_s
        self._token: tuple[Any, ...] | None = None
        self._task: asyncio.Task[None] | None = None

    def refresh(self, force: bool = False) -> bool:
        """Re-read when the change token moved (blocking; call in a thread). True when replaced."""
        token = change_token(self.store, self.key)
        if token == self._token and not force:
            return False
        entries = load_entries(self.store, self.key)
        self.registry.replace(entries)
        self._token = token
        logger.info("registry: %d models (%d routable with a profile)", len(entries),
                    sum(1 for e in entries if e.routable and (self.key is None or e.psi is not None)))
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception as exc:  # the database may be briefly unreachable: keep the last snapshot
                logger.warning("registry poll failed (%s: %s); keeping the current models", type(exc).__name__, exc)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="registry-poller")

    async def aclose(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None


def with_profiles(entries: Iterable[reg.ModelEntry], profiles: Mapping[str, np.ndarray]) -> list[reg.ModelEntry]:
    return [dataclasses.replace(e, psi=profiles.get(e.name)) for e in entries]


# ------------------------------------------------------------------------------------- CLI
def _cli_store(args: Any) -> Store:
    from gateway.store.engine import database_url_from_config

    store = Store(database_url_from_config(getattr(args, "config", None)))
    store.upgrade()
    return store


def _print_rows(rows: Sequence[ModelRow], as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps([model_summary(r) for r in rows], indent=1))
        return
    print(f"{'name':32} {'enabled':7} {'routable':8} {'router_cost':>11} {'$/1M in':>9} {'$/1M out':>9} "
          f"{'source':6} model")
    for r in rows:
        print(f"{r.name:32} {r.enabled!s:7} {r.routable!s:8} {r.router_cost:11.4g} {r.input_cost_per_1m:9.4g} "
              f"{r.output_cost_per_1m:9.4g} {r.source:6} {r.litellm_params.get('model')}")


def _params_from_args(args: Any) -> dict[str, Any] | None:
    import json

    if getattr(args, "litellm_params", None):
        params = json.loads(args.litellm_params)
        if not isinstance(params, dict):
            raise SystemExit("--litellm-params must be a JSON object")
    else:
        params = {}
    for attr, key in (("litellm_model", "model"), ("api_base", "api_base"), ("api_key", "api_key")):
        v = getattr(args, attr, None)
        if v is not None:
            params[key] = v
    return params or None


def _run_cli(args: Any, fn: Any) -> int:
    import sys

    from gateway.errors import GatewayError

    store = _cli_store(args)
    try:
        return int(fn(store) or 0)
    except GatewayError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.dispose()


def models_list_command(args: Any) -> int:
    return _run_cli(args, lambda store: _print_rows(list_models(store), args.json))


def models_add_command(args: Any) -> int:
    def run(store: Store) -> None:
        spec = parse_spec({"name": args.name, "litellm_params": _params_from_args(args) or {},
                           "input_cost_per_1m": args.input_cost_per_1m or 0.0,
                           "output_cost_per_1m": args.output_cost_per_1m or 0.0,
                           "router_cost": args.router_cost, "timeout_s": args.timeout_s or 60.0,
                           "connect_timeout_s": args.connect_timeout_s,
                           "first_token_timeout_s": args.first_token_timeout_s,
                           "routable": not args.not_routable})
        _print_rows([add_model(store, spec)], False)

    return _run_cli(args, run)


def models_update_command(args: Any) -> int:
    def run(store: Store) -> None:
        data: dict[str, Any] = {k: getattr(args, k) for k in ("input_cost_per_1m", "output_cost_per_1m",
                                                              "router_cost", "timeout_s", "connect_timeout_s",
                                                              "first_token_timeout_s")
                                if getattr(args, k) is not None}
        params = _params_from_args(args)
        if params is not None:
            current = dict(get_model(store, args.name).litellm_params)
            data["litellm_params"] = params if getattr(args, "litellm_params", None) else {**current, **params}
        if args.routable is not None:
            data["routable"] = args.routable == "true"
        if args.enable:
            data["enabled"] = True
        _print_rows([update_model(store, args.name, parse_patch(data))], False)

    return _run_cli(args, run)


def models_disable_command(args: Any) -> int:
    return _run_cli(args, lambda store: _print_rows([set_enabled(store, args.name, False)], False))


def models_remove_command(args: Any) -> int:
    def run(store: Store) -> None:
        row = remove_model(store, args.name)
        print(f"removed {row.name}" + (" (a config model: remove it from config.yaml too, or it returns at the "
                                       "next start)" if row.source == "config" else ""))

    return _run_cli(args, run)
