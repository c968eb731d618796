"""The model catalog's SQL: the ``models`` and ``model_profiles`` tables, the registry's source of truth.

- Rows ↔ :class:`gateway.spec.ModelSpec`, derived from the spec's fields (:func:`row_values`,
  :func:`spec_from_row`); the summaries the admin API and the CLI show (:func:`model_summary`).
- CRUD of registry rows (admin API and ``uniroute models``) and the seed of the config's models
  (:func:`seed_models`). ``litellm_params`` are stored as written: ``os.environ/NAME`` references stay
  references and are resolved only in memory, when a replica builds its registry entries.
- Profiles Ψ(h), versioned per (model, router key): a new row per version, the previous kept
  with ``active = false``, exactly one active. The router key is ``"<artifact version>:<variant>"``
  (the membership z(x), hence Ψ, differs per variant).
- :class:`TableModelSource`: the registry poller's source (``gateway/serving/registry_sync.py``): a
  cheap change token (row counts, max ``updated_at``, version sums, max profile id) and every enabled
  model with its active Ψ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from pydantic import ValidationError

from gateway.config import mask_secrets
from gateway.errors import ConflictError, NotFoundError, validation_message
from gateway.secrets import MASK, TABLE_PLACEHOLDER
from gateway.spec import SPEC_FIELDS, ModelSpec, StoredModel
from gateway.store.engine import Store
from gateway.store.tables import ModelRow, ProfileRow, utcnow

logger = logging.getLogger("uniroute.catalog")


def profile_key(artifact_version: str, variant: str) -> str:
    """The ``model_profiles.router_version`` a profile belongs to: artifact version + variant."""
    return f"{artifact_version}:{variant}"


# --------------------------------------------------------------------------------- row ↔ spec
def row_values(spec: ModelSpec) -> dict[str, Any]:
    """The ``models`` columns of ``spec`` (one per spec field)."""
    return spec.model_dump()


def spec_from_row(row: ModelRow) -> ModelSpec:
    """The spec a row holds (validated: a row written around the API fails here, with a ValidationError)."""
    return ModelSpec.model_validate({f: getattr(row, f) for f in SPEC_FIELDS})


def params_for_table(params: Mapping[str, Any]) -> dict[str, Any]:
    """litellm_params as the config seed writes them: ``os.environ/NAME`` references stay, any other value
    that looks secret, however nested, is replaced by a placeholder, so no secret of config.yaml reaches the
    database. The serving gateway keeps the real values in memory (:func:`gateway.secrets.restore`)."""
    return mask_secrets(params, TABLE_PLACEHOLDER)


def _redacted(params: Mapping[str, Any]) -> dict[str, Any]:
    """litellm params for display: env references shown, secrets masked wherever they are nested."""
    return mask_secrets(params, MASK)


def model_summary(row: ModelRow, profile: ProfileRow | None = None) -> dict[str, Any]:
    """A row as the admin API and ``uniroute models list --json`` show it: every spec field (literal
    secrets masked), its state, and its active profile."""
    spec = {f: getattr(row, f) for f in SPEC_FIELDS}
    return {
        **spec, "litellm_params": _redacted(spec["litellm_params"]),
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
            row = ModelRow(**row_values(spec), enabled=True, source="admin", version=1)
            s.add(row)
            s.flush()
            return row
    except sa.exc.IntegrityError:
        raise ConflictError(f"model {spec.name!r} already exists", param="name", code="model_exists") from None


def update_model(store: Store, name: str, changes: Mapping[str, Any]) -> ModelRow:
    """Apply ``changes`` (from :func:`gateway.spec.parse_patch`: spec fields and ``enabled``); the version is
    bumped when anything changed."""
    with store.session() as s:
        row = _get(s, name)
        changed = False
        for f, v in changes.items():
            if getattr(row, f) != v:
                setattr(row, f, v)
                changed = True
        if changed:
            row.version += 1
            row.updated_at = utcnow()
        return row


def set_enabled(store: Store, name: str, enabled: bool) -> ModelRow:
    return update_model(store, name, {"enabled": enabled})


def set_routable(store: Store, name: str, routable: bool) -> ModelRow:
    return update_model(store, name, {"routable": routable})


def remove_model(store: Store, name: str) -> ModelRow:
    """Delete the row (its profiles stay, inactive history). A ``config`` model returns at the next start
    unless it is also removed from config.yaml."""
    with store.session() as s:
        row = _get(s, name)
        s.delete(row)
        return row


def seed_models(store: Store, specs: Iterable[ModelSpec]) -> int:
    """Upsert ``source='config'`` rows from the config's models; returns the rows added or changed.

    ``litellm_params`` go through :func:`params_for_table` (references kept, literal secrets masked). Rows
    added through the admin API (``source='admin'``) are left alone.
    """
    changed = 0
    with store.session() as s:
        existing = {m.name: m for m in s.scalars(sa.select(ModelRow))}
        for spec in specs:
            values = {**row_values(spec), "litellm_params": params_for_table(spec.litellm_params)}
            row = existing.get(spec.name)
            if row is None:
                s.add(ModelRow(**values, source="config", enabled=True, version=1))
                changed += 1
            elif row.source == "config" and any(getattr(row, f) != v for f, v in values.items()):
                for f, v in values.items():
                    setattr(row, f, v)
                row.version += 1
                row.updated_at = utcnow()
                changed += 1
    return changed


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


def load_models(store: Store, key: str | None) -> list[StoredModel]:
    """Every enabled model, with its active Ψ for ``key`` (None: no profiles, e.g. the cheapest policy).
    A row that is not a valid spec (written around the API) is left out, and logged."""
    profiles = active_profiles(store, key) if key is not None else {}
    out = []
    for row in list_models(store):
        if not row.enabled:
            continue
        try:
            spec = spec_from_row(row)
        except ValidationError as exc:
            logger.error("registry: %s; model left out", validation_message(exc, f"model {row.name!r}",
                                                                               ", ".join(SPEC_FIELDS)))
            continue
        prof = profiles.get(row.name)
        out.append(StoredModel(spec, None if prof is None else prof.psi, int(row.created_at.timestamp())))
    return out


class TableModelSource:
    """The ``models`` and ``model_profiles`` tables as the registry poller's source (profiles of ``key``)."""

    def __init__(self, store: Store, key: str | None) -> None:
        self.store = store
        self.key = key

    def change_token(self) -> tuple[Any, ...]:
        return change_token(self.store, self.key)

    def load_models(self) -> list[StoredModel]:
        return load_models(self.store, self.key)
