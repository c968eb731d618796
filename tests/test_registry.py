from __future__ import annotations

import pytest

from gateway.config import GatewayConfig, parse_config
from gateway.serving.registry import ModelEntry, Registry, RegistrySnapshot


def _cfg() -> GatewayConfig:
    return parse_config({"models": [
        {"name": "a", "litellm_params": {"model": "openai/a", "api_key": "k"}, "router_cost": 2,
         "input_cost_per_1m": 1.0, "output_cost_per_1m": 3.0},
        {"name": "b", "litellm_params": {"model": "b"}, "router_cost": 1, "routable": False},
    ]})


def test_from_config() -> None:
    reg = Registry.from_config(_cfg(), created=5)
    assert reg.names() == ("a", "b")
    a = reg.get("a")
    assert a is not None
    assert a.input_cost_per_token == pytest.approx(1e-6) and a.output_cost_per_token == pytest.approx(3e-6)
    assert a.litellm_model == "openai/a" and a.owned_by == "openai" and a.created == 5
    b = reg.get("b")
    assert b is not None and b.owned_by == "uniroute"
    assert [p.name for p in reg.pool()] == ["a"]  # only routable models
    assert reg.get("zzz") is None and len(reg) == 2
    with pytest.raises(TypeError):
        a.litellm_params["api_key"] = "x"  # type: ignore[index]


def test_replace_swaps_whole_snapshot_and_notifies() -> None:
    reg = Registry.from_config(_cfg())
    before = reg.snapshot
    seen: list[RegistrySnapshot] = []
    reg.on_replace(seen.append)
    new = ModelEntry(name="c", litellm_params={"model": "c"}, input_cost_per_token=0, output_cost_per_token=0,
                     router_cost=1, timeout_s=1)
    reg.replace([new])
    assert reg.names() == ("c",) and before.names == ("a", "b")
    assert [s.names for s in seen] == [("a", "b"), ("c",)]
    with pytest.raises(ValueError, match="twice"):
        reg.replace([new, new])
    assert reg.names() == ("c",)
