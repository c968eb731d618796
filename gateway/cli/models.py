"""``uniroute models``: list, add, update, disable and remove registry models (live on every replica).

The flags of ``add`` and ``update`` are derived from :class:`gateway.spec.ModelSpec`'s fields by
:func:`add_spec_arguments` (``input_cost_per_1m`` → ``--input-cost-per-1m``; a boolean that defaults to
true → ``--not-routable`` on ``add``, ``--routable true|false`` on ``update``), and what they give is
validated by the spec. ``litellm_params`` has its own flags: ``--litellm-params JSON`` and the shortcuts
``--litellm-model``, ``--api-base``, ``--api-key``.

Errors print one line (``error: ...``) on stderr and exit 1, never a traceback (:func:`gateway.cli.db.run`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from types import NoneType, UnionType
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin

from gateway.errors import InvalidRequestError
from gateway.spec import ModelSpec, parse_patch, parse_spec

if TYPE_CHECKING:
    from gateway.store.engine import Store
    from gateway.store.tables import ModelRow

#: litellm_params keys with a flag of their own: (flag dest, litellm_params key, help)
PARAM_FLAGS = (
    ("litellm_model", "model", "LiteLLM model, e.g. openai/gpt-4o-mini"),
    ("api_base", "api_base", "the provider's base URL"),
    ("api_key", "api_key", "best as a reference: os.environ/NAME (stored as written)"),
)


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _bool(text: str) -> bool:
    if text not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text == "true"


def _flag_type(annotation: Any) -> Callable[[str], Any]:
    """How a flag's text becomes the field's value: the field's own scalar type, else JSON."""
    if get_origin(annotation) in (Union, UnionType):
        kinds = [a for a in get_args(annotation) if a is not NoneType]
        annotation = kinds[0] if len(kinds) == 1 else Any
    if annotation is bool:
        return _bool
    if annotation in (float, int, str):
        return annotation  # type: ignore[no-any-return]
    return json.loads


def add_spec_arguments(parser: argparse.ArgumentParser, *, update: bool) -> None:
    """The flags of ``models add`` (``update=False``) or ``models update``: one per spec field."""
    parser.add_argument("name")
    for field, info in ModelSpec.model_fields.items():
        help_ = (info.description or "").replace("%", "%%")  # argparse %-formats help
        if field == "name":
            continue
        if field == "litellm_params":
            for dest, _key, param_help in PARAM_FLAGS:
                parser.add_argument(flag(dest), dest=dest, default=None, help=param_help)
            parser.add_argument(flag(field), dest=field, default=None,
                                help="all LiteLLM params as a JSON object" + (" (replaces them; the flags above "
                                                                              "change one key)" if update else ""))
            continue
        kind = _flag_type(info.annotation)
        if kind is _bool and not update:  # add: the flag names the non-default choice
            name = flag(f"not_{field}") if info.default else flag(field)
            parser.add_argument(name, dest=field, action="store_const", const=not info.default, default=None,
                                help=f"{help_} ({'no' if info.default else 'yes'})")
            continue
        default = "" if info.is_required() or info.default is None else f" (default {info.default})"
        parser.add_argument(flag(field), dest=field, type=kind, default=None,
                            required=info.is_required() and not update,
                            metavar="true|false" if kind is _bool else None, help=help_ + default)
    if update:
        parser.add_argument("--enable", action="store_true", help="re-enable a disabled model")


def _field_values(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields the flags set (but ``name`` and ``litellm_params``)."""
    return {f: v for f in ModelSpec.model_fields if f not in ("name", "litellm_params")
            and (v := getattr(args, f, None)) is not None}


def _params_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    params: dict[str, Any] = {}
    if getattr(args, "litellm_params", None):
        try:
            params = json.loads(args.litellm_params)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"--litellm-params is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise InvalidRequestError("--litellm-params must be a JSON object, e.g. '{\"model\": \"openai/x\"}'")
    for dest, key, _help in PARAM_FLAGS:
        v = getattr(args, dest, None)
        if v is not None:
            params[key] = v
    return params or None


def _print_rows(rows: Sequence[ModelRow], as_json: bool = False) -> None:
    from gateway.store.models import model_summary

    models = [model_summary(r) for r in rows]
    if as_json:
        print(json.dumps(models, indent=1))
        return
    print(f"{'name':32} {'enabled':7} {'routable':8} {'router_cost':>11} {'$/1M in':>9} {'$/1M out':>9} "
          f"{'source':6} model")
    for m in models:
        print(f"{m['name']:32} {m['enabled']!s:7} {m['routable']!s:8} {m['router_cost']:11.4g} "
              f"{m['input_cost_per_1m']:9.4g} {m['output_cost_per_1m']:9.4g} {m['source']:6} "
              f"{m['litellm_params'].get('model')}")


def _run(args: argparse.Namespace, fn: Callable[[Store], None]) -> int:
    """``fn`` on the migrated database of ``--config``; a failure is one ``error: ...`` line (:func:`gateway.cli.db.run`)."""
    from gateway.cli.db import run

    return run(args, fn, migrate=True)


def models_list_command(args: argparse.Namespace) -> int:
    from gateway.store.models import list_models

    return _run(args, lambda store: _print_rows(list_models(store), args.json))


def models_add_command(args: argparse.Namespace) -> int:
    from gateway.store.models import add_model

    def run(store: Store) -> None:
        spec = parse_spec({"name": args.name, "litellm_params": _params_from_args(args) or {},
                           **_field_values(args)})
        _print_rows([add_model(store, spec)])

    return _run(args, run)


def models_update_command(args: argparse.Namespace) -> int:
    from gateway.store.models import get_model, spec_from_row, update_model

    def run(store: Store) -> None:
        data: dict[str, Any] = _field_values(args)
        params = _params_from_args(args)
        if params is not None:
            replace = bool(getattr(args, "litellm_params", None))
            data["litellm_params"] = params if replace else {
                **spec_from_row(get_model(store, args.name)).litellm_params, **params}
        if args.enable:
            data["enabled"] = True
        _print_rows([update_model(store, args.name, parse_patch(data))])

    return _run(args, run)


def models_disable_command(args: argparse.Namespace) -> int:
    from gateway.store.models import set_enabled

    return _run(args, lambda store: _print_rows([set_enabled(store, args.name, False)]))


def models_remove_command(args: argparse.Namespace) -> int:
    from gateway.store.models import remove_model

    def run(store: Store) -> None:
        row = remove_model(store, args.name)
        print(f"removed {row.name}" + (" (a config model: remove it from config.yaml too, or it returns at the "
                                       "next start)" if row.source == "config" else ""))

    return _run(args, run)
