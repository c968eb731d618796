"""Tenants are isolated (issue #10, rows 4 and 9 of the table, deliverable 3): feedback.

Tried as a hostile key would: one request's feedback sent 20 times (also 20 at once), a client-chosen
request id reused by 10 requests and then used for feedback, another key's request id, a flood of thumbs
down from one key against the cluster's most accurate model. The promises (docs/security/tenants.md):

- one feedback per request: a repeat is 409 and the first stands (a unique index, on SQLite and
  PostgreSQL; migration 0005 keeps the first of rows already repeated);
- the id feedback addresses is the gateway's own (``x-uniroute-request-id``, unique); a client's id is
  echoed as ``x-uniroute-client-request-id`` and is never a feedback target;
- one key moves a cluster's Ψ by at most ``profiling.max_key_share`` in a re-profiling pass, and routing
  for every other tenant stays as it was; with ``profiling.feedback_from: trusted`` only trusted keys count.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import sqlalchemy as sa
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.access.accounting import Accounting, AccountingSettings
from gateway.access.auth import create_key
from gateway.config import parse_config
from gateway.errors import GatewayError
from gateway.http import feedback
from gateway.http.responses import gateway_error
from gateway.http.state import GatewayState
from gateway.serving.interfaces import RequestRecord
from gateway.store import models as catalog
from gateway.store import profiling as profiling_sql
from gateway.store.engine import Store
from gateway.store.tables import ApiKey, Feedback, RequestRow
from profiling.reprofile import ClusterFeedback, _key_weights, reprofile
from profiling.schedule import Reprofiler
from tests.procs import free_port, replay_upstream, running, server_env
from tests.storeutil import database

DBS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
ADMIN = "sk-admin-" + secrets.token_urlsafe(12)


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


# ------------------------------------------------------------------ one feedback per request (in process)
@dataclass
class FeedbackApp:
    client: httpx.AsyncClient
    acc: Accounting
    alice: str
    bob: str
    alice_id: int


@pytest.fixture(params=DBS)
async def fb_app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FeedbackApp]:
    with database(request.param, tmp_path) as url:
        acc = Accounting(AccountingSettings(database_url=url, auth_mode="keys"))
        await acc.start(["m"])
        app = Starlette(routes=[Route("/v1/feedback", feedback.feedback_endpoint, methods=["POST"])],
                        exception_handlers={GatewayError: gateway_error})
        app.state.gateway = GatewayState(accounting=acc)
        alice, arow = create_key(acc.store, "alice", default_lambda=0.1)
        bob, _ = create_key(acc.store, "bob", default_lambda=0.1)
        for rid in ("req-a1", "req-a2"):
            acc.writer.submit(RequestRecord(request_id=rid, started_at=datetime.now(UTC), requested_model="auto",
                                            stream=False, key_id=arow.id, routed_model="m", cluster=0,
                                            client_request_id="alice-own-id"))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        try:
            yield FeedbackApp(client, acc, alice, bob, arow.id)
        finally:
            await client.aclose()
            await acc.aclose()


def _feedback_rows(store: Store) -> list[tuple[str, float]]:
    with store.sessions() as s:
        return [(f.request_id, f.score) for f in s.scalars(sa.select(Feedback).order_by(Feedback.id))]


async def test_a_repeat_is_409_and_the_first_feedback_stands(fb_app: FeedbackApp) -> None:
    c, h = fb_app.client, _bearer(fb_app.alice)
    r = await c.post("/v1/feedback", json={"request_id": "req-a1", "thumbs": "up"}, headers=h)
    assert r.status_code == 201, r.text
    for body in ({"request_id": "req-a1", "thumbs": "down"}, {"request_id": "req-a1", "score": 0.0, "source": "x"}):
        r = await c.post("/v1/feedback", json=body, headers=h)
        err = r.json()["error"]
        assert r.status_code == 409 and err["code"] == "feedback_exists" and err["param"] == "request_id", r.text
        assert "one feedback per request" in err["message"] and "score 1" in err["message"]
    # another key: the request does not exist for it (404), and its attempt stores nothing
    r = await c.post("/v1/feedback", json={"request_id": "req-a2", "thumbs": "down"}, headers=_bearer(fb_app.bob))
    assert r.status_code == 404 and r.json()["error"]["code"] == "request_not_found"
    # the client's own id is no feedback target; the 404 says which id is
    r = await c.post("/v1/feedback", json={"request_id": "alice-own-id", "thumbs": "down"}, headers=h)
    assert r.status_code == 404 and "x-uniroute-request-id" in r.json()["error"]["message"]
    assert _feedback_rows(fb_app.acc.store) == [("req-a1", 1.0)]


async def test_twenty_racing_posts_store_one_row(fb_app: FeedbackApp) -> None:
    """The unique index decides a race: 20 posts at once on one request give one 201 and 19 409s."""
    h = _bearer(fb_app.alice)
    answers = await asyncio.gather(*(fb_app.client.post("/v1/feedback", json={"request_id": "req-a2", "score": i / 20},
                                                        headers=h) for i in range(20)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] + [409] * 19, codes
    rows = _feedback_rows(fb_app.acc.store)
    assert len(rows) == 1 and rows[0][0] == "req-a2"
    winner = next(r for r in answers if r.status_code == 201).json()
    assert rows[0][1] == winner["score"]


# ---------------------------------------------------------------- migration 0005 on existing duplicates
@pytest.mark.parametrize("kind", DBS)
def test_migration_keeps_the_first_of_repeated_feedback(kind: str, tmp_path: Path) -> None:
    with database(kind, tmp_path) as url:
        store = Store(url)
        try:
            store.upgrade("0003")
            now = datetime.now(UTC)
            with store.engine.begin() as conn:
                conn.execute(sa.text(
                    "INSERT INTO api_keys (id, name, key_hash, key_prefix, default_lambda, lambda_min, lambda_max, "
                    "budget_period, period_start, spend_usd, reserved_usd, total_spend_usd, created_at) VALUES "
                    "(1, 'old', :h, 'sk-ur-old', 0.1, 0, 10, 'month', :t, 0, 0, 0, :t)"), {"h": "0" * 64, "t": now})
                rows = [("req-x", 0.0), ("req-x", 1.0), ("req-y", 0.5), ("req-x", 1.0), ("req-z", 1.0), ("req-y", 0.0)]
                for i, (rid, score) in enumerate(rows, start=1):
                    conn.execute(sa.text("INSERT INTO feedback (id, request_id, key_id, score, source, created_at) "
                                         "VALUES (:i, :r, 1, :s, 'user', :t)"), {"i": i, "r": rid, "s": score, "t": now})
            store.upgrade()
            assert store.current_revision() == Store.head_revision()
            with store.sessions() as s:
                kept = [(f.id, f.request_id, f.score) for f in s.scalars(sa.select(Feedback).order_by(Feedback.id))]
                key = s.scalar(sa.select(ApiKey))
            assert kept == [(1, "req-x", 0.0), (3, "req-y", 0.5), (5, "req-z", 1.0)]  # the first of each
            assert key is not None and key.trusted is False  # existing keys are not trusted
            with pytest.raises(sa.exc.IntegrityError), store.session() as s:
                s.add(Feedback(request_id="req-x", key_id=1, score=1.0))
            assert "client_request_id" in {c["name"] for c in sa.inspect(store.engine).get_columns("requests")}
            store.downgrade("0003")
            store.upgrade()
        finally:
            store.dispose()


# ------------------------------------------------------------------------- the per-key cap, as arithmetic
_raw = st.dictionaries(st.integers(0, 6), st.floats(0.0, 1e4), min_size=1, max_size=7)


@settings(max_examples=300, deadline=None)
@given(n=st.floats(0.0, 500.0), raw=_raw, share=st.floats(0.01, 0.99), scale=st.floats(0.05, 1.0))
def test_no_key_carries_more_than_its_share(n: float, raw: dict[int | None, float], share: float,
                                            scale: float) -> None:
    """W_j ≤ s · (n + Σ_i W_i) for every key, also after the total cap scales every key alike."""
    cut = {k: v * scale for k, v in _key_weights(n, dict(raw), share).items()}
    total = n + sum(cut.values())
    for key, w in cut.items():
        assert w <= raw[key] + 1e-9
        assert w <= share * total + 1e-6 * max(1.0, total), (key, w, total)


@settings(max_examples=200, deadline=None)
@given(psi=st.floats(0.0, 1.0), n=st.floats(1.0, 300.0), rows=st.integers(1, 400), bad=st.floats(0.0, 1.0),
       share=st.floats(0.01, 1.0), others=st.lists(st.tuples(st.integers(1, 50), st.floats(0.0, 1.0)), max_size=5))
def test_one_key_moves_psi_by_at_most_its_share(psi: float, n: float, rows: int, bad: float, share: float,
                                                others: list[tuple[int, float]]) -> None:
    """Alone, one key moves Ψ by ≤ s however many rows it sends; beside other keys, by ≤ s against the
    estimate the same pass gives without it."""
    mine = [ClusterFeedback(0, bad, key=666)] * rows
    alone = reprofile(np.array([psi]), np.array([n]), mine, max_key_share=share).psi[0]
    assert abs(alone - psi) <= share + 1e-9
    theirs = [ClusterFeedback(0, score, key=k) for k, (count, score) in enumerate(others) for _ in range(count)]
    both = reprofile(np.array([psi]), np.array([n]), mine + theirs, max_key_share=share)
    # the others' weights as capped in this pass: the estimate from everything but key 666
    raw: dict[int | None, float] = {666: float(rows), **{k: float(c) for k, (c, _) in enumerate(others)}}
    cut = _key_weights(n, raw, share)
    cap = 4.0 * max(n, 1.0)
    total = sum(cut.values())
    f = min(1.0, cap / total) if total > 0 else 1.0
    w_others = sum(cut[k] for k in raw if k != 666) * f
    e_others = sum(cut[k] * (1 - s) for k, (_, s) in enumerate(others)) * f
    without = (n * psi + e_others) / (n + w_others)
    assert abs(both.psi[0] - without) <= share + 1e-9


def test_many_keys_still_count_where_one_key_cannot() -> None:
    """The cap is per key: twenty keys agreeing move Ψ further than one key sending all their rows."""
    one = reprofile(np.array([0.5]), np.array([20.0]), [ClusterFeedback(0, 1.0, key=1)] * 100, max_key_share=0.1)
    many = reprofile(np.array([0.5]), np.array([20.0]),
                     [ClusterFeedback(0, 1.0, key=k) for k in range(20) for _ in range(5)], max_key_share=0.1)
    assert 0.5 - one.psi[0] <= 0.1 + 1e-12
    assert many.psi[0] < one.psi[0] - 0.1
    assert one.capped_keys is not None and one.capped_keys[0] == 1


# --------------------------------------------------------------- trusted keys and counted-once (store)
@pytest.mark.parametrize("kind", DBS)
def test_trusted_only_and_each_feedback_row_counted_once(kind: str, tmp_path: Path) -> None:
    with database(kind, tmp_path) as url:
        store = Store(url)
        try:
            store.upgrade()
            _, trusted = create_key(store, "labeller", default_lambda=0.1, trusted=True)
            _, plain = create_key(store, "tenant", default_lambda=0.1)
            now = datetime.now(UTC)
            with store.session() as s:
                # a pre-0005 log: ten requests of one key under one client-chosen id, one feedback row on it
                for _ in range(10):
                    s.add(RequestRow(id=uuid.uuid4().hex, request_id="same-id", key_id=plain.id, requested_model="auto",
                                     routed_model="a", cluster=0, status_code=200, stream=False, started_at=now))
                s.add(Feedback(request_id="same-id", key_id=plain.id, score=0.0))
                s.add(RequestRow(id=uuid.uuid4().hex, request_id="req-t", key_id=trusted.id, requested_model="auto",
                                 routed_model="a", cluster=0, status_code=200, stream=False, started_at=now))
                s.add(Feedback(request_id="req-t", key_id=trusted.id, score=1.0))
            every = profiling_sql.feedback_by_model(store, 1)
            assert sorted(every["a"], key=lambda r: r[1]) == [(0, 0.0, plain.id), (0, 1.0, trusted.id)]  # not 11 rows
            assert profiling_sql.feedback_by_model(store, 1, trusted_only=True) == {"a": [(0, 1.0, trusted.id)]}
            # the config drives the pass: feedback_from: trusted leaves the tenant's thumbs down out
            key = catalog.profile_key("v1", "kmeans")
            catalog.save_profile(store, "a", key, [0.5], [10], "validation")
            for frm, expected in (("trusted", (10 * 0.5 + 0) / 11), ("all", None)):
                cfg = parse_config({"profiling": {"feedback_from": frm, "max_key_share": 1.0}})
                report = Reprofiler(cfg, store, key).run_once()
                assert report is not None
                if expected is not None:
                    assert report["models"]["a"]["feedback"] == 1
                    assert catalog.active_profiles(store, key)["a"].psi[0] == pytest.approx(expected)
                else:
                    assert report["models"]["a"]["feedback"] == 2 and report["models"]["a"]["feedback_keys"] == 2
        finally:
            store.dispose()


# ------------------------------------------- the scenario, end to end (uvicorn, SDK, LiteLLM, replay)
ACCURACY = {"accurate": {"math": 0.93, "biology": 0.93}, "middling": {"math": 0.5, "biology": 0.5},
            "poor": {"math": 0.2, "biology": 0.2}}
COSTS = {"accurate": 4.0, "middling": 3.0, "poor": 1.0}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One cluster (so every prompt is in it), a tiny static embedder, profiles from 60 validation prompts."""
    from gateway.cli.main import main as cli
    from routing.synthetic import make_synthetic_dataset
    from tests.static_model import make_tiny_static

    root = tmp_path_factory.mktemp("tenants")
    static = make_tiny_static(root / "static")
    data = make_synthetic_dataset(root / "data", n_prompts=200, accuracy=ACCURACY, costs=COSTS, seed=5)
    art = root / "artifact"
    assert cli(["router", "fit", "--dataset", str(data), "--out", str(art), "--k", "1", "--variant", "kmeans",
                "--val-size", "60", "--embedder", str(static), "--cache-dir", str(root / "cache")]) == 0
    return data, art


@pytest.fixture(scope="module")
def replay(fitted: tuple[Path, Path]) -> Iterator[str]:
    with replay_upstream(fitted[0]) as base:
        yield base


@dataclass
class Gateway:
    base: str
    url: str
    config: Path


@pytest.fixture(params=DBS)
def gateway(request: pytest.FixtureRequest, tmp_path: Path, fitted: tuple[Path, Path], replay: str) -> Iterator[Gateway]:
    data, art = fitted
    with database(request.param, tmp_path) as url:
        port = free_port()
        cfg = tmp_path / "config.yaml"
        cfg.write_text(yaml.safe_dump({
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            "auth": {"mode": "keys"}, "database_url": url, "database": {"spill_dir": str(tmp_path / "spill")},
            "registry": {"poll_interval_s": 0.2},
            "router": {"policy": "uniroute", "variant": "kmeans", "artifact": str(art), "default_lambda": 0.05,
                       "max_wait_ms": 0, "embed_cache_dir": str(tmp_path / "cache")},
            "replay_models": {"dataset": str(data), "api_base": replay},
        }))
        base = f"http://127.0.0.1:{port}"
        with running(["-m", "gateway.cli.main", "serve", "--config", str(cfg)], f"{base}/health/readiness",
                     env=server_env(UNIROUTE_ADMIN_KEY=ADMIN), timeout_s=120):
            yield Gateway(base, url, cfg)


def _auto(client: openai.OpenAI, prompt: str, **headers: str) -> tuple[dict[str, Any], dict[str, str]]:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": prompt}], extra_headers=headers or None)
    info = (raw.parse().model_extra or {})["uniroute"]
    return dict(info), dict(raw.headers)


def _psi(info: dict[str, Any], model: str) -> float:
    return float(next(c["expected_error"] for c in info["candidates"] if c["model"] == model))


def test_one_key_cannot_rewrite_routing_for_every_tenant(gateway: Gateway, fitted: tuple[Path, Path]) -> None:
    """Issue #10 row 4: one key, 10 requests under one client id × 20 thumbs down each, then a re-profiling pass.
    Before: 200 rows counted, the accurate model's Ψ went 0.07 → 0.72 and every tenant's traffic moved. Now:
    10 rows (one per request), Ψ moves by at most profiling.max_key_share (0.1), the others' routing holds."""
    share = 0.1
    admin = httpx.Client(base_url=gateway.base, headers=_bearer(ADMIN), timeout=30)

    def key(name: str) -> str:
        r = admin.post("/admin/keys", json={"name": name, "lambda": 0.05})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    alice, mallory = key("alice"), key("mallory")
    prompt = "Which of these is a prime number? A. 4 B. 6 C. 7 D. 9"
    with openai.OpenAI(base_url=gateway.base + "/v1", api_key=alice, max_retries=0) as a_client, \
            openai.OpenAI(base_url=gateway.base + "/v1", api_key=mallory, max_retries=0) as m_client:
        before, _ = _auto(a_client, prompt)
        assert before["model"] == "accurate", before
        psi_before = _psi(before, "accurate")
        # mallory: ten requests, all under the same client-chosen id (old and new header)
        ids = []
        for i in range(10):
            header = "x-uniroute-request-id" if i % 2 else "x-uniroute-client-request-id"
            info, headers = _auto(m_client, prompt, **{header: "same-id"})
            assert info["model"] == "accurate" and info["client_request_id"] == "same-id"
            assert headers["x-uniroute-client-request-id"] == "same-id"
            assert headers["x-uniroute-request-id"] == info["request_id"] != "same-id"
            ids.append(info["request_id"])
        assert len(set(ids)) == 10  # the gateway's ids are unique whatever the client sends
        with httpx.Client(base_url=gateway.base, headers=_bearer(mallory), timeout=30) as m:
            for _ in range(20):  # the client id addresses nothing
                r = m.post("/v1/feedback", json={"request_id": "same-id", "thumbs": "down"})
                assert r.status_code == 404 and "x-uniroute-request-id" in r.json()["error"]["message"]
            r = m.post("/v1/feedback", json={"request_id": before["request_id"], "thumbs": "down"})
            assert r.status_code == 404  # alice's request, not mallory's
            for rid in ids:
                codes = [m.post("/v1/feedback", json={"request_id": rid, "thumbs": "down"}).status_code
                         for _ in range(20)]
                assert codes == [201] + [409] * 19, codes
        r = admin.post("/admin/reprofile")
        assert r.status_code == 200, r.text
        report = r.json()
        entry = report["models"]["accurate"]
        assert entry["feedback"] == 10 and entry["feedback_keys"] == 1 and entry["capped_keys"] == 1, entry
        drift = {d["model"]: d for d in report["drift"]}
        assert drift["accurate"]["after"] - drift["accurate"]["before"] <= share + 1e-9
        # the registry poll (every 0.2 s) brings the new profile; alice's routing is what it was
        deadline = time.monotonic() + 15
        after, _ = _auto(a_client, prompt)
        while _psi(after, "accurate") == psi_before and time.monotonic() < deadline:
            time.sleep(0.1)
            after, _ = _auto(a_client, prompt)
        assert _psi(after, "accurate") > psi_before  # the pass did move it ...
        assert _psi(after, "accurate") - psi_before <= share + 1e-9  # ... by at most the cap
        assert after["model"] == "accurate" and [c["model"] for c in after["candidates"]] == \
            [c["model"] for c in before["candidates"]]
    admin.close()
    # without the per-key cap the same ten rows would have moved Ψ beyond it: the cap is what holds
    store = Store(gateway.url)
    try:
        prior = profiling_sql.latest_prior(store, "accurate", _router_key(fitted[1]))
        assert prior is not None
        rows = profiling_sql.feedback_by_model(store, 1)["accurate"]
        fb = [ClusterFeedback(c, s, k) for c, s, k in rows]
        uncapped = reprofile(np.asarray(prior.features), np.asarray(prior.counts), fb, max_key_share=1.0).psi[0]
        assert uncapped - prior.features[0] > share
    finally:
        store.dispose()


def _router_key(artifact: Path) -> str:
    version = json.loads((artifact / "artifact.json").read_text())["version"]
    return catalog.profile_key(version, "kmeans")


# ------------------------------------------------------------------- marking keys trusted: admin API and CLI
async def test_trusted_flag_through_the_admin_api_and_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.main import main as cli
    from gateway.http import keys as admin_keys

    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    url = f"sqlite:///{tmp_path / 'k.db'}"
    acc = Accounting(AccountingSettings(database_url=url, auth_mode="keys"))
    await acc.start(["m"])
    app = Starlette(routes=[Route("/admin/keys", admin_keys.create_key_endpoint, methods=["POST"]),
                            Route("/admin/keys/{name}", admin_keys.update_key_endpoint, methods=["PATCH"]),
                            Route("/admin/keys/{name}", admin_keys.get_key_endpoint, methods=["GET"])],
                    exception_handlers={GatewayError: gateway_error})
    app.state.gateway = GatewayState(accounting=acc)
    h = _bearer(ADMIN)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            r = await c.post("/admin/keys", json={"name": "labeller", "lambda": 0.1, "trusted": True}, headers=h)
            assert r.status_code == 201 and r.json()["trusted"] is True
            r = await c.post("/admin/keys", json={"name": "tenant", "lambda": 0.1}, headers=h)
            assert r.status_code == 201 and r.json()["trusted"] is False  # not trusted unless said so
            client_key = r.json()["key"]
            r = await c.patch("/admin/keys/tenant", json={"trusted": True}, headers=h)
            assert r.status_code == 200 and r.json()["trusted"] is True
            assert (await c.get("/admin/keys/tenant", headers=h)).json()["trusted"] is True
            for body in ({"trusted": "yes"}, {"trusted": 1}, {}, {"trusted": True, "lambda": 5}):
                r = await c.patch("/admin/keys/tenant", json=body, headers=h)
                assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", body
            assert (await c.patch("/admin/keys/nobody", json={"trusted": True}, headers=h)).status_code == 404
            r = await c.patch("/admin/keys/tenant", json={"trusted": False}, headers=_bearer(client_key))
            assert r.status_code == 403  # a client key cannot trust itself
    finally:
        await acc.aclose()
    monkeypatch.setenv("UNIROUTE_DATABASE_URL", url)
    assert cli(["keys", "create", "--name", "cli-trusted", "--lambda", "0.1", "--trusted"]) == 0
    assert "trusted" in capsys.readouterr().err
    assert cli(["keys", "trust", "tenant", "--off"]) == 0
    assert "'tenant'" in capsys.readouterr().out
    assert cli(["keys", "trust", "nobody"]) == 1
    assert "error: no API key named 'nobody'" in capsys.readouterr().err
    store = Store(url)
    try:
        with store.sessions() as s:
            flags = {k.name: k.trusted for k in s.scalars(sa.select(ApiKey))}
    finally:
        store.dispose()
    assert flags == {"labeller": True, "tenant": False, "cli-trusted": True}
