"""The impact report's follow-up (profiling/followup.py): realised share, cost and error since activation against
what was predicted; scheduled under a lease, forced with --now, read through the admin API and the CLI."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.cli.main import main as cli
from gateway.config import parse_config
from gateway.serving.interfaces import RequestRecord
from gateway.spec import parse_spec
from gateway.store import feedback as feedback_sql
from gateway.store import impact as impact_sql
from gateway.store import lease
from gateway.store import models as catalog
from gateway.store.engine import Store
from gateway.store.requestlog import RequestLogWriter
from gateway.store.tables import utcnow
from profiling.followup import LEASE_NAME, ImpactFollowups, format_impact
from profiling.profiler import run_profiling
from routing.impact import Served, predicted_at_mix, realised_figures
from routing.policy import PoolModel
from tests.storeutil import database
from tests.test_profiler import FakeForwarder, _artifact

ADMIN = "sk-admin-impact-test"
H = {"authorization": f"Bearer {ADMIN}"}


def _config(db: Path | str, followup_s: float = 3600.0) -> Any:
    url = db if isinstance(db, str) else f"sqlite:///{db}"
    return parse_config({"auth": {"mode": "open"}, "database_url": url,
                         "router": {"policy": "cheapest", "variant": "kmeans", "default_lambda": 0.1},
                         "registry": {"poll_interval_s": 0.2},
                         "profiling": {"min_graded_per_cluster": 3, "impact_followup_s": followup_s},
                         "models": [{"name": "old", "router_cost": 2.0,
                                     "litellm_params": {"model": "openai/old", "api_base": "http://127.0.0.1:9/v1",
                                                        "api_key": "x"}}]})


def _setup(cfg: Any) -> Store:
    """old (cost 2, Ψ [0.2, 0.6]) serves; new (cost 1) is profiled and activated: Ψ ≈ [0.33, 0.33]."""
    store = Store(cfg.database_url)
    store.upgrade()
    catalog.seed_models(store, cfg.models)
    catalog.add_model(store, parse_spec({"name": "new", "router_cost": 1.0, "routable": False,
                                         "litellm_params": {"model": "openai/new"}}))
    art = _artifact()
    catalog.save_profile(store, "old", catalog.profile_key(art.version, "kmeans"), np.array([0.2, 0.6]),
                         np.array([6.0, 6.0]), "validation")
    res = asyncio.run(run_profiling(cfg, store, FakeForwarder(), "new", artifact=art, activate=True))
    assert res.activated and res.impact is not None
    return store


def _log(store: Store, tmp_path: Path, rows: Sequence[tuple[str, float | None, int, float]],
         scores: dict[int, float]) -> None:
    """Logged `auto` requests (model, λ, cluster, cost) after the activation; feedback ``scores`` by row index."""
    writer = RequestLogWriter(store, spill_dir=tmp_path / "spill", journal=False).start()
    for i, (model, lam, cluster, cost) in enumerate(rows):
        writer.submit(RequestRecord(request_id=f"r{i}", started_at=datetime.now(UTC), requested_model="auto",
                                    stream=False, cluster=cluster, routed_model=model, lam=lam, cost_usd=cost))
    # a failed request and a named one are not `auto` traffic the model could have taken
    writer.submit(RequestRecord(request_id="failed", started_at=datetime.now(UTC), requested_model="auto",
                                stream=False, cluster=0, routed_model="new", status_code=502))
    writer.submit(RequestRecord(request_id="named", started_at=datetime.now(UTC), requested_model="old",
                                stream=False, routed_model="old"))
    writer.close()
    for i, s in scores.items():
        feedback_sql.add_feedback(store, f"r{i}", None, s, "test")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with database(request.param, tmp_path) as url:
        yield url


def test_realised_figures_and_the_prediction_at_the_realised_lambdas(tmp_path: Path, db_url: str) -> None:
    cfg = _config(db_url)
    store = _setup(cfg)
    # 40 requests: 30 in cluster 1 (12 of them served by new), 10 in cluster 0 (old); λ 0 and the default (None)
    rows = ([("new", 0.0, 1, 0.001)] * 12 + [("old", 0.0, 1, 0.004)] * 18 + [("old", None, 0, 0.002)] * 10)
    _log(store, tmp_path, rows, {0: 1.0, 1: 0.0, 2: 1.0, 12: 1.0, 30: 0.5})
    followups = ImpactFollowups(cfg, store, artifact=_artifact())
    out = followups.run_now("new")
    f = out["followup"]
    r = f["realised"]
    assert r["requests"] == 40 and r["model_requests"] == 12 and r["traffic_share"] == pytest.approx(0.3)
    assert r["mean_cost_usd"] == pytest.approx((12 * 0.001 + 18 * 0.004 + 10 * 0.002) / 40)
    assert r["mean_cost"] == pytest.approx((12 * 0.5 + 28 * 1.0) / 40)  # router costs 1 and 2, by the dearest
    assert r["scored_requests"] == 5 and r["mean_error"] == pytest.approx((0 + 1 + 0 + 0 + 0.5) / 5)
    assert r["model_scored_requests"] == 3 and r["model_error"] == pytest.approx(1 / 3)
    # predicted: the report's pool, costs and cluster mix (no logged traffic before: the validation mix 1:1),
    # at the realised λ mix: 30 requests at λ 0, 10 at the default 0.1
    row = impact_sql.latest_impact(store, "new")
    assert row is not None and row.inputs is not None
    z = _artifact().membership(_artifact().val_embeddings, "kmeans")
    pool = [PoolModel("old", 2.0, np.array([0.2, 0.6]))]
    cand = PoolModel("new", 1.0, np.asarray(row.profiles["kmeans"]["psi"]))
    assert row.report is not None
    want = predicted_at_mix(z, pool, cand, np.asarray(row.report["traffic"]), {0.0: 30, 0.1: 10})
    assert f["predicted"] == pytest.approx(want)
    assert f["predicted"]["traffic_share"] == pytest.approx(0.5)  # new wins cluster 1 (half of the validation mix)
    # on the realised cluster mix (3:1 toward cluster 1) new would have taken 75 %
    assert f["predicted_on_realised_clusters"]["traffic_share"] == pytest.approx(0.75)
    by_lam = {x["lambda"]: x for x in f["per_lambda"]}
    assert by_lam[0.0]["requests"] == 30 and by_lam[0.0]["realised_share"] == pytest.approx(0.4)
    assert by_lam[0.1]["requests"] == 10 and by_lam[0.1]["realised_share"] == 0.0
    text = format_impact(out)
    assert "| share of `auto` traffic served by new | 50.0% | 75.0% | 30.0% | 40 |" in text
    latest = impact_sql.latest_impact(store, "new")
    assert latest is not None and latest.followup == f
    # another artifact loaded than the report's: the realised figures only, and a note saying why
    other = _artifact(14)
    later = ImpactFollowups(cfg, store, artifact=other).run_now("new")["followup"]
    assert later["predicted"] is None and "not the one loaded" in later["note"] and later["realised"] == r
    store.dispose()


def test_the_scheduled_followup_is_due_once_under_the_lease(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "s.db", followup_s=3600.0)
    store = _setup(cfg)
    _log(store, tmp_path, [("new", 0.0, 1, 0.001), ("old", 0.0, 0, 0.002)], {})
    followups = ImpactFollowups(cfg, store, artifact=_artifact())
    assert followups.run_due() == []  # activated just now: not due for an hour
    followups.run_now("new")  # forced early: the scheduled one still runs when due
    later = utcnow() + timedelta(hours=2)
    assert lease.acquire(store, LEASE_NAME, "another-replica", 60.0)
    assert followups.run_due(now=later) is None  # another replica holds the lease
    lease.release(store, LEASE_NAME, "another-replica")
    done = followups.run_due(now=later)
    assert done is not None and [d["model"] for d in done] == ["new"]
    assert done[0]["followup"]["realised"]["traffic_share"] == 0.5
    assert followups.run_due(now=later + timedelta(hours=1)) == []  # once
    off = ImpactFollowups(_config(tmp_path / "s.db", followup_s=0.0), store, artifact=_artifact())
    assert off.run_due(now=later + timedelta(days=30)) == []  # 0: off
    store.dispose()


def test_due_followups_are_looked_for_every_tenth_of_the_delay() -> None:
    from profiling.schedule import ReprofileScheduler

    assert ReprofileScheduler.followup_check_s(86400.0) == 300.0
    assert ReprofileScheduler.followup_check_s(600.0) == 60.0
    assert ReprofileScheduler.followup_check_s(1.0) == 0.5


def test_realised_figures_without_traffic_or_feedback() -> None:
    empty = realised_figures("new", [], {"new": 1.0})
    assert empty["requests"] == 0 and empty["traffic_share"] is None and empty["mean_error"] is None
    r = realised_figures("new", [Served("gone", 0.1), Served("new", 0.1, 3, cost_usd=0.3, priced=2)], {"new": 0.5})
    assert r["traffic_share"] == 0.75 and r["priced_requests"] == 3 and r["mean_cost"] == 0.5  # "gone": no cost known
    assert r["mean_cost_usd"] == pytest.approx(0.15)  # over the 2 requests with a logged cost


def test_followup_through_the_admin_api_and_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    db = tmp_path / "a.db"
    cfg = _config(db, followup_s=1.0)  # due a second after the activation; looked for every 0.5 s
    store = _setup(cfg)
    catalog.add_model(store, parse_spec({"name": "waiting", "router_cost": 1.0, "routable": False,
                                         "litellm_params": {"model": "openai/waiting"}}))
    asyncio.run(run_profiling(cfg, store, FakeForwarder(), "waiting", artifact=_artifact()))  # reported only
    _log(store, tmp_path, [("new", 0.0, 1, 0.001)] * 3 + [("old", 0.0, 0, 0.002)], {0: 0.0})
    with TestClient(create_app(cfg)) as a:
        assert a.get("/admin/models/new/impact").status_code == 401
        assert a.get("/admin/models/ghost/impact", headers=H).status_code == 404
        r = a.get("/admin/models/old/impact", headers=H)
        assert r.status_code == 404 and "no impact report for 'old'" in r.json()["error"]["message"]
        r = a.get("/admin/models/waiting/impact", headers=H)
        assert r.status_code == 200 and r.json()["status"] == "reported" and r.json()["report"]["lambdas"]
        r = a.post("/admin/models/waiting/impact", headers=H)
        assert r.status_code == 409 and "--activate" in r.json()["error"]["message"]
        assert a.post("/admin/models/new/impact", headers=H, json={"x": 1}).status_code == 400
        assert a.post("/admin/models/new/impact", headers=H, content=b"{nope").status_code == 400
        # the scheduler inside the app computes the due follow-up (no UniRoute router here: realised figures only)
        deadline = time.monotonic() + 20
        while (shown := a.get("/admin/models/new/impact", headers=H).json())["followup"] is None:
            assert time.monotonic() < deadline, "the scheduled follow-up never ran"
            time.sleep(0.2)
        f = shown["followup"]
        assert shown["status"] == "activated" and f["realised"]["traffic_share"] == 0.75
        assert f["realised"]["model_error"] == 1.0 and f["predicted"] is None and "artifact" in f["note"]
        forced = a.post("/admin/models/new/impact", headers=H)
        assert forced.status_code == 200 and forced.json()["followup_at"] >= shown["followup_at"]
    # the CLI reads the same rows
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(f"database_url: sqlite:///{db}\nrouter: {{policy: cheapest}}\n", encoding="utf-8")
    assert cli(["impact", "new", "--config", str(cfg_file)]) == 0
    out = capsys.readouterr().out
    assert "impact report of new (activated" in out and "| share of `auto` traffic served by new | — | — | 75.0% | 4 |" in out
    assert cli(["impact", "new", "--now", "--json", "--config", str(cfg_file)]) == 0
    assert '"traffic_share": 0.75' in capsys.readouterr().out
    assert cli(["impact", "waiting", "--now", "--config", str(cfg_file)]) == 1
    assert "--activate" in capsys.readouterr().err
    # the stored report (here one made through run_profiling, as the admin API makes it) drawn as a PNG
    png = tmp_path / "waiting.png"
    assert cli(["impact", "waiting", "--plot", str(png), "--config", str(cfg_file)]) == 0
    assert png.stat().st_size > 10_000 and f"impact plot: {png}" in capsys.readouterr().err
    impact_sql.save_impact(store, model="old", artifact_version="v", variant="kmeans", fingerprint="f",
                           source="validation", profiles={}, report=None, report_error="no other profiled model",
                           inputs=None, activated=False)
    assert cli(["impact", "old", "--plot", str(tmp_path / "old.png"), "--config", str(cfg_file)]) == 1
    assert "no impact report to draw (no other profiled model)" in capsys.readouterr().err
    assert not (tmp_path / "old.png").exists()
    store.dispose()
