"""Re-profiling: validation prior + feedback per cluster, versioned profiles, drift report, one lease holder."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from gateway.config import parse_config
from gateway.store import lease
from gateway.store import models as catalog
from gateway.store.engine import Store
from gateway.store.profiling import last_reprofile_run
from gateway.store.tables import Feedback, RequestRow
from profiling.reprofile import ClusterFeedback, reprofile
from profiling.schedule import Reprofiler, run_reprofile

KEY = catalog.profile_key("v1", "kmeans")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'r.db'}")
    s.upgrade()
    return s


def _served(store: Store, model: str, cluster: int, score: float, key_id: int | None = None) -> None:
    rid = uuid.uuid4().hex
    with store.session() as s:
        s.add(RequestRow(id=uuid.uuid4().hex[:32], request_id=rid, key_id=None, requested_model="auto",
                         routed_model=model, cluster=cluster, status_code=200, stream=False,
                         started_at=datetime.now(UTC)))
        s.add(Feedback(request_id=rid, key_id=key_id, score=score))


def test_reprofile_updates_versions_and_reports_drift(store: Store) -> None:
    catalog.save_profile(store, "a", KEY, [0.2, 0.5], [10, 10], "validation")
    catalog.save_profile(store, "b", KEY, [0.4, 0.4], [10, 10], "validation")
    for _ in range(10):
        _served(store, "a", 1, 1.0)  # a is much better on cluster 1 than its validation said
    _served(store, "b", 0, 0.0)
    report = run_reprofile(store, KEY)
    assert report["models"]["a"]["status"] == "updated" and report["models"]["a"]["feedback"] == 10
    expected = reprofile(np.array([0.2, 0.5]), np.array([10.0, 10.0]), [ClusterFeedback(1, 1.0)] * 10).psi
    active = catalog.active_profiles(store, KEY)
    assert np.allclose(active["a"].psi, expected) and active["a"].version == 2
    top = report["drift"][0]
    assert (top["model"], top["cluster"]) == ("a", 1) and top["change"] < 0
    assert [(p.version, p.source, p.active) for p in catalog.profile_history(store, "a", KEY)] == [
        (1, "validation", False), (2, "feedback", True)]
    # idempotent: the same feedback gives the same Ψ, no new version
    again = run_reprofile(store, KEY)
    assert again["models"]["a"]["status"] == "unchanged" and again["drift"] == []
    assert catalog.active_profiles(store, KEY)["a"].version == 2
    run = last_reprofile_run(store)
    assert run is not None and run["models"]["a"]["status"] == "unchanged"


def test_feedback_from_another_key_is_ignored(store: Store) -> None:
    catalog.save_profile(store, "a", KEY, [0.2, 0.5], [10, 10], "validation")
    _served(store, "a", 0, 0.0, key_id=999)  # the request had no key; feedback claims key 999
    assert run_reprofile(store, KEY)["models"]["a"]["feedback"] == 0


def test_one_pass_at_a_time_and_one_scheduled_pass_per_interval(store: Store) -> None:
    catalog.save_profile(store, "a", KEY, [0.2, 0.5], [10, 10], "validation")
    cfg = parse_config({"profiling": {"reprofile_interval_s": 60}})
    r1, r2 = Reprofiler(cfg, store, KEY), Reprofiler(cfg, store, KEY)
    assert r1.run_once(min_interval_s=60) is not None
    assert lease.holder_of(store, "reprofile") is None  # released as soon as the pass ended
    assert r2.run_once(min_interval_s=60) is None  # the scheduled job: a pass ran less than an interval ago ...
    assert r1.run_once(min_interval_s=60) is None  # ... whichever replica ran it
    assert r2.run_once() is not None  # a pass asked for now (admin endpoint, CLI) runs
    assert lease.acquire(store, "reprofile", "another-replica", 60)  # a pass running elsewhere
    assert r1.run_once() is None and r1.run_once(min_interval_s=60) is None
    busy = r1.busy_error()
    assert busy.status_code == 409 and "running on another-replica" in busy.message


def test_reprofiling_needs_a_router_key(store: Store) -> None:
    with pytest.raises(Exception, match="needs the UniRoute router"):
        Reprofiler(parse_config({}), store, None).run_once()


def test_reprofile_cli(tmp_path: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from gateway.cli.main import main as cli
    from routing.artifact import RouterArtifact

    art = RouterArtifact(embedder_id="t", k=2, centroids=np.eye(2), theta=None, val_prompt_ids=["p0", "p1"],
                         val_prompts=["a", "b"], val_embeddings=np.eye(2), training_set_hash="h", variant="kmeans")
    art.save(tmp_path / "art")
    key = catalog.profile_key(art.version, "kmeans")
    catalog.save_profile(store, "a", key, [0.2, 0.5], [10, 10], "validation")
    _served(store, "a", 0, 0.0)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"database_url": str(store.url.render_as_string(hide_password=False)),
                                   "router": {"policy": "uniroute", "artifact": str(tmp_path / "art"),
                                              "variant": "kmeans"}}))
    assert cli(["reprofile", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "a: updated (1 feedback)" in out and "| a | 0 |" in out
    assert lease.acquire(store, "reprofile", "another-replica", 60)
    assert cli(["reprofile", "--config", str(cfg)]) == 1
    assert "running on another-replica" in capsys.readouterr().err
