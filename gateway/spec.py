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

import math
import re
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
#: The characters of a model name: an ASCII letter or digit, then letters, digits and ``. _ : / @ + -``
#: (so ``openai/gpt-4o-mini``, ``llama3.1:8b``, ``org/model@v2`` are names; spaces, control characters,
#: NUL and anything beyond ASCII are not). A name is echoed in the ``x-uniroute-model`` response header,
#: in URLs (``/admin/models/{name}``), metric labels and database columns, and this set is safe in all.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]*")
MODEL_NAME_RULE = (f"1-{NAME_MAX_LENGTH} characters: an ASCII letter or digit, then ASCII letters, digits "
                   "and . _ : / @ + -")
#: Bounds of a model's numbers (finite, and far beyond any real value): USD per 1M tokens, the router cost,
#: and seconds for a timeout (asyncio and httpx refuse timeouts beyond a few hundred years).
MAX_PRICE_PER_1M = 1e6
MAX_ROUTER_COST = 1e9
MAX_TIMEOUT_S = 86_400.0
#: Bound of a model's ``max_output_tokens`` (far beyond any real model's).
MAX_OUTPUT_TOKENS = 100_000_000
#: How deep ``litellm_params`` may nest (objects and lists), and the longest string in it.
PARAMS_MAX_DEPTH = 16
PARAMS_MAX_STRING = 65_536


def model_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid model name (None: it is one); see :data:`MODEL_NAME_PATTERN`."""
    if not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX_LENGTH or not MODEL_NAME_PATTERN.fullmatch(name):
        return f"invalid model name {str(name)[:80]!r}: {MODEL_NAME_RULE}"
    return None


def _valid_name(name: str) -> str:
    problem = model_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


def _not_reserved(name: str) -> str:
    if name in RESERVED_NAMES:
        raise ValueError(f"{name!r} is reserved for routing; pick another model name")
    return name


def _json_safe(value: Any, where: str = "litellm_params", depth: int = 0) -> None:
    """Refuse what no database column or provider call can take: deep nesting, non-string keys, NaN/±inf,
    NUL characters and huge strings (ValueError naming where)."""
    if depth > PARAMS_MAX_DEPTH:
        raise ValueError(f"{where[:60]}...: nested deeper than {PARAMS_MAX_DEPTH} levels")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be strings, got {k!r}")
            _json_safe(k, f"{where} key", depth + 1)
            _json_safe(v, f"{where}.{k[:40]}", depth + 1)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _json_safe(v, f"{where}[{i}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: numbers must be finite, got {value}")
    elif isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where}: NUL characters are not allowed")
        if len(value) > PARAMS_MAX_STRING:
            raise ValueError(f"{where}: strings are at most {PARAMS_MAX_STRING} characters")
    elif value is not None and not isinstance(value, bool | int | float):
        raise ValueError(f"{where}: {type(value).__name__} is not a JSON value")


def _params_safe(params: dict[str, Any]) -> dict[str, Any]:
    _json_safe(params)
    return params


#: What a model serves: ``chat`` (chat completions, Responses, Messages; the only kind ``auto`` routes to)
#: or ``embedding`` (``/v1/embeddings``, by name only).
MODEL_KINDS = ("chat", "embedding")


def _valid_kind(kind: str) -> str:
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MODEL_KINDS)}; got {kind[:40]!r}")
    return kind


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

    name: Annotated[str, Field(min_length=1, max_length=NAME_MAX_LENGTH), AfterValidator(_valid_name),
                    AfterValidator(_not_reserved)] = Field(
        description="the name clients ask for (not 'auto'): an ASCII letter or digit, then ASCII letters, digits "
                    "and . _ : / @ + -")
    litellm_params: Annotated[dict[str, Any], AfterValidator(_has_model), AfterValidator(_params_safe)] = Field(
        description="how LiteLLM reaches it: model (required, e.g. openai/gpt-4o-mini), api_base, api_key "
                    "(best as a reference: os.environ/NAME), ...")
    input_cost_per_1m: float = Field(default=0.0, ge=0.0, le=MAX_PRICE_PER_1M, description="USD per 1M prompt tokens")
    output_cost_per_1m: float = Field(default=0.0, ge=0.0, le=MAX_PRICE_PER_1M,
                                      description="USD per 1M completion tokens")
    router_cost: float = Field(gt=0.0, le=MAX_ROUTER_COST, description="the router's cost scalar c(h) > 0")
    timeout_s: float = Field(default=60.0, gt=0.0, le=MAX_TIMEOUT_S,
                             description="seconds for the whole call (a stream: until its last chunk)")
    connect_timeout_s: float | None = Field(default=None, gt=0.0, le=MAX_TIMEOUT_S,
                                            description="seconds to connect (TCP/TLS); default 5 (at most timeout_s)")
    first_token_timeout_s: float | None = Field(default=None, gt=0.0, le=MAX_TIMEOUT_S,
                                                description="streams: seconds until the first chunk; default timeout_s")
    routable: bool = Field(default=True, description="may `auto` pick it (once profiled)?")
    kind: Annotated[str, Field(max_length=16), AfterValidator(_valid_kind)] = Field(
        default="chat", description="chat (chat completions, responses, messages; routable) or embedding "
                                    "(/v1/embeddings, by name only; never routed)")
    max_output_tokens: int | None = Field(
        default=None, ge=1, le=MAX_OUTPUT_TOKENS,
        description="the most completion tokens one answer of it may have (bounds the budget estimate of a "
                    "request without max_tokens); default: LiteLLM's model info, else budget.default_max_output_tokens")


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
