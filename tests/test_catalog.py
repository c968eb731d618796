"""The DB model catalog: CRUD, profile versions, the change token and the registry poller."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.errors import ConflictError, InvalidRequestError, NotFoundError
from gateway.serving.registry import ModelEntry, Registry
from gateway.serving.registry_sync import RegistryPoller
from gateway.spec import ModelSpec, parse_patch, parse_spec
from gateway.store import models as catalog
from gateway.store.engine import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'c.db'}")
    s.upgrade()
    return s


def spec(name: str, **kw: object) -> ModelSpec:
    body = {"name": name, "router_cost": 2.0,
            "litellm_params": {"model": f"openai/{name}", "api_key": "os.environ/CATALOG_TEST_KEY"}, **kw}
    return parse_spec(body)


def test_crud_and_errors(store: Store) -> None:
    catalog.add_model(store, spec("a"))
    with pytest.raises(ConflictError, match="already exists"):
        catalog.add_model(store, spec("a"))
    with pytest.raises(NotFoundError, match="unknown model 'b'; known: a"):
        catalog.get_model(store, "b")
    with pytest.raises(InvalidRequestError, match="router_cost"):
        parse_spec({"name": "x", "litellm_params": {"model": "m"}, "router_cost": 0})
    with pytest.raises(InvalidRequestError, match="needs 'model'"):
        parse_spec({"name": "x", "litellm_params": {}, "router_cost": 1})
    row = catalog.update_model(store, "a", parse_patch({"router_cost": 3.0}))
    assert catalog.spec_from_row(row).router_cost == 3.0 and row.version == 2
    assert catalog.update_model(store, "a", parse_patch({"router_cost": 3.0})).version == 2  # no change
    # the env reference is stored as written, never resolved
    assert catalog.spec_from_row(catalog.get_model(store, "a")).litellm_params["api_key"] == "os.environ/CATALOG_TEST_KEY"
    assert not catalog.set_enabled(store, "a", False).enabled
    catalog.remove_model(store, "a")
    assert catalog.list_models(store) == []


def test_literal_secrets_are_masked_in_summaries(store: Store) -> None:
    row = catalog.add_model(store, spec("s", litellm_params={"model": "openai/s", "api_key": "sk-literal"}))
    assert catalog.model_summary(row)["litellm_params"]["api_key"] == "***"


def test_profiles_are_versioned_one_active(store: Store) -> None:
    key = catalog.profile_key("abc", "kmeans")
    assert catalog.save_profile(store, "a", key, [0.1, 0.2], [5, 5], "validation") == 1
    assert catalog.save_profile(store, "a", key, [0.3, 0.2], [6, 6], "feedback") == 2
    active = catalog.active_profiles(store, key)
    assert active["a"].version == 2 and np.allclose(active["a"].psi, [0.3, 0.2])
    hist = catalog.profile_history(store, "a", key)
    assert [(p.version, p.active) for p in hist] == [(1, False), (2, True)]
    assert catalog.seed_profiles(store, key, {"b": (np.array([0.5, 0.5]), np.array([1.0, 1.0]))}) == 0  # not empty
    other = catalog.profile_key("def", "kmeans")
    assert catalog.seed_profiles(store, other, {"b": (np.array([0.5, 0.5]), np.array([1.0, 1.0]))}) == 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        catalog.save_profile(store, "a", key, [1.5, 0.0], [1, 1], "validation")


def test_poller_replaces_on_change_only(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_TEST_KEY", "sk-resolved")
    key = catalog.profile_key("abc", "kmeans")
    reg = Registry()
    poller = RegistryPoller(catalog.TableModelSource(store, key), reg, 0.1)
    assert poller.refresh() and len(reg) == 0
    catalog.add_model(store, spec("a"))
    catalog.add_model(store, spec("b"))
    assert poller.refresh() and reg.names() == ("a", "b")
    a = reg.get("a")
    assert a is not None and a.litellm_params["api_key"] == "sk-resolved"
    assert not poller.refresh()  # nothing changed
    assert all(m.psi is None for m in reg.pool())  # no profile: never chosen by `auto`
    catalog.save_profile(store, "a", key, [0.1, 0.2], [5, 5], "validation")
    assert poller.refresh()
    a = reg.get("a")
    assert a is not None and a.psi is not None and np.allclose(a.psi, [0.1, 0.2])
    catalog.set_enabled(store, "b", False)
    assert poller.refresh() and reg.names() == ("a",)


def test_poller_leaves_out_models_with_missing_env(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CATALOG_TEST_KEY", raising=False)
    catalog.add_model(store, spec("a"))
    reg = Registry()
    RegistryPoller(catalog.TableModelSource(store, None), reg).refresh()
    assert reg.names() == ()


def test_models_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.main import main as cli

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"database_url: sqlite:///{tmp_path / 'cli.db'}\n")
    c = ["--config", str(cfg)]
    assert cli(["models", "add", "m1", "--litellm-model", "openai/m1", "--api-key", "os.environ/K",
                "--router-cost", "1.5", *c]) == 0
    assert cli(["models", "add", "m1", "--litellm-model", "openai/m1", "--router-cost", "1.5", *c]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli(["models", "update", "m1", "--router-cost", "2.5", *c]) == 0
    assert cli(["models", "disable", "m1", *c]) == 0
    assert cli(["models", "list", "--json", *c]) == 0
    out = capsys.readouterr().out
    assert '"router_cost": 2.5' in out and '"enabled": false' in out and "os.environ/K" in out
    assert cli(["models", "remove", "nope", *c]) == 1
    assert "unknown model 'nope'; known: m1" in capsys.readouterr().err
    assert cli(["models", "remove", "m1", *c]) == 0


def test_per_model_timeouts_round_trip(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATALOG_TEST_KEY", "k")
    catalog.add_model(store, spec("t", timeout_s=30.0, connect_timeout_s=2.0))
    row = catalog.get_model(store, "t")
    got = catalog.spec_from_row(row)
    assert (got.timeout_s, got.connect_timeout_s, got.first_token_timeout_s) == (30.0, 2.0, None)
    entry = ModelEntry.from_spec(catalog.spec_from_row(row))
    assert (entry.connect_timeout, entry.first_token_timeout) == (2.0, 30.0)  # first token defaults to timeout_s
    row = catalog.update_model(store, "t", parse_patch({"first_token_timeout_s": 4.5}))
    assert row.version == 2 and ModelEntry.from_spec(catalog.spec_from_row(row)).first_token_timeout == 4.5
    summary = catalog.model_summary(row)
    assert summary["connect_timeout_s"] == 2.0 and summary["first_token_timeout_s"] == 4.5
    with pytest.raises(InvalidRequestError, match="connect_timeout_s"):
        parse_patch({"connect_timeout_s": 0})
