"""One model spec (gateway/spec.py): every place a model is written is derived from ModelSpec's fields.

These tests iterate the spec's fields, so a new field is checked everywhere without editing them: it must
be a column of the migrated ``models`` table, show in the admin summary, survive config → table →
registry entry, and be accepted by POST/PATCH /admin/models and by ``uniroute models add/update``. A field
of a new type needs sample values in :func:`samples` (the test says so).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin

import pytest
import sqlalchemy as sa
from pydantic.fields import FieldInfo
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.config import ConfigError, parse_config
from gateway.errors import InvalidRequestError
from gateway.serving.registry import ModelEntry, Registry
from gateway.serving.registry_sync import RegistryPoller
from gateway.spec import PATCH_FIELDS, SPEC_FIELDS, ModelPatch, ModelSpec, parse_patch, parse_spec
from gateway.store import models as catalog
from gateway.store.engine import Store

ADMIN = "sk-admin-spec-test"
H = {"authorization": f"Bearer {ADMIN}"}
KEY_ENV = "SPEC_TEST_KEY"


def _kind(info: FieldInfo) -> Any:
    ann = info.annotation
    if get_origin(ann) in (Union, UnionType):
        (ann,) = (a for a in get_args(ann) if a is not NoneType)
    return get_origin(ann) or ann


def samples(field: str, info: FieldInfo) -> tuple[Any, Any]:
    """Two valid values of a spec field, both unlike its default."""
    kind = _kind(info)
    default = None if info.is_required() else info.default
    if field == "name":
        return "spec-model", "spec-model"
    if field == "litellm_params":
        return ({"model": "openai/spec-a", "api_base": "http://127.0.0.1:9/v1", "api_key": f"os.environ/{KEY_ENV}"},
                {"model": "openai/spec-b", "api_key": f"os.environ/{KEY_ENV}"})
    if kind is bool:
        return (not default, not default)
    if kind is float:
        return 1.25 + (default or 0.0), 2.5 + (default or 0.0)
    if kind is int:
        return 7 + (default or 0), 9 + (default or 0)
    if field == "kind":
        return "embedding", "embedding"
    pytest.fail(f"ModelSpec.{field}: add sample values for {info.annotation} to tests/test_spec.py::samples")


def sample_spec(which: int = 0) -> dict[str, Any]:
    return {f: samples(f, info)[which] for f, info in ModelSpec.model_fields.items()}


def flags(values: dict[str, Any], *, update: bool) -> list[str]:
    """The `uniroute models add/update` flags giving ``values`` (the rule of gateway/cli/models.py)."""
    out: list[str] = []
    for field, value in values.items():
        info = ModelSpec.model_fields[field]
        name = "--" + field.replace("_", "-")
        if field == "name":
            continue
        if field == "litellm_params":
            out += [name, json.dumps(value)]
        elif _kind(info) is bool and not update:
            assert value != info.default
            out.append("--not-" + field.replace("_", "-") if info.default else name)
        elif _kind(info) is bool:
            out += [name, "true" if value else "false"]
        else:
            out += [name, str(value)]
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'spec.db'}")
    s.upgrade()
    yield s
    s.dispose()


def test_every_field_is_a_column_of_the_migrated_models_table(store: Store) -> None:
    columns = {c["name"]: c for c in sa.inspect(store.engine).get_columns("models")}
    for field, info in ModelSpec.model_fields.items():
        assert field in columns, f"ModelSpec.{field} has no column in `models`: write a migration adding it"
        nullable = get_origin(info.annotation) in (Union, UnionType) and NoneType in get_args(info.annotation)
        assert columns[field]["nullable"] == nullable, f"models.{field}: NULL iff the field may be None"


def test_patch_is_the_spec_without_name_plus_enabled() -> None:
    assert (*(f for f in SPEC_FIELDS if f != "name"), "enabled") == PATCH_FIELDS
    assert all(not info.is_required() for info in ModelPatch.model_fields.values())


def test_every_field_round_trips_config_table_registry(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-resolved")
    values = sample_spec()
    spec = ModelSpec.model_validate(values)
    assert all(getattr(spec, f) != info.default for f, info in ModelSpec.model_fields.items() if not info.is_required())
    cfg = parse_config({"models": [values]})
    assert cfg.models == [spec]  # config.yaml's entry is the spec, as written
    from_config = Registry.from_config(cfg).get(spec.name)
    assert from_config is not None and from_config.spec == spec
    assert catalog.seed_models(store, cfg.models) == 1
    row = catalog.get_model(store, spec.name)
    assert catalog.spec_from_row(row) == spec
    summary = catalog.model_summary(row)
    assert {f: summary[f] for f in SPEC_FIELDS} == values  # no literal secret: the reference shows as written
    registry = Registry()
    RegistryPoller(catalog.TableModelSource(store, None), registry).refresh()
    entry = registry.get(spec.name)
    assert entry is not None and entry.spec == spec
    assert entry == ModelEntry.from_spec(spec, created=entry.created)  # the one builder, whichever way it came
    assert entry.litellm_params["api_key"] == "sk-resolved"


def test_every_field_is_accepted_by_the_admin_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    cfg = parse_config({"auth": {"mode": "open"}, "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
                        "admin": {"env_allowlist": [KEY_ENV]}}, base_dir=tmp_path)
    first, second = sample_spec(0), sample_spec(1)
    with TestClient(create_app(cfg)) as client:
        r = client.post("/admin/models", headers=H, json=first)
        assert r.status_code == 201, r.text
        assert {f: r.json()[f] for f in SPEC_FIELDS} == first
        for field in PATCH_FIELDS:
            if field == "enabled":
                continue
            r = client.patch(f"/admin/models/{first['name']}", headers=H, json={field: second[field]})
            assert r.status_code == 200 and r.json()[field] == second[field], (field, r.text)
        assert {f: r.json()[f] for f in SPEC_FIELDS} == second
        r = client.patch(f"/admin/models/{first['name']}", headers=H, json={"colour": "red"})
        assert r.status_code == 400 and "colour: Extra inputs are not permitted" in r.json()["error"]["message"]
        assert f"(fields: {', '.join(PATCH_FIELDS)})" in r.json()["error"]["message"]


def test_every_field_is_accepted_by_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.main import main as cli

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"database_url: sqlite:///{tmp_path / 'cli.db'}\n")
    c = ["--config", str(cfg)]
    first, second = sample_spec(0), sample_spec(1)

    def listed() -> dict[str, Any]:
        capsys.readouterr()
        assert cli(["models", "list", "--json", *c]) == 0
        (model,) = json.loads(capsys.readouterr().out)
        return {f: model[f] for f in SPEC_FIELDS}

    assert cli(["models", "add", first["name"], *flags(first, update=False), *c]) == 0
    assert listed() == first
    for field in SPEC_FIELDS:
        if field != "name":
            assert cli(["models", "update", first["name"], *flags({field: second[field]}, update=True), *c]) == 0
    assert listed() == second


def test_validation_names_the_field_and_the_valid_ones() -> None:
    base = sample_spec()
    for bad, needle in [({**base, "name": "auto"}, "reserved"), ({**base, "router_cost": float("inf")}, "finite"),
                        ({**base, "timeout_s": float("nan")}, "finite"), ({**base, "litellm_params": {}},
                                                                           "litellm_params.model is required"),
                        ({**base, "name": "x" * 201}, "at most 200"), ({**base, "colour": 1}, "colour")]:
        with pytest.raises(InvalidRequestError, match=needle) as err:
            parse_spec(bad)
        assert f"(fields: {', '.join(SPEC_FIELDS)})" in err.value.message
        with pytest.raises(ConfigError, match=needle):
            parse_config({"models": [bad]})
    with pytest.raises(InvalidRequestError, match="JSON object"):
        parse_spec([base])
    with pytest.raises(InvalidRequestError, match=r"litellm_params\.model is required"):
        parse_patch({"litellm_params": {"api_base": "http://x"}})
    assert parse_patch({"router_cost": 2.0, "routable": None}) == {"router_cost": 2.0}  # None: unchanged


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.main import main as cli

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"database_url: sqlite:///{tmp_path / 'cli.db'}\n")
    c = ["--config", str(cfg)]
    for argv in (["models", "add", "m", "--router-cost", "1", "--litellm-params", "{nope", *c],
                 ["models", "add", "m", "--router-cost", "1", "--litellm-params", "[1]", *c],
                 ["models", "add", "auto", "--router-cost", "1", "--litellm-model", "openai/x", *c],
                 ["models", "add", "m", "--router-cost", "inf", "--litellm-model", "openai/x", *c],
                 ["models", "update", "ghost", "--router-cost", "2", *c],
                 ["models", "list", "--config", str(tmp_path / "absent.yaml")]):
        capsys.readouterr()
        assert cli(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
