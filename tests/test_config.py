from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, GatewayConfig, expand_vars, load_config, parse_config
from gateway.serving.registry import Registry
from routing.dataset import default_dataset_path
from routing.synthetic import make_synthetic_dataset

ROOT = Path(__file__).resolve().parent.parent


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults() -> None:
    cfg = parse_config({})
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000
    assert cfg.server.max_body_bytes == 10 * 1024 * 1024
    assert cfg.router.policy == "cheapest"
    assert cfg.fallback.max_attempts >= 1
    assert cfg.models == []


def test_var_expansion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UR_A", "alpha")
    monkeypatch.delenv("UR_MISSING", raising=False)
    assert expand_vars({"x": ["${UR_A}-${UR_MISSING:-dflt}"]}) == {"x": ["alpha-dflt"]}
    with pytest.raises(ConfigError, match="UR_MISSING"):
        expand_vars({"x": "${UR_MISSING}"})


def test_env_indirection_in_litellm_params(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"name": "m", "router_cost": 1,
             "litellm_params": {"model": "openai/gpt-x", "api_key": "os.environ/UR_KEY"}}
    monkeypatch.setenv("UR_KEY", "sk-secret")
    cfg = parse_config({"models": [entry]})
    assert cfg.models[0].litellm_params["api_key"] == "os.environ/UR_KEY"  # the spec keeps the reference
    m = Registry.from_config(cfg).get("m")
    assert m is not None and m.litellm_params["api_key"] == "sk-secret"
    monkeypatch.delenv("UR_KEY")
    with pytest.raises(ConfigError, match=r"models\[0\]\.litellm_params\.api_key: environment variable UR_KEY"):
        parse_config({"models": [entry]})


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"server": {"port": "eighty"}}, "server.port"),
        ({"router": {"policy": "best"}}, "router.policy"),
        ({"models": [{"name": "m", "litellm_params": {"model": "openai/x"}, "router_cost": 0}]}, "router_cost"),
        ({"models": [{"name": "m", "litellm_params": {}, "router_cost": 1}]}, "litellm_params.model is required"),
        ({"models": [{"name": "auto", "litellm_params": {"model": "x"}, "router_cost": 1}]}, "reserved"),
        ({"models": [{"name": "m", "litellm_params": {"model": "x"}, "router_cost": 1}] * 2}, "appears twice"),
        ({"surprise": 1}, "surprise"),
        ({"router": {"default_lambda": 20}}, "lambda"),
        ({"server": {"port": 8000, "health_port": 8000}}, "needs a port of its own"),
    ],
)
def test_invalid_config_names_the_setting(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config(data)


def test_replay_models_expand_from_models_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_synthetic_dataset(tmp_path / "data" / "syn", n_prompts=8)
    monkeypatch.delenv("UNIROUTE_DATASET", raising=False)
    cfg_path = _write(tmp_path / "config.yaml", {
        "database_url": "sqlite:///var/x.db",
        "replay_models": {"dataset": "${UNIROUTE_DATASET:-data/syn}", "api_base": "http://127.0.0.1:9/v1",
                          "usd_per_1m_tokens_per_cost_unit": 0.5},
        "models": [{"name": "large-general", "litellm_params": {"model": "openai/override"}, "router_cost": 3}],
    })
    cfg = load_config(cfg_path)
    by_name = {m.name: m for m in cfg.models}
    assert set(by_name) == {"small-general", "math-expert", "bio-expert", "large-general"}
    small = by_name["small-general"]
    assert small.litellm_params == {"model": "openai/small-general", "api_base": "http://127.0.0.1:9/v1",
                                    "api_key": "replay"}
    assert small.router_cost == 1.0
    assert small.input_cost_per_1m == small.output_cost_per_1m == pytest.approx(0.5)
    assert by_name["math-expert"].input_cost_per_1m == pytest.approx(1.0)
    # an explicit entry of the same name wins over the expansion
    assert by_name["large-general"].litellm_params["model"] == "openai/override"
    # relative paths resolve against the config's folder
    assert cfg.database_url == f"sqlite:///{tmp_path / 'var' / 'x.db'}"


def test_missing_replay_dataset_names_env_var(tmp_path: Path) -> None:
    cfg_path = _write(tmp_path / "config.yaml", {"replay_models": {"dataset": "nope"}})
    with pytest.raises(ConfigError, match="UNIROUTE_DATASET"):
        load_config(cfg_path)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_default_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path / "c.yaml", {"server": {"port": 9123}})
    monkeypatch.setenv("UNIROUTE_CONFIG", str(p))
    assert load_config().server.port == 9123


def test_repo_config_with_synthetic_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_synthetic_dataset(tmp_path / "syn", n_prompts=8)
    monkeypatch.setenv("UNIROUTE_DATASET", str(tmp_path / "syn"))
    cfg = load_config(ROOT / "config.yaml")
    assert isinstance(cfg, GatewayConfig)
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8000
    assert cfg.database_url.startswith("sqlite:///")
    # the replayed chat models, and the demo's embedding model (the README's embeddings example names it)
    assert [m.name for m in cfg.models] == ["demo-embedding", "small-general", "math-expert", "bio-expert",
                                            "large-general"]
    assert [m.name for m in cfg.models if m.kind == "embedding"] == ["demo-embedding"]
    assert all(m.litellm_params["api_base"] == "http://127.0.0.1:8100/v1" for m in cfg.models)


def test_repo_config_with_shared_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped config.yaml reads the repository's dataset by default and routes with the
    static-embedder artifact that `make demo` fits (no batching wait: the embedding is sub-millisecond)."""
    for var in ("UNIROUTE_DATASET", "UNIROUTE_ROUTER_ARTIFACT"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(ROOT / "config.yaml")
    assert len([m for m in cfg.models if m.kind == "chat"]) == 27 and len(cfg.models) == 28  # + demo-embedding
    assert cfg.router.policy == "uniroute" and cfg.router.max_wait_ms == 0
    assert cfg.router.artifact is not None and Path(cfg.router.artifact) == ROOT / "var" / "router-static"
    path = default_dataset_path()
    assert path is not None
    monkeypatch.setenv("UNIROUTE_DATASET", str(path))
    assert [m.name for m in load_config(ROOT / "config.yaml").models] == [m.name for m in cfg.models]
