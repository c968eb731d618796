"""`uniroute profile NAME --max-prompts N --target-ci X` end to end: a real `uniroute replay` upstream on
loopback, LiteLLM, the multiple-choice grader, SQLite; the report says how many prompts it used and why it
stopped, and the stored Ψ is the artifact's estimator on exactly those prompts (issue 15)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from gateway.store import models as catalog
from gateway.store.engine import Store
from gateway.store.profiling import outcome_rows
from routing.artifact import RouterArtifact
from routing.dataset import load_dataset
from routing.synthetic import make_synthetic_dataset
from tests.procs import python, replay_upstream, server_env

pytestmark = pytest.mark.slow  # a replay server and eight CLI processes: 128 s at load average 14


def _uniroute(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return python(["-m", "gateway.cli.main", *argv], cwd=cwd, env=env, timeout=600)


def test_profile_cli_sequential_stops_at_the_target_and_reports_prompts_used(tmp_path: Path) -> None:
    dataset = make_synthetic_dataset(tmp_path / "dataset", n_prompts=240, seed=3)
    ds = load_dataset(dataset, with_responses=False)
    categories = [c for c in ds.categories if c is not None]
    assert len(categories) == len(ds.categories)  # the synthetic dataset gives every prompt its topic
    topics = sorted(set(categories))
    emb = np.eye(len(topics))[[topics.index(c) for c in categories]]  # one cluster per topic
    art = RouterArtifact(embedder_id="t", k=len(topics), centroids=np.eye(len(topics)), theta=None,
                         val_prompt_ids=list(ds.prompt_ids), val_prompts=list(ds.prompts), val_embeddings=emb,
                         training_set_hash="h", variant="kmeans", val_answers=list(ds.answers or []))
    art.save(tmp_path / "art")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
        "router": {"policy": "uniroute", "artifact": str(tmp_path / "art"), "variant": "kmeans"},
        "profiling": {"attempts": 2, "concurrency": 8, "min_graded_per_cluster": 50}}))
    env = server_env(UNIROUTE_CONFIG=str(cfg))
    env.pop("UNIROUTE_DATABASE_URL", None)
    with replay_upstream(dataset) as replay:
        done = _uniroute(["models", "add", "mathy", "--litellm-model", "openai/math-expert", "--api-base", replay,
                          "--api-key", "replay", "--router-cost", "2", "--config", str(cfg)], tmp_path, env)
        assert done.returncode == 0, done.stderr[-2000:]
        # bad values: one line saying what is valid, no traceback
        for argv, said in ((["--target-ci", "2"], "--target-ci must be a half-width in (0, 1)"),
                           (["--max-prompts", "0"], "--max-prompts must be a positive integer"),
                           (["--allocation", "active"], "give --max-prompts and/or --target-ci too")):
            bad = _uniroute(["profile", "mathy", *argv], tmp_path, env)
            assert bad.returncode == 1 and bad.stderr.startswith("error: ") and said in bad.stderr, bad.stderr
            assert "Traceback" not in bad.stderr
        # a target too tight for the budget: stops at the budget, not activated (exit 2), says why
        short = _uniroute(["profile", "mathy", "--max-prompts", "40", "--target-ci", "0.05", "--activate", "--json"], tmp_path, env)
        assert short.returncode == 2, short.stderr[-2000:]
        out = json.loads(short.stdout)
        assert out["sequential"]["used"] == 40 and out["sequential"]["stop"] == "max_prompts"
        assert not out["activated"] and "above the target 0.05" in out["message"]
        # a reachable target with a larger budget: resumes (the 40 are not asked again), stops on the target
        ok = _uniroute(["profile", "mathy", "--max-prompts", "240", "--target-ci", "0.2", "--activate"], tmp_path, env)
        assert ok.returncode == 0, (ok.stdout, ok.stderr[-2000:])
        assert "sequential (uniform): used " in ok.stdout and "stopped on target" in ok.stdout
    store = Store(f"sqlite:///{tmp_path / 'gw.db'}")
    try:
        rows = outcome_rows(store, art.version, "mathy")
        used = len(rows)
        assert 40 < used < 240 and all(r.score is not None for r in rows)
        assert f"used {used} of 240 prompts" in ok.stdout
        scores = {r.prompt_id: float(r.score or 0.0) for r in rows}
        expected = art.profile_model("mathy", scores, variants=["kmeans"])[0].psi
        stored = catalog.active_profiles(store, catalog.profile_key(art.version, "kmeans"))["mathy"]
        np.testing.assert_allclose(stored.psi, expected)
        assert stored.source == "validation" and catalog.spec_from_row(catalog.get_model(store, "mathy")).routable
    finally:
        store.dispose()
