"""What a model is: :class:`ModelSpec`, the one definition of a registry entry, and what derives from it.

A model entry is written in four places — ``config.yaml``'s ``models:``, ``POST /admin/models``,
``uniroute models add`` and a row of the ``models`` table — and all four are a :class:`ModelSpec`.
Everything else is derived from its fields, never written out again:

- :data:`ModelPatch` (``PATCH /admin/models/{name}``, ``uniroute models update``): the same fields
  but ``name``, all optional, plus ``enabled``;
- the ``models`` table's columns for them and the row ↔ spec conversion (``gateway/store/tables.py``,
  ``gateway/store/models.py``), the config seed and the admin summaries;
- the CLI flags (``gateway/cli/models.py``);
- the registry's runtime entry (``gateway/serving/registry.py``: ``ModelEntry.from_spec``).

``litellm_params`` is kept as written: ``os.environ/NAME`` references are resolved only when a registry
entry is built. Adding a field: declare it here, write the migration adding its column, extend the tests
(``tests/test_spec.py`` checks every place above mechanically).

Layer-free: this module imports pydantic and :mod:`gateway.errors` only, so every layer may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model

from gateway.errors import InvalidRequestError, validation_message

if TYPE_CHECKING:
    import numpy as np

#: Model names clients may not use: ``auto`` asks the gateway to route.
RESERVED_NAMES = frozenset({"auto"})
#: Longest model name (the ``models.name`` column).
NAME_MAX_LENGTH = 200


def _not_reserved(name: str) -> str:
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} is reserved for routing; pick another model name")
    return name


def _has_model(params: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(params.get("model"), str) or not params["model"]:
        raise ValueError("litellm_params.model is required (litellm_params needs 'model', the LiteLLM model to "
                         "call, e.g. 'openai/gpt-4o-mini')")
    return params


class _Strict(BaseModel):
    """Unknown fields and non-finite numbers (NaN, ±inf) are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSpec(_Strict):
    """One model entry: a name clients use, how LiteLLM reaches it, its prices, router cost and timeouts."""

    name: Annotated[str, Field(min_length=1, max_length=NAME_MAX_LENGTH), AfterValidator(_not_reserved)] = Field(
        description="the name clients ask for (not 'auto')")
    litellm_params: Annotated[dict[str, Any], AfterValidator(_has_model)] = Field(
        description="how LiteLLM reaches it: model (required, e.g. openai/gpt-4o-mini), api_base, api_key "
                    "(best as a reference: os.environ/NAME), ...")
    input_cost_per_1m: float = Field(default=0.0, ge=0.0, description="USD per 1M prompt tokens")
    output_cost_per_1m: float = Field(default=0.0, ge=0.0, description="USD per 1M completion tokens")
    router_cost: float = Field(gt=0.0, description="the router's cost scalar c(h) > 0")
    timeout_s: float = Field(default=60.0, gt=0.0,
                             description="seconds for the whole call (a stream: until its last chunk)")
    connect_timeout_s: float | None = Field(default=None, gt=0.0,
                                            description="seconds to connect (TCP/TLS); default 5 (at most timeout_s)")
    first_token_timeout_s: float | None = Field(default=None, gt=0.0,
                                                description="streams: seconds until the first chunk; default timeout_s")
    routable: bool = Field(default=True, description="may `auto` pick it (once profiled)?")


def _all_optional(name: str, spec: type[BaseModel], *, leave_out: frozenset[str],
                  **extra: Any) -> type[_Strict]:
    """``spec``'s fields (but ``leave_out``) with their constraints, each optional (None: unchanged), + ``extra``."""
    fields: dict[str, Any] = {}
    for field, info in spec.model_fields.items():
        if field in leave_out:
            continue
        annotation: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[field] = (annotation | None, Field(default=None, description=info.description))
    return create_model(name, __base__=_Strict, __doc__=f"A change to a {spec.__name__}: any of its fields.",
                        **fields, **extra)


#: The fields a model update may change: every spec field but ``name`` (all optional), and ``enabled``.
ModelPatch = _all_optional("ModelPatch", ModelSpec, leave_out=frozenset({"name"}),
                           enabled=(bool | None, Field(default=None, description="serve it (false: disabled)")))

#: The spec's fields, in declaration order.
SPEC_FIELDS: tuple[str, ...] = tuple(ModelSpec.model_fields)
PATCH_FIELDS: tuple[str, ...] = tuple(ModelPatch.model_fields)


def parse_spec(data: Any) -> ModelSpec:
    """A :class:`ModelSpec` from a request body or CLI flags; otherwise a 400 naming the invalid fields and the
    valid ones (:func:`gateway.errors.validation_message`)."""
    if not isinstance(data, dict):
        raise InvalidRequestError(f"a model must be a JSON object with the fields {', '.join(SPEC_FIELDS)}")
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequestError(validation_message(exc, "model", ", ".join(SPEC_FIELDS))) from None


def parse_patch(data: Any) -> dict[str, Any]:
    """The changes a :data:`ModelPatch` body asks for (field → new value; None and absent fields: unchanged)."""
    if not isinstance(data, dict):
        raise InvalidRequestError(f"a model update must be a JSON object with any of the fields "
                                  f"{', '.join(PATCH_FIELDS)}")
    try:
        return ModelPatch.model_validate(data).model_dump(exclude_none=True)
    except ValidationError as exc:
        raise InvalidRequestError(validation_message(exc, "model update", ", ".join(PATCH_FIELDS))) from None


@dataclass(frozen=True)
class StoredModel:
    """A spec as the store holds it, with what the registry adds: its active Ψ and when it was created."""

    spec: ModelSpec
    psi: np.ndarray | None = None  # per-cluster error profile for the router key; None: not profiled
    created: int = 0  # unix seconds
