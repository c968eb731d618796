"""Two `uniroute serve` replicas on one PostgreSQL database stay consistent (docs/DEPLOY.md).

Replica A (one worker) and replica B (``--workers 2``) are real uvicorn servers on two loopback ports, sharing a throwaway
PostgreSQL database, with ``auth.mode: keys``, in front of the replay upstream on a synthetic
dataset. Checked: a key revoked through A is refused by B on its very next request (the budget
reservation checks ``revoked_at`` in SQL; the key cache lives ``auth.cache_ttl_s``); a model
added or disabled through A's admin API reaches B within ``registry.poll_interval_s``; budget
spend through A and B adds up in ``GET /v1/usage`` on either, and an exhausted key is refused by both;
the per-key rate-limit window (Redis) counts requests through both.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import yaml

from tests.gateway_setup import make_dataset, write_config
from tests.procs import free_port, gateway_server, replay_server, running_all, server_env
from tests.storeutil import REDIS_URL, fresh_pg_database, require_redis

pytestmark = pytest.mark.postgres

ADMIN = "sk-admin-" + secrets.token_urlsafe(16)
POLL_S = 1.0  # registry.poll_interval_s of both replicas
SLACK_S = 2.0  # scheduling slack on 2 shared cores, on top of the documented bound


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """(A's base URL, B's base URL, the replay upstream's /v1 URL)."""
    root = tmp_path_factory.mktemp("replicas")
    dataset = make_dataset(root)
    replay, upstream = replay_server(dataset)
    with fresh_pg_database() as url:
        starts, bases = [replay], []
        prefix = f"uniroute:test-replicas:{secrets.token_hex(4)}:"  # one Redis namespace for both replicas
        for name in ("a", "b"):
            folder = root / name  # each replica has its own config folder (spill dir), same database
            folder.mkdir()
            cfg = write_config(folder, dataset, upstream)
            data = yaml.safe_load(cfg.read_text())
            data.update(auth={"mode": "keys", "cache_ttl_s": 1.0}, database_url=url,
                        registry={"poll_interval_s": POLL_S}, redis_url=REDIS_URL,
                        rate_limit={"redis_prefix": prefix, "fail_open": True})
            cfg.write_text(yaml.safe_dump(data))
            port = free_port()
            env = server_env(UNIROUTE_ADMIN_KEY=ADMIN)
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            workers = ["--workers", "2"] if name == "b" else []  # B: two uvicorn workers, multiprocess metrics
            # three gateway processes start together (B has two workers): give them time on 2 loaded cores
            starts.append(gateway_server(cfg, "--port", str(port), *workers, env=env, timeout_s=120))
            bases.append(f"http://127.0.0.1:{port}")
        # both replicas start at once on the empty database: migrations and the models seed run concurrently
        with running_all(*starts):
            yield bases[0], bases[1], upstream


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _chat(c: httpx.Client, base: str, key: str, model: str = "small-general", **extra: Any) -> httpx.Response:
    return c.post(f"{base}/v1/chat/completions", headers=_bearer(key),
                  json={"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra})


def _create_key(c: httpx.Client, base: str, name: str, **body: Any) -> str:
    r = c.post(f"{base}/admin/keys", headers=_bearer(ADMIN), json={"name": name, "lambda": 0.1, **body})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def _wait(cond: Callable[[], bool], timeout_s: float) -> float:
    """Poll ``cond`` every 50 ms; the seconds it took to hold. Fails after ``timeout_s``."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"not true within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_revocation_on_a_is_refused_on_b_at_once(replicas: tuple[str, str, str]) -> None:
    a, b, _ = replicas
    with httpx.Client(timeout=30) as c:
        key = _create_key(c, a, "revokee")
        assert _chat(c, b, key).status_code == 200  # B has the key's policy in its cache now
        assert c.delete(f"{a}/admin/keys/revokee", headers=_bearer(ADMIN)).status_code == 200
        # B's cache still holds the key, but the budget reservation checks revoked_at in the database
        r = _chat(c, b, key)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["type"] == "authentication_error" and "revoked" in r.json()["error"]["message"]
        time.sleep(1.2)  # past auth.cache_ttl_s: B's authenticator itself sees the revocation
        r = _chat(c, b, key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key", r.text
        assert c.get(f"{b}/admin/keys/revokee", headers=_bearer(ADMIN)).json()["revoked_at"] is not None


def test_registry_change_on_a_reaches_b_within_the_poll_interval(replicas: tuple[str, str, str]) -> None:
    a, b, upstream = replicas
    with httpx.Client(timeout=30) as c:
        key = _create_key(c, a, "registry-user")

        def listed(base: str) -> set[str]:
            return {m["id"] for m in c.get(f"{base}/v1/models", headers=_bearer(key)).json()["data"]}

        assert "extra-model" not in listed(b)
        r = c.post(f"{a}/admin/models", headers=_bearer(ADMIN), json={
            "name": "extra-model", "router_cost": 2.0, "input_cost_per_1m": 0.1, "output_cost_per_1m": 0.1,
            "litellm_params": {"model": "openai/small-general", "api_base": upstream, "api_key": "replay"}})
        assert r.status_code == 201, r.text
        took = _wait(lambda: "extra-model" in listed(b), POLL_S + SLACK_S)
        assert took <= POLL_S + SLACK_S
        r = _chat(c, b, key, "extra-model")
        assert r.status_code == 200 and r.headers["x-uniroute-model"] == "extra-model", r.text

        assert c.post(f"{a}/admin/models/extra-model/disable", headers=_bearer(ADMIN)).status_code == 200
        _wait(lambda: "extra-model" not in listed(b), POLL_S + SLACK_S)
        r = _chat(c, b, key, "extra-model")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


def test_budget_spend_is_shared_and_an_exhausted_key_is_refused_on_both(replicas: tuple[str, str, str]) -> None:
    a, b, _ = replicas
    with httpx.Client(timeout=30) as c:
        probe = _create_key(c, a, "probe")
        r = _chat(c, a, probe)
        assert r.status_code == 200, r.text
        unit = float(r.headers["x-uniroute-cost"])
        # max_tokens = the answer's length keeps the budget estimate close to the actual cost
        bounded: dict[str, Any] = {"max_tokens": int(r.json()["usage"]["completion_tokens"])}
        assert unit > 0
        key = _create_key(c, b, "shared", budget_usd=round(6.5 * unit, 12))
        costs: list[float] = []
        refused: httpx.Response | None = None
        for i in range(30):  # alternate replicas until the budget is exhausted
            r = _chat(c, (a, b)[i % 2], key, "small-general", **bounded)
            if r.status_code != 200:
                refused = r
                break
            costs.append(float(r.headers["x-uniroute-cost"]))
        assert refused is not None and len(costs) >= 2, "the budget was never exhausted"
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "budget_exceeded", refused.text
        for base in (a, b):  # both replicas refuse, and both report the spend of both
            r = _chat(c, base, key, "small-general", **bounded)
            assert r.status_code == 429 and r.json()["error"]["type"] == "budget_exceeded", r.text
            budget = c.get(f"{base}/v1/usage", headers=_bearer(key)).json()["budget"]
            assert budget["spent_usd"] == pytest.approx(sum(costs))
            assert budget["reserved_usd"] == pytest.approx(0.0, abs=1e-12)
            assert budget["spent_usd"] <= budget["limit_usd"] + 1e-9
            assert budget["remaining_usd"] == pytest.approx(budget["limit_usd"] - sum(costs))
        # the request log (written by each replica's background writer, ~1 s behind) holds both replicas' rows
        logged = len(costs) + 3  # served + the three budget refusals

        def counted(base: str) -> bool:
            usage = c.get(f"{base}/v1/usage", headers=_bearer(key)).json()
            return int(usage["period_requests"]["requests"]) == logged

        for base in (a, b):
            _wait(lambda: counted(base), 10.0)  # noqa: B023 (called at once)


def test_rate_limit_window_is_shared_through_redis(replicas: tuple[str, str, str]) -> None:
    require_redis()
    a, b, _ = replicas
    with httpx.Client(timeout=30) as c:
        key = _create_key(c, a, "limited", rpm=2)
        assert _chat(c, a, key).status_code == 200
        assert _chat(c, b, key).status_code == 200
        for base in (a, b):  # the third and fourth requests within the minute: refused by either replica
            r = _chat(c, base, key)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded", r.text
            assert 1 <= int(r.headers["retry-after"]) <= 60


def test_every_replica_reports_ready(replicas: tuple[str, str, str]) -> None:
    for base in replicas[:2]:
        assert httpx.get(f"{base}/health/liveliness").status_code == 200
        assert httpx.get(f"{base}/health/readiness").status_code == 200
