"""The impact report of a model before it serves (routing/impact.py; profiling with ``activate=False``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from gateway.access.auth import create_key
from gateway.config import GatewayConfig, parse_config
from gateway.serving.interfaces import RequestRecord
from gateway.spec import parse_spec
from gateway.store import impact as impact_sql
from gateway.store import keys as keys_sql
from gateway.store import models as catalog
from gateway.store import pacing as pacing_sql
from gateway.store.engine import Store
from gateway.store.requestlog import RequestLogWriter
from profiling.impact import key_rows
from profiling.profiler import SqlOutcomeStore, run_profiling
from profiling.runner import Outcome
from routing.artifact import RouterArtifact
from routing.impact import cluster_traffic, impact_report, plot_report
from routing.policy import PoolModel
from tests.test_profiler import FakeForwarder, _artifact, _config


def test_share_cost_and_error_follow_the_traffic_mix() -> None:
    z = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2)  # validation prompts: 4 of cluster 0, 2 of cluster 1
    pool = [PoolModel("old", 1.0, np.array([0.2, 0.6]))]
    new = PoolModel("new", 0.5, np.array([0.3, 0.3]))
    rep = impact_report(z, pool, new, np.array([0.25, 0.75]), [("grid", 0.0), ("grid", 1.0), ("key a", 0.05)])
    assert rep.pool_best == [0.2, 0.6] and rep.pool_best_model == ["old", "old"] and rep.coverage == 1.0
    at0, at1, key = rep.lambdas
    assert at0.clusters_won == [1] and at0.traffic_share == pytest.approx(0.75)
    assert at0.mean_error_after == pytest.approx(0.25 * 0.2 + 0.75 * 0.3)
    assert at0.mean_cost_after == pytest.approx(0.25 * 1.0 + 0.75 * 0.5) and at0.mean_cost_before == 1.0
    assert at1.clusters_won == [0, 1] and at1.traffic_share == 1.0  # cheaper and good enough everywhere at λ=1
    assert key.label == "key a" and key.lam == 0.05
    # no logged traffic: the validation prompts' own mix (4:2)
    assert impact_report(z, pool, new, None, [("grid", 0.0)]).lambdas[0].traffic_share == pytest.approx(2 / 6)
    # traffic in a cluster without validation prompts is left out, and said so
    z3 = np.hstack([z, np.zeros((6, 1))])
    pool3 = [PoolModel("old", 1.0, np.array([0.2, 0.6, 0.5]))]
    rep3 = impact_report(z3, pool3, PoolModel("new", 0.5, np.array([0.3, 0.3, 0.3])), np.array([0.2, 0.6, 0.2]),
                         [("grid", 0.0)])
    assert rep3.coverage == pytest.approx(0.8) and rep3.lambdas[0].traffic_share == pytest.approx(0.75)
    assert cluster_traffic([0, 1, 1, None, 7], 2).tolist() == [1 / 3, 2 / 3]
    assert "| 1 | 75.0% | 0.300 **<** | 0.600 | old |" in rep.table()


def test_impact_needs_a_profile_and_someone_to_compare_with() -> None:
    z = np.eye(2)
    with pytest.raises(ValueError, match="no profile"):
        impact_report(z, [PoolModel("old", 1.0, np.array([0.2, 0.6]))], PoolModel("new", 1.0), None, [])
    with pytest.raises(ValueError, match="no other profiled model"):
        impact_report(z, [], PoolModel("new", 1.0, np.array([0.2, 0.6])), None, [])


def _pool(tmp_path: Path) -> tuple[Store, RouterArtifact]:
    """A migrated SQLite store with the artifact's pool: "old" (routable, profiled Ψ = [0.2, 0.6]) and "new"
    (not routable yet, no profile); and that artifact."""
    store = Store(f"sqlite:///{tmp_path / 'p.db'}")
    store.upgrade()
    art = _artifact()
    for name, routable in (("old", True), ("new", False)):
        catalog.add_model(store, parse_spec({"name": name, "router_cost": 1.0, "routable": routable,
                                             "litellm_params": {"model": f"openai/{name}"}}))
    catalog.save_profile(store, "old", catalog.profile_key(art.version, "kmeans"), np.array([0.2, 0.6]),
                         np.array([6.0, 6.0]), "validation")
    return store, art


async def test_profiling_reports_the_impact_before_activation(tmp_path: Path) -> None:
    store, art = _pool(tmp_path)
    key = catalog.profile_key(art.version, "kmeans")
    create_key(store, "alice", default_lambda=0.4)
    writer = RequestLogWriter(store, spill_dir=tmp_path / "spill", journal=False).start()  # recent traffic: 10 requests of cluster 0, 30 of cluster 1
    for i in range(40):
        writer.submit(RequestRecord(request_id=f"r{i}", started_at=datetime.now(UTC), requested_model="auto",
                                    stream=False, cluster=0 if i < 10 else 1, routed_model="old"))
    writer.close()
    fwd = FakeForwarder()
    res = await run_profiling(_config(3), store, fwd, "new", artifact=art)  # the default: report, do not activate
    # "new" answers (A) everywhere: wrong on a third of each cluster, so Ψ ≈ [0.33, 0.33] against old's [0.2, 0.6]
    assert not res.activated and res.impact is not None and res.psi is not None
    assert "NOT activated" in res.message and "--activate" in res.message and not catalog.spec_from_row(catalog.get_model(store, "new")).routable
    assert "new" not in catalog.active_profiles(store, key)
    assert res.impact.traffic_requests == 40 and res.impact.traffic == pytest.approx([0.25, 0.75])
    at0 = next(x for x in res.impact.lambdas if x.label == "grid" and x.lam == 0.0)
    assert at0.clusters_won == [1] and at0.traffic_share == pytest.approx(0.75)
    assert at0.candidate_error == pytest.approx(res.psi[1])  # it takes cluster 1's traffic, at its Ψ there
    assert [x.lam for x in res.impact.lambdas if x.label == "key alice"] == [0.4]
    assert res.as_dict()["impact"]["traffic_requests"] == 40
    assert plot_report(res.impact, tmp_path / "impact.png").stat().st_size > 10_000
    assert impact_sql.pending_impact(store, "new") is not None
    # the second call activates what was reported: nothing asked or graded again, the same Ψ and report
    again = await run_profiling(_config(3), store, FakeForwarder({"question 0"}), "new", artifact=art, activate=True)
    assert again.activated and again.impact is not None and fwd.calls == 12 and "nothing asked" in again.message
    assert again.impact.as_dict() == res.impact.as_dict() and again.psi == res.psi
    assert np.allclose(catalog.active_profiles(store, key)["new"].psi, res.psi) and catalog.spec_from_row(catalog.get_model(store, "new")).routable
    assert impact_sql.pending_impact(store, "new") is None
    row = impact_sql.latest_impact(store, "new")
    assert row is not None and row.status == "activated" and row.activated_at is not None
    # a second --activate now has no reported profile: it profiles (resuming: nothing to ask) and activates
    third = await run_profiling(_config(3), store, fwd, "new", artifact=art, activate=True)
    assert third.activated and fwd.calls == 12 and third.report.skipped == 12 and "nothing asked" not in third.message
    rows = impact_sql.due_followups(store, 0.0)  # only the latest activation is followed up
    latest = impact_sql.latest_impact(store, "new")
    assert latest is not None and rows == [latest.id]
    superseded = impact_sql.get_impact(store, row.id)
    assert superseded is not None and superseded.status == "superseded"
    store.dispose()


async def test_a_stale_report_is_not_activated_as_reported(tmp_path: Path) -> None:
    """A reported profile whose outcomes or router cost changed since is profiled again before activation."""
    store, art = _pool(tmp_path)
    fwd = FakeForwarder()
    first = await run_profiling(_config(3), store, fwd, "new", artifact=art)
    assert not first.activated and first.impact is not None
    catalog.update_model(store, "new", {"router_cost": 0.5})  # the report was for cost 1.0
    again = await run_profiling(_config(3), store, fwd, "new", artifact=art, activate=True)
    assert again.activated and "nothing asked" not in again.message and again.report.skipped == 12
    assert again.impact is not None and again.impact.as_dict() != first.impact.as_dict()  # computed at cost 0.5
    # an outcome graded differently since (e.g. asked again after --restart) makes a report stale too
    fourth = await run_profiling(_config(3), store, fwd, "new", artifact=art)
    assert fourth.psi is not None and impact_sql.pending_impact(store, "new") is not None
    outcomes = SqlOutcomeStore(store, art.version)
    first_row = next(o for o in outcomes.outcomes("new") if o.prompt_id == "p0")
    outcomes.record(Outcome("new", "p0", first_row.cluster, 1.0 - float(first_row.score or 0.0), "changed", 0.0))
    late = await run_profiling(_config(3), store, fwd, "new", artifact=art, activate=True)
    assert late.activated and "nothing asked" not in late.message and late.psi != fourth.psi
    assert late.psi is not None
    assert np.allclose(catalog.active_profiles(store, catalog.profile_key(art.version, "kmeans"))["new"].psi, late.psi)
    # a report computed with another router artifact is not activated on this one
    await run_profiling(_config(3), store, fwd, "new", artifact=art)
    other = _artifact(14)
    moved = await run_profiling(_config(3), store, fwd, "new", artifact=other, activate=True)
    assert moved.activated and "nothing asked" not in moved.message and moved.router_version == other.version
    store.dispose()


async def test_the_traffic_mix_is_the_auto_requests_within_the_window(tmp_path: Path) -> None:
    """profiling.impact_window_s bounds the request log the report reads: older requests, requests that named
    a model and failed requests are not the recent ``auto`` traffic (docs/IMPACT.md)."""
    store, art = _pool(tmp_path)
    now = datetime.now(UTC)
    rows = ([(now - timedelta(minutes=5), "auto", 200, 0)] * 6  # the only recent auto traffic: cluster 0
            + [(now - timedelta(hours=2), "auto", 200, 1)] * 30  # outside a one-hour window
            + [(now - timedelta(minutes=5), "old", 200, 1)] * 10  # named a model
            + [(now - timedelta(minutes=5), "auto", 502, 1)] * 10)  # failed
    writer = RequestLogWriter(store, spill_dir=tmp_path / "spill", journal=False).start()
    for i, (at, requested, status, cluster) in enumerate(rows):
        writer.submit(RequestRecord(request_id=f"r{i}", started_at=at, requested_model=requested, stream=False,
                                    cluster=cluster, routed_model="old", status_code=status))
    writer.close()

    def config(window_s: float) -> GatewayConfig:
        return parse_config({"router": {"policy": "cheapest", "variant": "kmeans"},
                             "profiling": {"min_graded_per_cluster": 3, "attempts": 2, "impact_window_s": window_s}})

    hour = await run_profiling(config(3600.0), store, FakeForwarder(), "new", artifact=art)
    assert hour.impact is not None and hour.impact.traffic_requests == 6
    assert hour.impact.traffic == pytest.approx([1.0, 0.0])
    day = await run_profiling(config(86400.0), store, FakeForwarder(), "new", artifact=art)
    assert day.impact is not None and day.impact.traffic_requests == 36
    assert day.impact.traffic == pytest.approx([6 / 36, 30 / 36])
    store.dispose()


def test_a_paced_key_is_reported_at_its_paced_lambda(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'p.db'}")
    store.upgrade()
    create_key(store, "fixed", default_lambda=0.4)
    create_key(store, "paced", default_lambda=0.2, lambda_max=1.5)
    create_key(store, "fresh", default_lambda=0.3)
    for name in ("paced", "fresh"):
        keys_sql.set_budget_policy(store, name, "pace")
    now = datetime.now(UTC)
    pacing_sql.write(store, keys_sql.get_key(store, "paced").id, lam=1.7, integral=0.0, exposure=0.0,
                     period_start=now, updated_at=now, expected_version=None)
    assert key_rows(store) == [("key fixed", 0.4), ("key fresh (paced, not stepped yet: its default λ)", 0.3),
                               ("key paced (paced λ)", 1.5)]  # the pacer's 1.7, within the key's range
    store.dispose()


def test_the_cli_reports_by_default_and_activates_when_told() -> None:
    from gateway.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["profile", "m"]).activate is False
    assert parser.parse_args(["profile", "m", "--activate"]).activate is True
    assert parser.parse_args(["profile", "m", "--no-activate"]).activate is False  # still accepted: the default
    with pytest.raises(SystemExit):
        parser.parse_args(["profile", "m", "--activate", "--no-activate"])


async def test_a_failed_activation_leaves_the_report_waiting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, art = _pool(tmp_path)
    await run_profiling(_config(3), store, FakeForwarder(), "new", artifact=art)
    real = catalog.save_profile

    def down(*args: object, **kwargs: object) -> int:
        raise OSError("the database went away")

    monkeypatch.setattr(catalog, "save_profile", down)
    with pytest.raises(OSError):
        await run_profiling(_config(3), store, FakeForwarder(), "new", artifact=art, activate=True)
    assert impact_sql.pending_impact(store, "new") is not None and not catalog.spec_from_row(catalog.get_model(store, "new")).routable
    monkeypatch.setattr(catalog, "save_profile", real)
    done = await run_profiling(_config(3), store, FakeForwarder(), "new", artifact=art, activate=True)
    assert done.activated and "nothing asked" in done.message
    store.dispose()
