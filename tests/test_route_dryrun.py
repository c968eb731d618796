"""The routing dry-run, ``POST /v1/route`` and ``uniroute route`` (issue #13 point 5; docs/ROUTING_FEATURES.md).

Against a real gateway (``uniroute serve`` on loopback, keys mode, SQLite) in front of the replay upstream,
through the official openai SDK's raw ``client.post`` and httpx. The promises tried:

- the ranking is the one a chat request with the same prompt and λ is served from (the chat's ``uniroute``
  candidates are its head, and the model the dry-run names is the model that serves the chat);
- every model the ranking leaves out is listed with its reason (not profiled, ``routable: false``, cooling),
  and a key restricted to some models sees only those;
- λ from the body or the header, checked against the key's range as for chat; a Responses-style ``input``;
- no model is called (the replay upstream counts no request), nothing is charged or logged (the key's spend and
  request count do not move), but auth and the rate limit apply.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.procs import ROOT, replay_upstream, server_env
from tests.routing_features import ADMIN, fit, gateway

PROMPT = "Compute the derivative of the polynomial given below."


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return fit(tmp_path_factory.mktemp("dryrun"))


@pytest.fixture(scope="module")
def stack(fitted: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(the gateway's base URL, the replay upstream's /v1 URL)."""
    data, art = fitted
    tmp = tmp_path_factory.mktemp("dryrun-gw")
    with replay_upstream(data, "--fail", "flaky=500") as replay, \
            gateway(tmp, data, art, replay, f"sqlite:///{tmp / 'gw.db'}") as url:
        yield url, replay


@pytest.fixture(scope="module")
def base(stack: tuple[str, str]) -> str:
    return stack[0]


def _upstream_calls(stack: tuple[str, str]) -> dict[str, int]:
    """The replay upstream's count of chat requests per model (what the gateway sent it)."""
    r = httpx.get(stack[1].removesuffix("/v1") + "/_replay/stats", timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json()["requests"])


@pytest.fixture(scope="module")
def admin(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30) as c:
        yield c


def _key(admin: httpx.Client, name: str, **fields: Any) -> str:
    r = admin.post("/admin/keys", json={"name": name, "lambda": 0.05, **fields})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


def _route(client: openai.OpenAI, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    out = client.post("/route", body=body, cast_to=object, options={"headers": headers} if headers else {})
    assert isinstance(out, dict)
    return out


def test_the_dry_run_is_the_ranking_chat_serves_from_and_charges_nothing(base: str, admin: httpx.Client,
                                                                         stack: tuple[str, str]) -> None:
    # flaky (always 500) is left out here: a chat would cool it, and the cooling test below wants it warm
    key = _key(admin, "dry", budget_usd=5.0, models=["accurate", "middling", "poor", "newbie", "byname"])
    with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as client, \
            httpx.Client(base_url=base, headers={"authorization": f"Bearer {key}"}, timeout=30) as h:
        usage0 = h.get("/v1/usage").json()
        for lam in (0.0, 0.05, 0.5, 5.0):
            report = _route(client, {"messages": [{"role": "user", "content": PROMPT}], "uniroute": {"lambda": lam}})
            assert report["object"] == "uniroute.route" and report["lambda"] == lam and report["charged_usd"] == 0
            ranked = [r["model"] for r in report["ranking"]]
            assert sorted(ranked) == ["accurate", "middling", "poor"]  # the key's profiled, routable models
            objectives = [r["objective"] for r in report["ranking"]]
            assert objectives == sorted(objectives)
            for r in report["ranking"]:
                assert r["objective"] == pytest.approx(r["expected_error"] + lam * r["cost"])
                assert 0 < r["cost"] <= 1
            assert report["cluster"] in (0, 1) and len(report["membership"]) == 2
            assert report["membership"][report["cluster"]] == 1.0  # K-means: one-hot on the nearest centroid
            assert report["model"] == report["fallback_order"][0] == ranked[0]
            assert len(report["fallback_order"]) == 3  # fallback.max_attempts
            # the same prompt and λ through chat: served by the model the dry-run names, from the same ranking
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": PROMPT}], extra_body={"uniroute": {"lambda": lam}})
            info = raw.parse().model_extra["uniroute"]  # type: ignore[index]
            assert info["model"] == report["model"], (lam, info, report)
            assert [c["model"] for c in info["candidates"]] == ranked[:len(info["candidates"])]
            assert info["cluster"] == report["cluster"]
        assert report["model"] == "poor"  # λ = 5: the cheapest
        # four chats moved the request count (the log is written in batches: wait for it); the dry-runs did not
        deadline = time.monotonic() + 15
        while True:
            usage1 = h.get("/v1/usage").json()
            served = usage1["period_requests"]["requests"] - usage0["period_requests"]["requests"]
            if served >= 4 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert served == 4, (usage0, usage1)
        assert usage1["budget"]["reserved_usd"] == 0
        calls = _upstream_calls(stack)
        assert sum(calls.values()) >= 4  # the chats reached the upstream
        for _ in range(5):  # and dry-runs alone move nothing: no model is called
            _route(client, {"messages": [{"role": "user", "content": PROMPT}]})
            _route(client, {"input": PROMPT, "uniroute": {"lambda": 5.0}})
        assert _upstream_calls(stack) == calls
        time.sleep(1.0)
        usage2 = h.get("/v1/usage").json()
        assert usage2["period_requests"] == usage1["period_requests"]
        assert usage2["budget"]["spent_usd"] == usage1["budget"]["spent_usd"]
        # excluded, with reasons: never profiled, routable: false
        codes = {e["model"]: e["code"] for e in report["excluded"]}
        assert codes == {"newbie": "not_profiled", "byname": "not_routable"}, report["excluded"]
        assert "uniroute profile newbie" in next(e["reason"] for e in report["excluded"] if e["model"] == "newbie")


def test_lambda_header_range_and_responses_input(base: str, admin: httpx.Client) -> None:
    key = _key(admin, "lam", lambda_max=1.0)
    with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as client:
        by_header = _route(client, {"messages": [{"role": "user", "content": PROMPT}]}, **{"x-uniroute-lambda": "0.7"})
        assert by_header["lambda"] == 0.7
        assert _route(client, {"messages": [{"role": "user", "content": PROMPT}]})["lambda"] == 0.05  # the key's
        with pytest.raises(openai.BadRequestError) as exc:
            _route(client, {"messages": [{"role": "user", "content": PROMPT}], "uniroute": {"lambda": 3}})
        assert exc.value.status_code == 400 and "[0.0, 1.0]" in str(exc.value)
        chat = _route(client, {"messages": [{"role": "user", "content": PROMPT}], "uniroute": {"lambda": 0.7}})
        as_string = _route(client, {"input": PROMPT, "uniroute": {"lambda": 0.7}})
        as_items = _route(client, {"model": "auto", "instructions": "be brief", "uniroute": {"lambda": 0.7},
                                   "input": [{"role": "user", "content": [{"type": "input_text", "text": PROMPT}]}]})
        assert chat["ranking"] == as_string["ranking"] == as_items["ranking"] == by_header["ranking"]
        for bad, param in (({"input": 3}, "input"), ({"input": [{"role": "assistant", "content": "hi"}]}, "input"),
                           ({"input": "x", "messages": [{"role": "user", "content": "x"}]}, "input"),
                           ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0]"),
                           ({"messages": []}, "messages")):
            with pytest.raises(openai.BadRequestError) as exc:
                _route(client, bad)
            assert exc.value.body["param"] == param, (bad, exc.value.body)  # type: ignore[index]
        # a named model: nothing ranked, the model itself
        named = _route(client, {"model": "middling", "messages": [{"role": "user", "content": PROMPT}]})
        assert named["model"] == "middling" and named["ranking"] == [] and named["excluded"] == []
        with pytest.raises(openai.NotFoundError):
            _route(client, {"model": "nope", "messages": [{"role": "user", "content": PROMPT}]})


def test_auth_rate_limit_restricted_keys_and_cooling(base: str, admin: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": PROMPT}], "uniroute": {"lambda": 5.0}}
    r = httpx.post(base + "/v1/route", json=body)
    assert r.status_code == 401
    r = httpx.post(base + "/v1/route", json=body, headers={"authorization": "Bearer sk-nope"})
    assert r.status_code == 401
    limited = _key(admin, "rpm", rpm=2)
    codes = [httpx.post(base + "/v1/route", json=body, headers={"authorization": f"Bearer {limited}"}).status_code
             for _ in range(3)]
    assert codes == [200, 200, 429]
    # a key restricted to two models sees them only: the others are neither ranked nor listed as excluded
    narrow = _key(admin, "narrow", models=["poor", "middling", "byname"])
    with openai.OpenAI(base_url=base + "/v1", api_key=narrow, max_retries=0) as client:
        report = _route(client, body)
        assert [r["model"] for r in report["ranking"]] == ["poor", "middling"]
        assert [e["model"] for e in report["excluded"]] == ["byname"]
        assert "accurate" not in str(report) and "newbie" not in str(report)
        with pytest.raises(openai.PermissionDeniedError):
            _route(client, {**body, "model": "accurate"})
    # flaky answers 500: one failure cools it (fallback.cooldown_failures: 1); the dry-run then tries it last
    key = _key(admin, "cool")
    with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as client:
        before = _route(client, body)
        assert before["model"] == "flaky" and not before["ranking"][0]["cooling"]
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="flaky", messages=[{"role": "user", "content": PROMPT}])
        after = _route(client, body)
        assert [r["model"] for r in after["ranking"]] == [r["model"] for r in before["ranking"]]  # still ranked
        assert after["ranking"][0]["cooling"] is True
        assert after["model"] != "flaky" and "flaky" not in after["fallback_order"][:-1]
        assert {"model": "flaky", "code": "cooling"}.items() <= next(
            e for e in after["excluded"] if e["model"] == "flaky").items()


def test_the_cli_prints_the_gateways_dry_run(base: str, admin: httpx.Client) -> None:
    key = _key(admin, "cli")
    env = server_env(UNIROUTE_API_KEY=key, UNIROUTE_URL=base)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway.cli.main", "route", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    out = cli(PROMPT, "--lambda", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("model: accurate  (λ = 0, key cli")
    assert "newbie: not_profiled" in out.stdout and "byname: not_routable" in out.stdout
    js = cli(PROMPT, "--lambda", "0", "--json")
    assert js.returncode == 0 and '"object": "uniroute.route"' in js.stdout
    bad = cli(PROMPT, "--lambda", "99")
    assert bad.returncode == 1 and bad.stderr.startswith("error: the gateway refused the dry-run (400)")
    assert "Traceback" not in bad.stderr
    down = cli(PROMPT, "--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot reach the gateway" in down.stderr
