"""A fitted UniRoute router, a replay upstream and a keys-mode gateway for the routing-feature tests
(docs/ROUTING_FEATURES.md: the dry-run, drift, tenant-private profiles).

Three replayed models with known accuracies (``accurate`` > ``middling`` > ``poor``, in cost order too) and
``flaky``, which the replay upstream answers with 500. Two clusters (K-means), a tiny static embedder,
profiles from 80 validation prompts. The config adds ``newbie`` (routable, never profiled), ``byname``
(``routable: false``) and ``vectors`` (an embedding model) beside the replayed models.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from gateway.store import models as catalog
from tests.procs import free_port, running, server_env

ADMIN = "sk-admin-" + secrets.token_urlsafe(12)
ACCURACY = {"accurate": {"math": 0.92, "biology": 0.92}, "middling": {"math": 0.55, "biology": 0.55},
            "poor": {"math": 0.2, "biology": 0.2}, "flaky": {"math": 0.5, "biology": 0.5}}
COSTS = {"accurate": 4.0, "middling": 2.0, "poor": 1.0, "flaky": 0.5}


def fit(root: Path) -> tuple[Path, Path]:
    """(dataset, artifact): the synthetic benchmark and a K=2 K-means artifact fitted on it."""
    from gateway.cli.main import main as cli
    from routing.synthetic import make_synthetic_dataset
    from tests.static_model import make_tiny_static

    static = make_tiny_static(root / "static")
    data = make_synthetic_dataset(root / "data", n_prompts=240, accuracy=ACCURACY, costs=COSTS, seed=7)
    art = root / "artifact"
    assert cli(["router", "fit", "--dataset", str(data), "--out", str(art), "--k", "2", "--variant", "kmeans",
                "--val-size", "80", "--embedder", str(static), "--cache-dir", str(root / "cache")]) == 0
    return data, art


def router_key(artifact: Path) -> str:
    version = json.loads((artifact / "artifact.json").read_text())["version"]
    return catalog.profile_key(version, "kmeans")


def write_config(path: Path, data: Path, art: Path, replay: str, url: str, port: int, **extra: Any) -> Path:
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
        "auth": {"mode": "keys"}, "database_url": url, "database": {"spill_dir": str(path.parent / "spill")},
        "registry": {"poll_interval_s": 0.2},
        "router": {"policy": "uniroute", "variant": "kmeans", "artifact": str(art), "default_lambda": 0.05,
                   "max_wait_ms": 0, "embed_cache_dir": str(path.parent / "cache")},
        "fallback": {"max_attempts": 3, "cooldown_failures": 1, "cooldown_s": 600},
        "replay_models": {"dataset": str(data), "api_base": replay},
        "models": [
            {"name": "newbie", "router_cost": 0.1,
             "litellm_params": {"model": "openai/middling", "api_base": replay, "api_key": "replay"}},
            {"name": "byname", "router_cost": 0.1, "routable": False,
             "litellm_params": {"model": "openai/poor", "api_base": replay, "api_key": "replay"}},
            {"name": "vectors", "router_cost": 0.1, "kind": "embedding",
             "litellm_params": {"model": "openai/vectors", "api_base": replay, "api_key": "replay"}},
        ],
    }
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def gateway(tmp: Path, data: Path, art: Path, replay: str, url: str, **extra: Any) -> Iterator[str]:
    """``uniroute serve`` on a free port with the config above; yields its base URL (no ``/v1``)."""
    port = free_port()
    cfg = write_config(tmp / "config.yaml", data, art, replay, url, port, **extra)
    base = f"http://127.0.0.1:{port}"
    with running(["-m", "gateway.cli.main", "serve", "--config", str(cfg)], f"{base}/health/readiness",
                 env=server_env(UNIROUTE_ADMIN_KEY=ADMIN), timeout_s=120):
        yield base
