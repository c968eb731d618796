"""A small dataset, replay upstream and gateway config shared by the endpoint and end-to-end tests.

The dataset's pool has two good models and three that the replay upstream is told to fail:
``bad-500`` (injected server error; cheapest, so ``auto`` first tries it and falls back),
``bad-429`` (rate limited) and ``bad-timeout`` (hangs; the gateway gives up after 1 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from routing.synthetic import make_synthetic_dataset

GOOD = ("small-general", "large-general")
FAULTS = {"bad-500": "500", "bad-429": "429", "bad-timeout": "timeout"}


def make_dataset(root: Path) -> Path:
    acc = {"math": 0.5, "biology": 0.5}
    return make_synthetic_dataset(
        root / "dataset",
        n_prompts=12,
        accuracy={"small-general": acc, "large-general": {"math": 0.9, "biology": 0.9},
                  "bad-500": acc, "bad-429": acc, "bad-timeout": acc},
        costs={"small-general": 1.0, "large-general": 20.0, "bad-500": 0.5, "bad-429": 30.0, "bad-timeout": 40.0},
    )


def replay_args() -> list[str]:
    return [arg for model, kind in FAULTS.items() for arg in ("--fail", f"{model}={kind}")]


def write_config(root: Path, dataset: Path, replay_base: str, *, fallback: dict[str, Any] | None = None,
                 **server: Any) -> Path:
    """The shared gateway config. Cooldown is off unless ``fallback`` turns it on, so that every request
    to ``auto`` shows the fallback past ``bad-500``."""
    data = {
        "server": {"host": "127.0.0.1", **server},
        "auth": {"mode": "open"},
        "router": {"policy": "cheapest", "default_lambda": 0.1, "lambda_min": 0.0, "lambda_max": 2.0},
        "fallback": fallback or {"max_attempts": 3, "cooldown_failures": 0},
        "replay_models": {"dataset": str(dataset), "api_base": replay_base, "usd_per_1m_tokens_per_cost_unit": 0.1},
        "models": [
            {"name": "bad-429", "router_cost": 30, "routable": False,
             "litellm_params": {"model": "openai/bad-429", "api_base": replay_base, "api_key": "replay"}},
            {"name": "bad-timeout", "router_cost": 40, "routable": False, "timeout_s": 1.0,
             "litellm_params": {"model": "openai/bad-timeout", "api_base": replay_base, "api_key": "replay"}},
        ],
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
