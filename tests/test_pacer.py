"""Budget-paced keys in the gateway: the store-backed pacer shared by replicas, the keys API and CLI, and
the λ in use in the header, the extension object and the metric (docs/PACING.md)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

from gateway.access.auth import create_key, principal_from_row
from gateway.access.budget import SqlBudgetGuard, period_start_for
from gateway.access.pacing import SqlPacer
from gateway.app import create_app
from gateway.cli.main import main as cli
from gateway.config import load_config
from gateway.errors import InvalidRequestError
from gateway.metrics import Metrics
from gateway.pacing import DEFAULT_LAMBDA_GRID, CostCurve
from gateway.store import pacing as pace_sql
from gateway.store.engine import Store
from gateway.store.keys import set_budget_policy
from tests.gateway_setup import make_dataset, replay_args, write_config
from tests.procs import replay_upstream
from tests.storeutil import store_fixture

ADMIN = "sk-admin-" + secrets.token_urlsafe(16)
CURVE = CostCurve.from_points(DEFAULT_LAMBDA_GRID, [0.05 + 0.95 / (1.0 + 20.0 * lam) for lam in DEFAULT_LAMBDA_GRID])


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


store = store_fixture()


async def test_replicas_share_one_paced_lambda_that_rises_as_spend_runs_ahead(store: Store) -> None:
    _raw, row = create_key(store, "paced", default_lambda=0.1, budget_usd=10.0, period="day", budget_policy="pace")
    key = principal_from_row(row)
    assert key.budget_policy == "pace"
    start = period_start_for("day", datetime.now(UTC))
    clock = Clock(start + timedelta(hours=6))  # a quarter of the day
    metrics = Metrics()
    a = SqlPacer(store, interval_s=60.0, clock=clock, metrics=metrics)
    b = SqlPacer(store, interval_s=60.0, clock=clock)  # another replica
    guard = SqlBudgetGuard(store, clock=clock)
    first = await a.paced_lambda(key, CURVE)
    assert 0 < first <= 0.1  # a new pace starts at the key's λ; nothing spent a quarter in: it may only fall
    assert await b.paced_lambda(key, CURVE) == first  # written less than interval_s ago: used as it is
    got = pace_sql.read(store, row.id)
    assert got is not None and got[1] is not None and got[1].version == 1
    # spend runs far ahead of the line (a quarter of the day, 60% of the budget): λ rises on both replicas
    held = await guard.reserve(key, 6.0)
    await guard.settle(held, 6.0)
    clock.now += timedelta(minutes=5)
    ahead = await b.paced_lambda(key, CURVE)
    assert ahead > first
    assert await a.paced_lambda(key, CURVE) == ahead
    assert metrics.key_lambda.labels(api_key_alias="paced")._value.get() == ahead
    # a write from a stale read loses (compare and set) and changes nothing
    got = pace_sql.read(store, row.id)
    assert got is not None and got[1] is not None
    stale = got[1].version - 1
    assert pace_sql.write(store, row.id, lam=0.0, integral=0.0, exposure=0.0, period_start=start,
                          updated_at=clock.now, expected_version=stale) is None
    # the budget is spent: the cheapest end of the key's range, and the hard cap still refuses
    held = await guard.reserve(key, 4.0)
    await guard.settle(held, 4.0)
    clock.now += timedelta(minutes=5)
    assert await a.paced_lambda(key, CURVE) == key.lambda_max


async def test_changing_the_policy_forgets_the_pace_and_an_unreachable_store_serves_the_last_lambda(
        store: Store) -> None:
    _raw, row = create_key(store, "p2", default_lambda=0.3, budget_usd=1.0, period="day", budget_policy="pace")
    key = principal_from_row(row)
    clock = Clock(period_start_for("day", datetime.now(UTC)) + timedelta(hours=1))
    pacer = SqlPacer(store, clock=clock)
    lam = await pacer.paced_lambda(key, CURVE)
    assert (got := pace_sql.read(store, row.id)) is not None and got[1] is not None
    set_budget_policy(store, "p2", "block")
    assert (got := pace_sql.read(store, row.id)) is not None and got[1] is None and got[0].budget_policy == "block"
    down = Store("postgresql+psycopg://nobody@127.0.0.1:1/none")
    try:
        assert await SqlPacer(down, clock=clock).paced_lambda(key, CURVE) == key.default_lambda  # never read
        pacer.store = down  # the database goes away after a step
        clock.now += timedelta(minutes=1)
        assert await pacer.paced_lambda(key, CURVE) == lam  # the last λ, not an error
    finally:
        down.dispose()


def test_pace_needs_a_budget_and_a_known_policy(store: Store) -> None:
    with pytest.raises(InvalidRequestError, match="set budget_usd"):
        create_key(store, "nobudget", default_lambda=0.1, budget_policy="pace")
    with pytest.raises(InvalidRequestError, match="valid: block, pace"):
        create_key(store, "odd", default_lambda=0.1, budget_usd=1.0, budget_policy="throttle")


def _chat(model: str = "auto") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}]}


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    dataset = make_dataset(tmp_path_factory.mktemp("pace"))
    with replay_upstream(dataset, *replay_args()) as base:
        yield dataset, base


def test_paced_keys_over_http(tmp_path: Path, upstream: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    path = write_config(tmp_path, *upstream)
    data = yaml.safe_load(path.read_text())
    data.update(auth={"mode": "keys"}, database_url=f"sqlite:///{tmp_path / 'gw.db'}")
    path.write_text(yaml.safe_dump(data))
    with TestClient(create_app(load_config(path)), raise_server_exceptions=False) as client:
        r = client.post("/admin/keys", headers=_bearer(ADMIN), json={"name": "p", "lambda": 0.2, "budget_policy": "pace"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "budget_policy"
        r = client.post("/admin/keys", headers=_bearer(ADMIN),
                        json={"name": "p", "lambda": 0.2, "budget_usd": 5.0, "budget_policy": "pace"})
        assert r.status_code == 201 and r.json()["budget_policy"] == "pace"
        paced = r.json()["key"]
        r = client.post("/admin/keys", headers=_bearer(ADMIN), json={"name": "b", "lambda": 0.3})
        assert r.json()["budget_policy"] == "block"
        blocked = r.json()["key"]

        r = client.post("/v1/chat/completions", json=_chat(), headers=_bearer(paced))
        assert r.status_code == 200, r.text
        lam = float(r.headers["x-uniroute-lambda"])
        assert r.json()["uniroute"]["lambda"] == pytest.approx(lam) and 0.0 <= lam <= 2.0
        r = client.post("/v1/chat/completions", json=_chat(), headers={**_bearer(paced), "x-uniroute-lambda": "1.5"})
        assert r.headers["x-uniroute-lambda"] == "1.5"  # a request's own λ wins
        r = client.post("/v1/chat/completions", json={**_chat(), "stream": True}, headers=_bearer(blocked))
        assert r.status_code == 200 and r.headers["x-uniroute-lambda"] == "0.3"
        metrics = client.get("/metrics", headers=_bearer(ADMIN)).text
        assert 'uniroute_key_lambda{api_key_alias="p"}' in metrics
        assert 'uniroute_key_lambda{api_key_alias="b"}' not in metrics

        r = client.patch("/admin/keys/b", headers=_bearer(ADMIN), json={"budget_policy": "pace"})
        assert r.status_code == 400 and "set budget_usd" in r.json()["error"]["message"]
        r = client.patch("/admin/keys/p", headers=_bearer(ADMIN), json={"budget_policy": "slow"})
        assert r.status_code == 400 and "valid: block, pace" in r.json()["error"]["message"]
        r = client.patch("/admin/keys/p", headers=_bearer(ADMIN), json={"budget_policy": "block"})
        assert r.status_code == 200 and r.json()["budget_policy"] == "block"
        r = client.patch("/admin/keys/p", headers=_bearer(ADMIN), json={})
        assert r.status_code == 400


def test_cli_keys_budget_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("UNIROUTE_DATABASE_URL", f"sqlite:///{tmp_path / 'k.db'}")
    monkeypatch.chdir(tmp_path)
    assert cli(["keys", "create", "--name", "a", "--lambda", "0.1", "--budget-policy", "pace"]) == 1
    assert "set budget_usd" in capsys.readouterr().err
    assert cli(["keys", "create", "--name", "a", "--lambda", "0.1", "--budget", "2", "--budget-policy", "pace"]) == 0
    assert "paced" in capsys.readouterr().err
    assert cli(["keys", "list"]) == 0 and "paced" in capsys.readouterr().out
    assert cli(["keys", "policy", "a", "block"]) == 0 and "budget policy block" in capsys.readouterr().out
    assert cli(["keys", "create", "--name", "c", "--lambda", "0.1"]) == 0
    capsys.readouterr()
    assert cli(["keys", "policy", "c", "pace"]) == 1 and "set budget_usd" in capsys.readouterr().err
