"""Per-cluster drift alerts (issue #13 point 3; docs/ROUTING_FEATURES.md).

- the estimator: realised error against Ψ with a Hoeffding bound; demotion only when the drift holds
  without the key that sent the most feedback (no one key demotes a model);
- the shipped alerting rules pass ``promtool test rules`` (deploy/alerts_test.yml) and ``promtool check
  rules``; the dashboard and the rules name only metrics a real gateway's ``/metrics`` exposes;
- end to end, a real gateway (keys mode, replay upstream): thumbs down from one key raise the gauge and the
  alert flag but do not demote; a second key's agreeing feedback demotes the model on that cluster only, at
  the next re-profiling pass, and ``auto`` then routes that cluster elsewhere.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import yaml

from profiling.reprofile import ClusterFeedback, cluster_drift, hoeffding_bound
from tests.procs import replay_upstream
from tests.routing_features import ADMIN, fit, gateway
from tests.storeutil import REPO_ROOT, require

DEPLOY = REPO_ROOT / "deploy"
PROMPT = "Compute the derivative of the polynomial given below."


# ------------------------------------------------------------------------------------------- the estimator
def test_hoeffding_bound() -> None:
    assert hoeffding_bound(100, 0.95) == pytest.approx(np.sqrt(np.log(40) / 200))
    assert hoeffding_bound(0, 0.95) == float("inf")
    assert hoeffding_bound(400, 0.95) < hoeffding_bound(100, 0.95) < hoeffding_bound(100, 0.99)


def test_cluster_drift_alert_and_demotion_need_more_than_one_key() -> None:
    psi = np.array([0.1, 0.1, 0.5])
    bad = [ClusterFeedback(0, 0.0, key=1)] * 30  # one key: 30 thumbs down on cluster 0
    ok = [ClusterFeedback(1, 1.0, key=1)] * 30 + [ClusterFeedback(1, 0.0, key=2)] * 3  # cluster 1: as profiled
    few = [ClusterFeedback(2, 0.0, key=3)] * 5  # cluster 2: too little feedback to say anything
    rows, new = cluster_drift("m", psi, bad + ok + few, min_feedback=20, confidence=0.95, demote=True)
    by = {r.cluster: r for r in rows}
    assert set(by) == {0, 1}  # cluster 2 has fewer than min_feedback rows
    assert by[0].realised == 1.0 and by[0].drift == pytest.approx(0.9) and by[0].alert
    assert by[0].demoted_to is None and np.array_equal(new, psi)  # one key alone never demotes
    assert by[1].realised == pytest.approx(3 / 33) and not by[1].alert
    # a second key agrees: demoted to the lower confidence bound, cluster 0 only
    second = [ClusterFeedback(0, 0.0, key=2)] * 25
    rows, new = cluster_drift("m", psi, bad + second + ok, min_feedback=20, confidence=0.95, demote=True)
    by = {r.cluster: r for r in rows}
    assert by[0].demoted_to == pytest.approx(1.0 - hoeffding_bound(25, 0.95))  # the lower of the two bounds
    assert new[0] == by[0].demoted_to and new[1] == psi[1] and new[2] == psi[2]
    assert by[0].as_dict()["demoted_to"] == by[0].demoted_to and by[0].as_dict()["alert"] is True
    # without drift_demote nothing is demoted
    rows, new = cluster_drift("m", psi, bad + second, min_feedback=20, confidence=0.95, demote=False)
    assert rows[0].alert and rows[0].demoted_to is None and np.array_equal(new, psi)


def test_the_pass_report_prints_the_drift_rows() -> None:
    """What ``uniroute reprofile`` prints: one row per (model, cluster) measured, largest drift first, with the
    bound and whether it is in alert or was demoted (profiling.schedule.format_report)."""
    from profiling.reprofile import ClusterDrift
    from profiling.schedule import format_report

    rows = [ClusterDrift("m", 0, 30, 2, 0.9, 0.1, hoeffding_bound(30, 0.95), demoted_to=0.652),
            ClusterDrift("m", 1, 40, 1, 0.5, 0.2, hoeffding_bound(40, 0.95)),
            ClusterDrift("n", 3, 25, 3, 0.2, 0.25, hoeffding_bound(25, 0.95))]
    report = {"router": "r1", "models": {"m": {"status": "updated", "feedback": 70}, "n": {"status": "unchanged"}},
              "drift": [], "cluster_drift": [r.as_dict() for r in rows]}
    out = format_report(report)
    b30, b40, b25 = (hoeffding_bound(n, 0.95) for n in (30, 40, 25))
    assert "| model | cluster | feedback | realised | Ψ | drift | bound | alert |" in out
    assert f"| m | 0 | 30 | 0.900 | 0.100 | +0.800 | {b30:.3f} | demoted to 0.652 |" in out
    assert f"| m | 1 | 40 | 0.500 | 0.200 | +0.300 | {b40:.3f} | yes |" in out
    assert f"| n | 3 | 25 | 0.200 | 0.250 | -0.050 | {b25:.3f} |  |" in out
    assert "realised error against" not in format_report({**report, "cluster_drift": []})


def test_drift_gauges_keep_to_registry_models_and_drop_pairs_no_longer_measured() -> None:
    from gateway.metrics import Metrics

    m = Metrics()
    m.set_registry(["a", "b"])
    row = {"drift": 0.3, "bound": 0.1, "feedback": 40}
    m.set_profile_drift([{**row, "model": "a", "cluster": 0}, {**row, "model": "gone", "cluster": 1},
                         {**row, "model": "b", "cluster": 2}])
    text = m.render().decode()
    assert 'uniroute_profile_drift{cluster="0",model="a"} 0.3' in text
    assert 'uniroute_profile_drift_feedback{cluster="2",model="b"} 40.0' in text
    assert 'model="gone"' not in text and 'model="other"' not in text  # never a model outside the registry
    m.set_profile_drift([{**row, "model": "b", "cluster": 2}])  # the next pass measured only b
    text = m.render().decode()
    assert 'model="a"' not in text and 'uniroute_profile_drift_bound{cluster="2",model="b"} 0.1' in text


# -------------------------------------------------------------------------------------- the shipped rules
def _promtool() -> str:
    path = shutil.which("promtool")
    require("promtool (Debian package prometheus)", path is not None)
    assert path is not None
    return path


def test_promtool_unit_tests_of_the_shipped_alerting_rules() -> None:
    promtool = _promtool()
    out = subprocess.run([promtool, "check", "rules", str(DEPLOY / "alerts.yml")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=DEPLOY, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    # prometheus.yml loads them
    assert "alerts.yml" in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["rule_files"]


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:litellm|uniroute)_[a-z_]+)", expr))


def _dashboard_and_rule_metrics() -> set[str]:
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    used = {n for p in dash["panels"] for t in p.get("targets", []) for n in _names_in(t["expr"])}
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    used |= {n for g in rules["groups"] for r in g["rules"] for n in _names_in(r["expr"])}
    return used


def _exposed(text: str) -> set[str]:
    """Every sample name a /metrics text can carry: its samples, and each family's names by its TYPE."""
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("_sum", "_count", "_created")}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names |= {name, *(name.removesuffix("_total") + s for s in suffixes.get(kind, ("",)))}
    return names


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return fit(tmp_path_factory.mktemp("drift"))


@pytest.fixture(scope="module")
def base(fitted: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data, art = fitted
    tmp = tmp_path_factory.mktemp("drift-gw")
    with replay_upstream(data) as replay, \
            gateway(tmp, data, art, replay, f"sqlite:///{tmp / 'gw.db'}",
                    profiling={"drift_min_feedback": 10, "drift_demote": True}) as url:
        yield url


def _thumbs_down(base: str, key: str, n: int) -> str:
    """``n`` auto requests of PROMPT by ``key``, each rated thumbs down; returns the model that served them."""
    served = set()
    with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as client, \
            httpx.Client(base_url=base, headers={"authorization": f"Bearer {key}"}, timeout=30) as h:
        for _ in range(n):
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": PROMPT}])
            served.add(raw.parse().model)
            r = h.post("/v1/feedback", json={"request_id": raw.headers["x-uniroute-request-id"], "thumbs": "down"})
            assert r.status_code == 201, r.text
    assert len(served) == 1, served
    return served.pop()


def _metrics(admin: httpx.Client) -> str:
    r = admin.get("/metrics")
    assert r.status_code == 200
    return r.text


def _gauge(text: str, name: str, model: str, cluster: int) -> float | None:
    m = re.search(rf'^{name}{{cluster="{cluster}",model="{model}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def _poll(fn: Any, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        out = fn()
        if out or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def test_drift_gauges_alert_and_demotion_on_a_real_gateway(base: str) -> None:
    admin = httpx.Client(base_url=base, headers={"authorization": f"Bearer {ADMIN}"}, timeout=60)

    def key(name: str) -> str:
        r = admin.post("/admin/keys", json={"name": name, "lambda": 0.05})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    alice, bob = key("alice"), key("bob")
    route = {"messages": [{"role": "user", "content": PROMPT}]}
    before = httpx.post(base + "/v1/route", json=route, headers={"authorization": f"Bearer {alice}"}).json()
    cluster = before["cluster"]
    assert before["model"] == "accurate"
    # no feedback yet: a pass measures no drift, /metrics has the families but no series
    r = admin.post("/admin/reprofile")
    assert r.status_code == 200 and r.json()["cluster_drift"] == []
    assert _gauge(_metrics(admin), "uniroute_profile_drift", "accurate", cluster) is None
    # one key: 12 thumbs down on what the router thinks is its best model there
    assert _thumbs_down(base, alice, 12) == "accurate"
    report = admin.post("/admin/reprofile").json()
    rows = [d for d in report["cluster_drift"] if d["model"] == "accurate"]
    assert admin.get("/admin/reprofile/last").json()["cluster_drift"] == report["cluster_drift"]
    assert len(rows) == 1 and rows[0]["cluster"] == cluster and rows[0]["feedback"] == 12 and rows[0]["keys"] == 1
    assert rows[0]["realised_error"] == 1.0 and rows[0]["alert"] is True and rows[0]["demoted_to"] is None
    assert rows[0]["bound"] == pytest.approx(hoeffding_bound(12, 0.95))
    assert "demoted_clusters" not in report["models"]["accurate"]
    # every replica exports the stored rows (here: the one), within a second or two

    def exported() -> str | None:
        t = _metrics(admin)
        return t if _gauge(t, "uniroute_profile_drift", "accurate", cluster) is not None else None

    text = _poll(exported)
    assert text, "uniroute_profile_drift never appeared on /metrics"
    assert _gauge(text, "uniroute_profile_drift", "accurate", cluster) == pytest.approx(rows[0]["drift"])
    assert _gauge(text, "uniroute_profile_drift_bound", "accurate", cluster) == pytest.approx(rows[0]["bound"])
    assert _gauge(text, "uniroute_profile_drift_feedback", "accurate", cluster) == 12
    # the dashboard and the alerting rules use only what this /metrics exposes
    assert "uniroute_profile_drift_typo" not in _exposed(text)  # the check can fail
    missing = _dashboard_and_rule_metrics() - _exposed(text)
    assert not missing, f"deploy/ uses metrics /metrics does not expose: {sorted(missing)}"
    # a second key agrees: the next pass demotes accurate on this cluster only
    assert _thumbs_down(base, bob, 12) == "accurate"
    report = admin.post("/admin/reprofile").json()
    assert report["models"]["accurate"]["demoted_clusters"] == [cluster]
    row = next(d for d in report["cluster_drift"] if d["model"] == "accurate")
    assert row["demoted_to"] == pytest.approx(1.0 - hoeffding_bound(12, 0.95))
    psi = admin.get("/admin/models/accurate").json()["profile"]["psi"]
    assert psi[cluster] == pytest.approx(row["demoted_to"])
    assert all(p < 0.5 for k, p in enumerate(psi) if k != cluster)  # the other cluster keeps its profile
    # the next pass recomputes from the prior and all feedback: the demotion holds, nothing new is stored
    again = admin.post("/admin/reprofile").json()
    assert again["models"]["accurate"]["demoted_clusters"] == [cluster]
    assert again["models"]["accurate"]["status"] == "unchanged"
    assert admin.get("/admin/models/accurate").json()["profile"]["psi"] == psi
    # the registry poll brings the demoted profile: auto now routes this cluster elsewhere, with Ψ_k as demoted

    def moved() -> dict[str, Any] | None:
        out: dict[str, Any] = httpx.post(base + "/v1/route", json={**route, "uniroute": {"lambda": 0.0}},
                                         headers={"authorization": f"Bearer {alice}"}).json()
        return out if out["model"] != "accurate" else None

    after = _poll(moved)
    assert after, "the demoted model still leads the ranking"
    psi_after = next(r["expected_error"] for r in after["ranking"] if r["model"] == "accurate")
    assert psi_after == pytest.approx(row["demoted_to"])  # K-means: one-hot z, expected error = Ψ_k
    admin.close()
