"""Every CLI error is one ``error: ...`` line on stderr with exit status 1, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from gateway.cli.main import error_line
from gateway.cli.main import main as cli
from routing.artifact import RouterArtifact


def _config(tmp_path: Path, **extra: Any) -> Path:
    art = RouterArtifact(embedder_id="t", k=2, centroids=np.eye(2), theta=None, val_prompt_ids=["p0", "p1"],
                         val_prompts=["a", "b"], val_embeddings=np.eye(2), training_set_hash="h", variant="kmeans",
                         val_answers=["A", "B"])
    art.save(tmp_path / "art")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"database_url": f"sqlite:///{tmp_path / 'gw.db'}",
                                   "router": {"policy": "uniroute", "artifact": str(tmp_path / "art"),
                                              "variant": "kmeans"}, **extra}))
    return cfg


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["profile", "m", "--config", str(tmp_path / "nope.yaml")]) == 1
    assert "config file" in _one_error_line(capsys)
    cfg = _config(tmp_path, models=[{"name": "m", "router_cost": 1.0, "litellm_params": {
        "model": "openai/m", "api_key": "os.environ/UNIROUTE_TEST_UNSET_KEY"}}])
    assert cli(["reprofile", "--config", str(cfg)]) == 1
    assert "environment variable UNIROUTE_TEST_UNSET_KEY is not set" in _one_error_line(capsys)


def test_profile_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNIROUTE_TEST_UNSET_KEY", raising=False)
    cfg = str(_config(tmp_path))
    assert cli(["models", "add", "my-model", "--litellm-model", "openai/my-model", "--api-base",
                "http://127.0.0.1:9/v1", "--api-key", "os.environ/UNIROUTE_TEST_UNSET_KEY", "--router-cost", "7",
                "--config", cfg]) == 0
    capsys.readouterr()
    # the stored row names an unset variable (the README's example before its key is exported)
    assert cli(["profile", "my-model", "--config", cfg]) == 1
    line = _one_error_line(capsys)
    assert "environment variable UNIROUTE_TEST_UNSET_KEY is not set" in line and "models update my-model" in line
    assert cli(["profile", "ghost", "--config", cfg]) == 1
    assert "unknown model 'ghost'; known: my-model" in _one_error_line(capsys)


def test_reprofile_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cheapest = tmp_path / "cheapest.yaml"
    cheapest.write_text(yaml.safe_dump({"database_url": f"sqlite:///{tmp_path / 'gw.db'}"}))
    assert cli(["reprofile", "--config", str(cheapest)]) == 1
    assert "needs the UniRoute router" in _one_error_line(capsys)
    unreachable = _config(tmp_path, database_url="postgresql+psycopg://nobody@127.0.0.1:9/nothing")
    assert cli(["reprofile", "--config", str(unreachable)]) == 1
    line = _one_error_line(capsys)
    assert "cannot use the database" in line and "database_url" in line
    bad_url = _config(tmp_path, database_url="not a url")
    assert cli(["reprofile", "--config", str(bad_url)]) == 1
    assert "database_url" in _one_error_line(capsys)


def test_unexpected_errors_are_one_line_too(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    message = error_line(RuntimeError("boom\n  at line 2"))
    assert message.startswith("RuntimeError: boom (unexpected") and "\n" not in message
    import profiling.cli

    def broken(args: Any) -> int:
        raise KeyError("surprise")

    monkeypatch.setattr(profiling.cli, "reprofile_command", broken)
    assert cli(["reprofile"]) == 1
    assert "KeyError: 'surprise'" in _one_error_line(capsys)
    monkeypatch.setenv("UNIROUTE_DEBUG", "1")
    with pytest.raises(KeyError):
        cli(["reprofile"])


def test_serve_refuses_a_port_that_is_the_liveness_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`uniroute serve --port N` where N is the config's server.health_port: refused before anything binds."""
    cfg = _config(tmp_path, server={"port": 8000, "health_port": 8001})
    assert cli(["serve", "--config", str(cfg), "--port", "8001"]) == 2
    err = capsys.readouterr().err
    assert "health_port" in err and "8001" in err, err
