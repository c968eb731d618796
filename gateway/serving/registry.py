"""The in-memory model registry: which models the gateway serves and how to reach them.

A :class:`Registry` holds one immutable :class:`RegistrySnapshot`. Readers take the
current snapshot (one attribute read, no lock); a refresh builds a whole new snapshot
and swaps it in with :meth:`Registry.replace`, so a request never sees half an update.
The first snapshot comes from ``config.yaml``; from then on the registry poller
(``gateway/serving/registry_sync.py``) replaces it with the ``models`` table's entries.

Every :class:`ModelEntry` is built from a :class:`gateway.spec.ModelSpec` by
:meth:`ModelEntry.from_spec`, the one place that resolves ``os.environ/NAME`` references.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from gateway.config import GatewayConfig, resolve_env_refs
from gateway.secrets import restore
from gateway.spec import ModelSpec
from routing.policy import PoolModel

#: Seconds to establish the TCP (and TLS) connection to a provider when the model sets none.
DEFAULT_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ModelEntry:
    """One served model. ``litellm_params`` never leaves the process (it may hold an API key)."""

    name: str
    litellm_params: Mapping[str, Any]  # model, api_base, api_key, ... (env refs already resolved)
    input_cost_per_token: float  # USD
    output_cost_per_token: float  # USD
    router_cost: float  # c(h) > 0
    timeout_s: float
    routable: bool = True
    psi: np.ndarray | None = field(default=None, compare=False)  # per-cluster error profile, once profiled
    created: int = 0  # unix seconds, for /v1/models
    connect_timeout_s: float | None = None  # None: DEFAULT_CONNECT_TIMEOUT_S (at most timeout_s)
    first_token_timeout_s: float | None = None  # streams; None: timeout_s
    max_output_tokens: int | None = None  # the most completion tokens of one answer; None: unknown here
    spec: ModelSpec | None = field(default=None, compare=False, repr=False)  # what it was built from (as written)
    kind: str = "chat"  # chat or embedding (gateway.spec.MODEL_KINDS): an embedding model is never routed

    @property
    def connect_timeout(self) -> float:
        return min(self.connect_timeout_s or DEFAULT_CONNECT_TIMEOUT_S, self.timeout_s)

    @property
    def first_token_timeout(self) -> float:
        return min(self.first_token_timeout_s or self.timeout_s, self.timeout_s)

    @property
    def litellm_model(self) -> str:
        return str(self.litellm_params["model"])

    @property
    def owned_by(self) -> str:
        model = self.litellm_model
        return model.split("/", 1)[0] if "/" in model else "uniroute"

    @classmethod
    def from_spec(cls, spec: ModelSpec, psi: np.ndarray | None = None, created: int = 0) -> ModelEntry:
        """The served model of ``spec``, with its Ψ and creation time. Puts back config.yaml's secrets that the
        table holds masked (:func:`gateway.secrets.restore`), resolves ``os.environ/NAME`` references and
        decrypts ``encrypted/…`` values (a ``ValueError`` names an unset variable, an undecryptable value or a
        placeholder that would otherwise be sent)."""
        params = resolve_env_refs(restore(spec.name, spec.litellm_params), f"model {spec.name!r}: litellm_params")
        return cls(
            name=spec.name,
            litellm_params=MappingProxyType(params),
            input_cost_per_token=spec.input_cost_per_1m / 1e6,
            output_cost_per_token=spec.output_cost_per_1m / 1e6,
            router_cost=spec.router_cost,
            timeout_s=spec.timeout_s,
            routable=spec.routable,
            psi=psi,
            created=created,
            connect_timeout_s=spec.connect_timeout_s,
            first_token_timeout_s=spec.first_token_timeout_s,
            max_output_tokens=spec.max_output_tokens,
            spec=spec,
            kind=spec.kind,
        )

    def to_pool_model(self) -> PoolModel:
        return PoolModel(name=self.name, cost=self.router_cost, psi=self.psi)


@dataclass(frozen=True)
class RegistrySnapshot:
    entries: tuple[ModelEntry, ...]
    by_name: Mapping[str, ModelEntry]
    pool: tuple[PoolModel, ...]  # routable models, as the policy sees them
    names: tuple[str, ...]

    @classmethod
    def build(cls, entries: Iterable[ModelEntry]) -> RegistrySnapshot:
        items = tuple(entries)
        by_name: dict[str, ModelEntry] = {}
        for e in items:
            if e.name in by_name:
                raise ValueError(f"model name {e.name!r} appears twice in the registry")
            by_name[e.name] = e
        pool = tuple(e.to_pool_model() for e in items if e.routable and e.kind == "chat")
        return cls(entries=items, by_name=MappingProxyType(by_name), pool=pool, names=tuple(by_name))


class Registry:
    """The current snapshot of served models, replaceable as a whole."""

    def __init__(self, entries: Iterable[ModelEntry] = ()) -> None:
        self._snapshot = RegistrySnapshot.build(entries)
        self._listeners: list[Callable[[RegistrySnapshot], None]] = []

    @classmethod
    def from_config(cls, config: GatewayConfig, created: int = 0) -> Registry:
        return cls(ModelEntry.from_spec(m, created=created) for m in config.models)

    @property
    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot

    def get(self, name: str) -> ModelEntry | None:
        return self._snapshot.by_name.get(name)

    def names(self) -> tuple[str, ...]:
        return self._snapshot.names

    def pool(self) -> tuple[PoolModel, ...]:
        return self._snapshot.pool

    def __len__(self) -> int:
        return len(self._snapshot.entries)

    def on_replace(self, listener: Callable[[RegistrySnapshot], None]) -> None:
        """Call ``listener(snapshot)`` now and after every :meth:`replace` (e.g. to register prices)."""
        self._listeners.append(listener)
        listener(self._snapshot)

    def replace(self, entries: Iterable[ModelEntry]) -> RegistrySnapshot:
        snapshot = RegistrySnapshot.build(entries)
        for listener in self._listeners:
            listener(snapshot)
        self._snapshot = snapshot
        return snapshot


def with_profiles(entries: Iterable[ModelEntry], profiles: Mapping[str, np.ndarray]) -> list[ModelEntry]:
    """``entries`` with their Ψ from ``profiles`` (None for a model without one: never chosen by ``auto``)."""
    return [dataclasses.replace(e, psi=profiles.get(e.name)) for e in entries]
