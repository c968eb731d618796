"""UniRoute behind `model: "auto"`: a fitted artifact served by a real gateway, reached with the OpenAI SDK.

The synthetic pool has a cheap generalist, a math expert, a biology expert (both cheap)
and an expensive strong generalist. A router fitted on it must send math prompts to the
math expert and biology prompts to the biology expert at a small λ, everything to the
cheapest model at a huge λ, and never pick a model that has no profile.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from gateway.cli.main import main as cli
from gateway.config import ConfigError, load_config
from gateway.serving.router import calibrated
from routing.dataset import BenchmarkDataset, load_dataset
from routing.synthetic import make_synthetic_dataset
from tests.procs import free_port, gateway_server, replay_server, running_all, server_env

ACCURACY = {
    "small-general": {"math": 0.4, "biology": 0.4},
    "math-expert": {"math": 0.97, "biology": 0.1},
    "bio-expert": {"math": 0.1, "biology": 0.97},
    "large-general": {"math": 0.85, "biology": 0.85},
}
COSTS = {"small-general": 1.0, "math-expert": 2.0, "bio-expert": 2.0, "large-general": 20.0}


@dataclass
class Stack:
    base_url: str
    data: BenchmarkDataset
    config: Path


def _write_config(root: Path, dataset: Path, artifact: Path, replay_base: str, port: int, **router: Any) -> Path:
    cfg = {
        "server": {"host": "127.0.0.1", "port": port},
        "auth": {"mode": "open"},
        "database_url": f"sqlite:///{root / 'gw.db'}",
        "router": {"policy": "uniroute", "variant": "learnedmap", "artifact": str(artifact),
                   "default_lambda": 0.05, "lambda_min": 0.0, "lambda_max": 1000.0,
                   "embed_cache_dir": str(root / "cache"), **router},
        "replay_models": {"dataset": str(dataset), "api_base": replay_base, "usd_per_1m_tokens_per_cost_unit": 0.1},
        # in the registry, callable by name, but never profiled
        "models": [{"name": "unprofiled", "router_cost": 0.1,
                    "litellm_params": {"model": "openai/small-general", "api_base": replay_base, "api_key": "x"}}],
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("router")
    dataset = make_synthetic_dataset(root / "data", n_prompts=240, accuracy=ACCURACY, costs=COSTS, seed=3)
    artifact = root / "artifact"
    rc = cli(["router", "fit", "--dataset", str(dataset), "--out", str(artifact), "--k", "2",
              "--val-size", "120", "--cache-dir", str(root / "cache")])
    assert rc == 0
    return root, dataset, artifact


@pytest.fixture(scope="module")
def stack(fitted: tuple[Path, Path, Path]) -> Iterator[Stack]:
    root, dataset, artifact = fitted
    replay, replay_base = replay_server(dataset)
    port = free_port()
    cfg = _write_config(root, dataset, artifact, replay_base, port)
    with running_all(replay, gateway_server(cfg, env=server_env(), timeout_s=120)):  # both start at once
        yield Stack(f"http://127.0.0.1:{port}/v1", load_dataset(dataset), cfg)


def _auto(client: openai.OpenAI, prompt: str, lam: float | None = None) -> dict[str, Any]:
    extra = {"uniroute": {"lambda": lam}} if lam is not None else None
    resp = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": prompt}],
                                          extra_body=extra)
    info = resp.model_extra["uniroute"] if resp.model_extra else None
    assert info is not None, "response lacks the uniroute extension object"
    assert info["model"] == resp.model
    return dict(info)


def test_routes_each_topic_to_its_expert(stack: Stack) -> None:
    data = stack.data
    with openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as client:
        chosen: dict[str, list[str]] = {"math": [], "biology": []}
        clusters: dict[str, set[int]] = {"math": set(), "biology": set()}
        for i in range(0, 40):
            info = _auto(client, data.prompts[i])
            topic = data.categories[i]
            assert topic is not None
            chosen[topic].append(info["model"])
            clusters[topic].add(info["cluster"])
            assert info["lambda"] == pytest.approx(0.05)
            assert info["candidates"][0]["model"] == info["model"]
            assert all("expected_error" in c and "cost" in c for c in info["candidates"])
    assert set(chosen["math"]) == {"math-expert"}, chosen
    assert set(chosen["biology"]) == {"bio-expert"}, chosen
    assert clusters["math"].isdisjoint(clusters["biology"])


def test_lambda_trades_quality_for_cost(stack: Stack) -> None:
    with openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as client:
        cheap = _auto(client, stack.data.prompts[0], lam=1000.0)
        assert cheap["model"] == "small-general"  # the cheapest profiled model
        best = _auto(client, stack.data.prompts[0], lam=0.0)
        assert best["candidates"][0]["expected_error"] == min(c["expected_error"] for c in best["candidates"])


def test_unprofiled_model_is_never_auto_but_callable_by_name(stack: Stack) -> None:
    with openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as client:
        info = _auto(client, stack.data.prompts[1], lam=1000.0)
        assert info["model"] != "unprofiled"  # it is the cheapest, but has no profile
        assert all(c["model"] != "unprofiled" for c in info["candidates"])
        resp = client.chat.completions.create(model="unprofiled",
                                              messages=[{"role": "user", "content": stack.data.prompts[1]}])
        assert resp.model == "unprofiled"


def test_streaming_auto_carries_the_decision(stack: Stack) -> None:
    with openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as client:
        chunks = list(client.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": stack.data.prompts[2]}], stream=True))
    last = [c for c in chunks if c.model_extra and "uniroute" in c.model_extra]
    assert last, "no chunk carries the uniroute object"
    info = (last[-1].model_extra or {})["uniroute"]
    assert info["cluster"] is not None and info["model"] in ACCURACY


def test_prompt_embeddings_are_counted_by_source_and_new_prompts_stay_out_of_the_disk_cache(stack: Stack) -> None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    def sources() -> dict[str, float]:
        text = httpx.get(stack.base_url.removesuffix("/v1") + "/metrics").text
        return {s.labels["source"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "uniroute_prompt_embeddings_total"}

    cache = stack.config.parent / "cache"
    files_before = {p: p.stat().st_size for p in cache.rglob("*") if p.is_file()}
    before = sources()
    fresh = f"a prompt nobody has sent before {free_port()}"
    with openai.OpenAI(base_url=stack.base_url, api_key="unused", max_retries=0) as client:
        _auto(client, fresh)
        _auto(client, fresh)
    after = sources()
    assert after.get("computed", 0) - before.get("computed", 0) == 1
    assert after.get("memory", 0) - before.get("memory", 0) == 1
    assert {p: p.stat().st_size for p in cache.rglob("*") if p.is_file()} == files_before  # never appended


def test_calibration_sets_default_lambda(fitted: tuple[Path, Path, Path]) -> None:
    root, dataset, artifact = fitted
    cfg_path = _write_config(root, dataset, artifact, "http://127.0.0.1:9/v1", 1, target_cost=0.06)
    cfg = calibrated(load_config(cfg_path))
    lam = cfg.router.default_lambda
    assert lam > 0.0
    # the CLI finds the same λ for the same pool
    pool = ",".join(ACCURACY)
    rc = cli(["router", "calibrate", "--artifact", str(artifact), "--target-cost", "0.06", "--models", pool])
    assert rc == 0
    cfg_low = _write_config(root, dataset, artifact, "http://127.0.0.1:9/v1", 1, target_cost=0.001)
    with pytest.raises(ConfigError, match="below the cheapest achievable"):
        calibrated(load_config(cfg_low))


def test_calibrate_cli_output(fitted: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, _, artifact = fitted
    assert cli(["router", "calibrate", "--artifact", str(artifact), "--fraction-of-best", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["expected_cost"] <= out["target_cost"] + 1e-9


def test_uniroute_needs_an_artifact(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"router": {"policy": "uniroute"}}))
    with pytest.raises(ConfigError, match=r"needs router\.artifact"):
        load_config(tmp_path / "c.yaml")
