"""Tenant-private profiles (issue #13 point 4; docs/ROUTING_FEATURES.md).

The bar: a key whose labels say model B beats model A on a cluster is routed there to B, while another key
is still routed to A — on a real gateway (``uniroute serve``, keys mode, SQLite and PostgreSQL) in front of the
replay upstream, with two keys, the labels uploaded by ``uniroute profiles upload``, the routing seen through
real chat completions (openai SDK) and ``/v1/route``. Also: the overlay is shrunk toward the global Ψ by
n/(n+m); the key's other cluster keeps the global Ψ; deleting the labels restores the global routing; bad
uploads are 400/404 and a client key cannot upload.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from gateway.serving.interfaces import LabelStats
from gateway.serving.tenants import TenantOverlays, aggregate, overlay
from routing.policy import PoolModel
from routing.synthetic import TOPICS
from tests.procs import ROOT, python, replay_upstream, server_env
from tests.routing_features import ADMIN, fit, gateway
from tests.storeutil import database

DBS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
PROMPT = "Compute the derivative of the polynomial given below."
M = 20.0  # profiling.tenant_prior_weight (the default)


# ------------------------------------------------------------------------------------------------ the overlay
def test_overlay_shrinks_toward_the_global_psi_by_label_count() -> None:
    psi = np.array([0.1, 0.6])
    z = np.array([[1.0, 0.0]] * 30 + [[0.25, 0.75]] * 4)
    stats = aggregate(z, [{"a": 0.0, "b": 1.0}] * 30 + [{"a": 1.0}] * 4)
    assert stats["a"].labels == 34 and stats["b"].labels == 30
    assert stats["a"].counts == pytest.approx((31.0, 3.0)) and stats["a"].errors == pytest.approx((30.0, 0.0))
    got = overlay(psi, stats["a"], M)
    assert got[0] == pytest.approx((30 + M * 0.1) / (31 + M))  # n/(n+m) on the key's own error rate
    assert got[1] == pytest.approx((0 + M * 0.6) / (3 + M))
    assert np.array_equal(overlay(psi, LabelStats((0.0, 0.0), (0.0, 0.0), 0), M), psi)  # no labels: global Ψ
    # only the owner's pool changes, cached per registry snapshot
    ov = TenantOverlays(M)
    pool = (PoolModel("a", 1.0, psi), PoolModel("b", 2.0, psi), PoolModel("new", 1.0, None))
    ov.replace({7: stats})
    assert ov.pool(8, pool) is None and ov.pool(None, pool) is None
    mine = ov.pool(7, pool)
    assert mine is not None and mine is ov.pool(7, pool)  # cached
    assert mine[2].psi is None  # labels never make an unprofiled model routable
    assert mine[0].psi is not None and np.allclose(mine[0].psi, got) and mine[1].psi is not None and mine[1].psi[0] < psi[0]
    ov.replace({7: stats})
    assert ov.pool(7, pool) is mine  # unchanged stats keep the cache
    ov.replace({})
    assert ov.pool(7, pool) is None
    with pytest.raises(ValueError):
        TenantOverlays(0)


# ------------------------------------------------------------------------------------------ end to end (the bar)
@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return fit(tmp_path_factory.mktemp("tenant-profiles"))


@pytest.fixture(scope="module")
def replay(fitted: tuple[Path, Path]) -> Iterator[str]:
    with replay_upstream(fitted[0]) as base:
        yield base


@pytest.fixture(params=DBS)
def base(request: pytest.FixtureRequest, tmp_path: Path, fitted: tuple[Path, Path], replay: str) -> Iterator[str]:
    data, art = fitted
    with database(request.param, tmp_path) as url, \
            gateway(tmp_path, data, art, replay, url, profiling={"tenant_feedback": True}) as gw:
        yield gw


def _prompts() -> list[str]:
    """Prompts in the benchmark's style (its topics' templates and words), not the benchmark's own."""
    out = []
    for words, templates in TOPICS.values():
        for t, (a, b) in itertools.product(templates, itertools.permutations(words, 2)):
            out.append(t.format(a=a, b=b))
    return out[::5]


def _route(http: httpx.Client, key: str, prompt: str) -> dict[str, Any]:
    """``/v1/route`` as ``key`` sees it; ``http`` is one client for the whole test (a client per call spends
    ~20 ms of CPU on its TLS context, and the test routes hundreds of prompts)."""
    r = http.post("/v1/route", json={"messages": [{"role": "user", "content": prompt}]},
                  headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def _served(client: openai.OpenAI, prompt: str) -> str:
    resp = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": prompt}])
    return str(resp.model)


def _err(report: dict[str, Any], model: str) -> float:
    return float(next(r["expected_error"] for r in report["ranking"] if r["model"] == model))


def test_a_keys_labels_route_its_cluster_to_b_while_another_key_stays_on_a(base: str, tmp_path: Path) -> None:
    admin = httpx.Client(base_url=base, headers={"authorization": f"Bearer {ADMIN}"}, timeout=120)
    http = httpx.Client(base_url=base, timeout=30)

    def key(name: str) -> str:
        r = admin.post("/admin/keys", json={"name": name, "lambda": 0.05})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    alice, bob = key("alice"), key("bob")
    target = _route(http, alice, PROMPT)
    c = target["cluster"]
    assert target["model"] == "accurate" and target["profile"] == "global"
    clusters = {p: _route(http, alice, p)["cluster"] for p in _prompts()}
    mine = [p for p, k in clusters.items() if k == c][:40]
    other = next(p for p, k in clusters.items() if k != c)
    assert len(mine) >= 20
    assert _route(http, bob, other)["model"] == "accurate"
    # bob's labels: on his prompts of cluster c, middling is right and accurate wrong
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"prompt": p, "scores": {"accurate": 0, "middling": 1}}) + "\n"
                              for p in mine))
    env = server_env(UNIROUTE_ADMIN_KEY=ADMIN, UNIROUTE_URL=base)
    out = python(["-m", "gateway.cli.main", "profiles", "upload", "--key", "bob", str(labels)],
                 cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("key bob: 2 models labelled") and "Ψ global→key" in out.stdout
    shown = admin.get("/admin/keys/bob/profile").json()
    acc = shown["models"]["accurate"]
    out = python(["-m", "gateway.cli.main", "profiles", "show", "--key", "bob"], cwd=ROOT, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("key bob: 2 models labelled"), out.stderr
    assert f"  accurate: {acc['labels']} labels, per cluster {acc['labels_per_cluster']}" in out.stdout
    assert acc["labels"] == len(mine) and acc["labels_per_cluster"][c] == len(mine)
    n = len(mine)
    assert acc["psi_key"][c] == pytest.approx((n * 1.0 + M * acc["psi_global"][c]) / (n + M))  # n/(n+m) shrinkage
    assert acc["psi_key"][1 - c] == pytest.approx(acc["psi_global"][1 - c])  # no labels there: global Ψ
    # the bar: bob's cluster-c prompts go to middling, alice's still to accurate
    with openai.OpenAI(base_url=base + "/v1", api_key=alice, max_retries=0) as a_client, \
            openai.OpenAI(base_url=base + "/v1", api_key=bob, max_retries=0) as b_client:
        bob_route = _route(http, bob, PROMPT)
        assert bob_route["model"] == "middling" and bob_route["profile"] == "key", bob_route
        assert _err(bob_route, "accurate") == pytest.approx(acc["psi_key"][c])
        assert _served(b_client, PROMPT) == "middling"
        alice_route = _route(http, alice, PROMPT)
        assert alice_route["model"] == "accurate" and alice_route["profile"] == "global"
        assert alice_route["ranking"] == target["ranking"]  # alice's routing did not move at all
        assert _served(a_client, PROMPT) == "accurate"
        # bob's other cluster keeps the global profile
        bob_other, alice_other = _route(http, bob, other), _route(http, alice, other)
        assert bob_other["model"] == "accurate" and bob_other["ranking"] == alice_other["ranking"]
        assert _served(b_client, other) == "accurate"
    # a key without labels, created after the upload, routes with the global Ψ too
    carol = key("carol")
    assert _route(http, carol, PROMPT)["ranking"] == target["ranking"]
    # a group: the same labels for carol and dave (repeated --key); each is routed with them, alice still is not
    dave = key("dave")
    out = python(["-m", "gateway.cli.main", "profiles", "upload", "--key", "carol", "--key",
                  "dave", str(labels), "--json"], cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for member in (carol, dave):
        assert _route(http, member, PROMPT)["model"] == "middling"
    assert _route(http, alice, PROMPT)["ranking"] == target["ranking"]
    # deleting the labels puts bob back on the global profile
    out = python(["-m", "gateway.cli.main", "profiles", "delete", "--key", "bob"], cwd=ROOT, env=env, timeout=60)
    assert out.returncode == 0 and "labels deleted" in out.stdout, out.stderr
    deadline = time.monotonic() + 10
    while _route(http, bob, PROMPT)["profile"] != "global" and time.monotonic() < deadline:
        time.sleep(0.1)
    again = _route(http, bob, PROMPT)
    assert again["model"] == "accurate" and again["ranking"] == target["ranking"]
    # refusals
    good = {"labels": [{"prompt": PROMPT, "scores": {"middling": 1}}]}
    for body, needle in (({"labels": [{"prompt": PROMPT, "scores": {"nope": 1}}]}, "not in the registry"),
                         ({"labels": [{"prompt": PROMPT, "scores": {"middling": 2}}]}, "[0, 1]"),
                         ({"labels": []}, "labels"), ({"labels": [{"prompt": "", "scores": {"middling": 1}}]}, "prompt"),
                         ({"labels": [{"prompt": PROMPT}]}, "scores"), ([], "label set")):
        r = admin.post("/admin/keys/bob/profile", json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (body, r.text)
    assert admin.post("/admin/keys/nobody/profile", json=good).status_code == 404
    r = http.post("/admin/keys/bob/profile", json=good, headers={"authorization": f"Bearer {bob}"})
    assert r.status_code == 403
    assert http.post("/admin/keys/bob/profile", json=good).status_code == 401
    # its own feedback (profiling.tenant_feedback): 20 thumbs down on accurate's answers in cluster c, one pass
    with openai.OpenAI(base_url=base + "/v1", api_key=bob, max_retries=0) as b_client, \
            httpx.Client(base_url=base, headers={"authorization": f"Bearer {bob}"}, timeout=30) as h:
        for _ in range(20):
            raw = b_client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": PROMPT}])
            assert raw.parse().model == "accurate"
            r = h.post("/v1/feedback", json={"request_id": raw.headers["x-uniroute-request-id"], "thumbs": "down"})
            assert r.status_code == 201, r.text
    report = admin.post("/admin/reprofile").json()
    assert report["tenant_feedback"] == {"keys": 1, "rows": 1}, report
    own = admin.get("/admin/keys/bob/profile").json()["models"]["accurate"]
    assert own["labels"] == 20 and own["labels_per_cluster"][c] == 20
    assert own["psi_key"][c] == pytest.approx((20 + M * own["psi_global"][c]) / (20 + M))
    deadline = time.monotonic() + 10
    while _route(http, bob, PROMPT)["model"] != "middling" and time.monotonic() < deadline:
        time.sleep(0.1)
    bob_route = _route(http, bob, PROMPT)
    assert bob_route["model"] == "middling" and bob_route["profile"] == "key"
    alice_route = _route(http, alice, PROMPT)  # the global Ψ moved by at most max_key_share: alice stays
    assert alice_route["model"] == "accurate" and alice_route["profile"] == "global"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "scores": {"middling": 1}}\n{"prompt": 3}\n')
    out = python(["-m", "gateway.cli.main", "profiles", "upload", "--key", "bob", str(bad)],
                 cwd=ROOT, env=env, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "bad.jsonl: line 2" in out.stderr
    admin.close()
    http.close()
