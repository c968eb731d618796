"""The database blinks, the process is killed: what the client was told stays true (issue #10, row 6; row 12's 503).

Real things throughout: ``uniroute serve`` on loopback (or the app in process for the 503 sweep), the
official openai SDK, LiteLLM calling the replay upstream, SQLite and PostgreSQL. PostgreSQL is cut with a
TCP proxy the test stops (tests/test_store.py: connections refused, open ones aborted); SQLite with a
second connection that holds the write lock (``BEGIN EXCLUSIVE``), as a backup or a migration would.

- A cut right after the upstream call began: the client still gets 200 with the answer (plain and
  streamed); once the database is back the row and the charge are written and no reservation is held.
- ``kill -9`` under traffic (streams and plain): after a restart every request the client saw answered
  has its row, each charged once, and nothing is held (the dead process's reservations are released at
  the restart, long before ``database.reservation_ttl_s``).
- Every endpoint that needs the store answers 503 ``service_unavailable`` with ``Retry-After`` while it
  is cut, never a 500.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam
from starlette.testclient import TestClient

from gateway.access.auth import create_key
from gateway.app import create_app
from gateway.config import load_config
from gateway.store import reservations as reservations_sql
from gateway.store.engine import Store
from gateway.store.tables import ApiKey, RequestRow
from tests.gateway_setup import make_dataset, replay_args, write_config
from tests.procs import free_port, replay_upstream, running, server_env
from tests.storeutil import database
from tests.test_store import TcpProxy

ADMIN = "sk-admin-" + secrets.token_urlsafe(16)
KINDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Which planet is largest?"}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("durable"))


@pytest.fixture(scope="module")
def slow_upstream(dataset: Path) -> Iterator[str]:
    """Answers after 2 s: time to cut the database while the upstream call is in flight."""
    with replay_upstream(dataset, *replay_args(), "--latency-ms", "*=2000") as base:
        yield base


@pytest.fixture(scope="module")
def busy_upstream(dataset: Path) -> Iterator[str]:
    """Answers after 250 ms, streams a chunk every 20 ms: requests are always in flight."""
    with replay_upstream(dataset, *replay_args(), "--latency-ms", "*=250", "--chunk-delay-ms", "20") as base:
        yield base


def _config(root: Path, dataset: Path, upstream: str, url: str, **database: Any) -> Path:
    path = write_config(root, dataset, upstream)
    data = yaml.safe_load(path.read_text())
    data.update(auth={"mode": "keys", "cache_ttl_s": 60}, database_url=url,
                database={"spill_dir": str(root / "spill"), **database})
    path.write_text(yaml.safe_dump(data))
    return path


class Cut:
    """Makes the database unusable for the gateway and gives it back: PostgreSQL through a TCP proxy the
    gateway connects to, SQLite by holding its write lock from another connection."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind, self.url = kind, url
        self.proxy: TcpProxy | None = None
        self.lock: sqlite3.Connection | None = None
        self.gateway_url = url
        if kind == "postgresql":
            u = sa.make_url(url)
            self.proxy = TcpProxy(u.host or "127.0.0.1", u.port or 5432)
            self.proxy.start()
            self.gateway_url = u.set(host="127.0.0.1", port=self.proxy.port).render_as_string(hide_password=False)

    def cut(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        else:
            self.lock = sqlite3.connect(str(sa.make_url(self.url).database), timeout=30, isolation_level=None)
            self.lock.execute("BEGIN EXCLUSIVE")

    def restore(self) -> None:
        if self.proxy is not None:
            self.proxy.start()
        elif self.lock is not None:
            self.lock.execute("ROLLBACK")
            self.lock.close()
            self.lock = None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.restore()
        if self.proxy is not None:
            self.proxy.shutdown()


@contextlib.contextmanager
def cuttable(kind: str, tmp_path: Path) -> Iterator[tuple[Store, Cut]]:
    with database(kind, tmp_path) as url:
        direct = Store(url)
        direct.upgrade()
        cut = Cut(kind, url)
        try:
            yield direct, cut
        finally:
            cut.close()
            direct.dispose()


def _budget(store: Store, name: str) -> tuple[float, float]:
    with store.sessions() as s:
        key = s.scalar(sa.select(ApiKey).where(ApiKey.name == name))
    assert key is not None
    return key.spend_usd, key.reserved_usd


def _rows(store: Store) -> dict[str, RequestRow]:
    with store.sessions() as s:
        return {r.request_id: r for r in s.scalars(sa.select(RequestRow))}


def _wait(what: str, ok: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.1)


def _serve(cfg: Path, port: int) -> contextlib.AbstractContextManager[Any]:
    return running(["-m", "gateway.cli.main", "serve", "--config", str(cfg), "--port", str(port)],
                   f"http://127.0.0.1:{port}/health/readiness", env=server_env(UNIROUTE_ADMIN_KEY=ADMIN),
                   timeout_s=120)


def _ask(client: OpenAI, model: str, stream: bool) -> tuple[str, str, float]:
    """One chat request to the end: (request id, answer, cost) as the client saw them."""
    if stream:
        text, ext = [], None
        for chunk in client.chat.completions.create(model=model, messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            ext = (chunk.model_extra or {}).get("uniroute") or ext
        assert ext is not None, "no uniroute object on the last chunk"
        return ext["request_id"], "".join(text), float(ext["cost_usd"])
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    assert raw.http_response.status_code == 200
    body = raw.parse()
    ext = (body.model_extra or {})["uniroute"]
    return raw.http_response.headers["x-uniroute-request-id"], body.choices[0].message.content or "", float(
        ext["cost_usd"])


# ------------------------------------------------------------------ row 6: cut after the upstream call
@pytest.fixture(scope="module", params=KINDS)
def cut_gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, dataset: Path,
                slow_upstream: str) -> Iterator[tuple[str, Store, Cut, int]]:
    """One ``uniroute serve`` per database kind for the cut tests (a start is ~6 s of CPU): (kind, the
    direct store, the cut, the port). Each test cuts the database and gives it back before it ends (and
    checks it is back at its start), uses a key of its own and leaves no reservation held."""
    kind: str = request.param
    root = tmp_path_factory.mktemp(f"cut-{kind}")
    with cuttable(kind, root) as (direct, cut):
        port = free_port()
        cfg = _config(root, dataset, slow_upstream, cut.gateway_url, settle_timeout_s=1.0, log_flush_interval_s=0.2)
        with _serve(cfg, port):
            yield kind, direct, cut, port


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health/readiness", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_database_cut_after_the_upstream_call_still_answers_and_charges_when_back(
        stream: bool, cut_gateway: tuple[str, Store, Cut, int]) -> None:
    kind, direct, cut, port = cut_gateway
    # the gateway is shared: it starts from the database up and nothing held (what an earlier test left)
    _wait("the shared gateway is ready (the database is up)", lambda: _ready(port))
    assert reservations_sql.held(direct) == [], "an earlier test on this shared gateway left a reservation held"
    name = f"alice-{'stream' if stream else 'plain'}"
    raw, _row = create_key(direct, name, default_lambda=0.1, budget_usd=10.0)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=raw, max_retries=0, timeout=20)
    got: dict[str, Any] = {}

    def call() -> None:
        t0 = time.monotonic()
        try:
            got["answer"] = _ask(client, "small-general", stream)
        except Exception as exc:  # the assertion below shows it
            got["error"] = f"{type(exc).__name__}: {exc}"
        got["took"] = time.monotonic() - t0

    caller = threading.Thread(target=call)
    caller.start()
    _wait("the reservation is held (the upstream call has begun)", lambda: _budget(direct, name)[1] > 0)
    cut.cut()  # the database goes away while the provider works on the answer
    try:
        caller.join(30)
        assert "error" not in got, got["error"]
        rid, answer, cost = got["answer"]
        assert answer and cost > 0 and got["took"] < 15
        spend, reserved = _budget(direct, name) if kind == "sqlite" else (0.0, 1.0)  # PG: unreachable
        assert spend == 0.0 and reserved > 0  # not written yet: the database is still cut
    finally:
        cut.restore()
    _wait("the row and the charge are written once the database is back",
          lambda: rid in _rows(direct) and _budget(direct, name)[1] == 0.0)
    row = _rows(direct)[rid]
    assert row.status_code == 200 and row.cost_usd == pytest.approx(cost) and row.stream is stream
    assert _budget(direct, name) == pytest.approx((cost, 0.0))
    assert reservations_sql.held(direct) == []


# ------------------------------------------------------------------ the kill -9 bar
@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_under_traffic_every_answered_request_has_its_row_and_nothing_stays_held(
        kind: str, tmp_path: Path, dataset: Path, busy_upstream: str) -> None:
    with database(kind, tmp_path) as url:
        direct = Store(url)
        direct.upgrade()
        keys = {name: create_key(direct, name, default_lambda=0.1, budget_usd=100.0)[0] for name in ("alice", "bob")}
        port = free_port()
        # rows wait up to 5 s in memory before a batch: without the journal, a kill loses the last seconds of them
        cfg = _config(tmp_path, dataset, busy_upstream, url, log_flush_interval_s=120.0, log_batch_size=100_000,
                      reservation_ttl_s=3600)
        answered: dict[str, tuple[str, float, bool]] = {}
        stop = threading.Event()

        def traffic(i: int) -> None:
            name = "alice" if i % 2 else "bob"
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=keys[name], max_retries=0, timeout=10)
            n = 0
            while not stop.is_set():
                stream, model = n % 2 == 0, ("auto", "small-general")[(n // 2) % 2]
                n += 1
                try:
                    rid, _answer, cost = _ask(client, model, stream)
                except Exception:
                    continue  # cut off by the kill: not answered
                answered[rid] = (name, cost, stream)

        with _serve(cfg, port) as proc:
            workers = [threading.Thread(target=traffic, args=(i,)) for i in range(8)]
            for w in workers:
                w.start()
            _wait("traffic flows", lambda: len(answered) >= 40, 120)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            stop.set()
            for w in workers:
                w.join(30)
        assert sum(1 for _n, _c, s in answered.values() if s) >= 10 and sum(
            1 for _n, _c, s in answered.values() if not s) >= 10
        missing_before = set(answered) - set(_rows(direct))
        held_before = reservations_sql.held(direct)
        assert missing_before, "every answered row was written before the kill: the test did not test the journal"
        assert held_before, "no request was in flight at the kill"

        # the next start: the same spill_dir and database, the default flush interval (a replayed journal's
        # rows go out with the writer's first flush)
        cfg = _config(tmp_path, dataset, busy_upstream, url, reservation_ttl_s=3600)
        with _serve(cfg, port):
            _wait("every answered request has its row", lambda: set(answered) <= set(_rows(direct)))
            _wait("no reservation is held", lambda: not reservations_sql.held(direct)
                  and all(_budget(direct, n)[1] == 0.0 for n in keys), 60)  # load-dependent (15 s ran out in CI)
            rows = _rows(direct)
            for rid, (name, cost, stream) in answered.items():
                row = rows[rid]
                assert (row.status_code, row.key_name, row.stream) == (200, name, stream)
                assert row.cost_usd == pytest.approx(cost)
            for name in keys:  # each logged request charged once: spend is the sum of its rows' costs
                logged = sum(r.cost_usd or 0.0 for r in rows.values() if r.key_name == name)
                assert _budget(direct, name)[0] == pytest.approx(logged)
        direct.dispose()


# ------------------------------------------------------------------ 503 + Retry-After on a store outage
@pytest.mark.parametrize("kind", KINDS)
def test_every_endpoint_that_needs_the_store_answers_503_with_retry_after(
        kind: str, tmp_path: Path, dataset: Path, busy_upstream: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    admin = {"authorization": f"Bearer {ADMIN}"}
    with cuttable(kind, tmp_path) as (direct, cut):
        cached = create_key(direct, "cached", default_lambda=0.1, budget_usd=10.0)[0]
        fresh = create_key(direct, "fresh", default_lambda=0.1, budget_usd=10.0)[0]
        cfg = load_config(_config(tmp_path, dataset, busy_upstream, cut.gateway_url, sqlite_busy_timeout_s=0.5,
                                  log_close_timeout_s=1.0))
        with TestClient(create_app(cfg), raise_server_exceptions=False) as client:
            def as_key(raw: str) -> dict[str, str]:
                return {"authorization": f"Bearer {raw}"}

            chat = {"model": "small-general", "messages": MESSAGES}
            r = client.post("/v1/chat/completions", json=chat, headers=as_key(cached))
            assert r.status_code == 200, r.text
            rid = r.headers["x-uniroute-request-id"]
            assert client.app.state.gateway.accounting.writer.flush(10)  # type: ignore[attr-defined]
            cut.cut()
            try:
                calls: list[tuple[str, str, dict[str, Any] | None, dict[str, str]]] = [
                    ("POST", "/v1/chat/completions", chat, as_key(cached)),  # budget reserve
                    ("POST", "/v1/chat/completions", {**chat, "stream": True}, as_key(cached)),
                    # the other model endpoints reserve the same way (issue 12: one set of rules)
                    ("POST", "/v1/responses", {"model": "small-general", "input": "hi"}, as_key(cached)),
                    ("POST", "/v1/responses", {"model": "small-general", "input": "hi", "stream": True},
                     as_key(cached)),
                    ("POST", "/v1/messages", {"model": "small-general", "max_tokens": 20, "messages": MESSAGES},
                     as_key(cached)),
                    ("POST", "/v1/feedback", {"request_id": rid, "thumbs": "up"}, as_key(cached)),
                    ("POST", "/admin/keys", {"name": "new", "lambda": 0.1}, admin),
                    ("DELETE", "/admin/keys/fresh", None, admin),
                    ("POST", "/admin/models", {"name": "m-new", "router_cost": 1.0,
                                               "litellm_params": {"model": "openai/x"}}, admin),
                ]
                if kind == "postgresql":  # SQLite in WAL mode still reads while another connection writes
                    calls += [
                        ("POST", "/v1/chat/completions", chat, as_key(fresh)),  # auth lookup missing the cache
                        ("GET", "/v1/usage", None, as_key(cached)),
                        ("GET", "/admin/keys", None, admin),
                        ("GET", "/admin/models", None, admin),
                        ("GET", "/admin/keys/fresh", None, admin),
                    ]
                else:  # the auth lookup reads, the reservation cannot write
                    calls.append(("POST", "/v1/chat/completions", chat, as_key(fresh)))
                for method, path, body, headers in calls:
                    r = client.request(method, path, json=body, headers=headers)
                    where = f"{method} {path}: {r.status_code} {r.text[:300]}"
                    assert r.status_code == 503, where
                    err = r.json()["error"]
                    if path == "/v1/messages":  # Anthropic-shaped there
                        assert r.json()["type"] == "error" and "database" in err["message"], where
                    else:
                        assert err["type"] == "service_unavailable" and "database" in err["message"], where
                    assert r.headers["retry-after"] == "2", where
                    assert "127.0.0.1" not in r.text and str(sa.make_url(direct.url).port) not in r.text, where
            finally:
                cut.restore()
            r = client.post("/v1/chat/completions", json=chat, headers=as_key(fresh))
            assert r.status_code == 200, r.text
            assert client.get("/v1/usage", headers=as_key(cached)).status_code == 200
        _wait("nothing held after the outage", lambda: not reservations_sql.held(direct), 10)
        assert _budget(direct, "cached")[1] == 0.0


def test_readiness_reports_the_outage_too(tmp_path: Path, dataset: Path, busy_upstream: str) -> None:
    cfg = load_config(_config(tmp_path, dataset, busy_upstream, "postgresql+psycopg://nobody@127.0.0.1:1/none",
                              auto_migrate=False, log_close_timeout_s=0.5))
    with TestClient(create_app(cfg), raise_server_exceptions=False) as client:
        r = client.get("/health/readiness")
        assert r.status_code == 503
        r = client.post("/v1/chat/completions", json={"model": "small-general", "messages": MESSAGES},
                        headers={"authorization": "Bearer sk-ur-whatever"})
        assert r.status_code == 503 and r.headers["retry-after"] == "2", r.text
        assert r.json()["error"]["type"] == "service_unavailable" and ":1" not in r.json()["error"]["message"]
