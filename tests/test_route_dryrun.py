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

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.procs import ROOT, python, replay_upstream, server_env
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
    key = _key(admin, "dry", budget_usd=5.0, models=["accurate", "middling", "poor", "newbie", "byname",
                                          "vectors"])
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
            info = (raw.parse().model_extra or {})["uniroute"]
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
        assert codes == {"newbie": "not_profiled", "byname": "not_routable", "vectors": "embedding"}, report["excluded"]
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
        return python(["-m", "gateway.cli.main", "route", *args], cwd=ROOT, env=env, timeout=60)

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


# ------------------------------------------------- models a key may not use: a count to the key, names to the operator
def _registered(admin: httpx.Client) -> set[str]:
    r = admin.get("/admin/models")
    assert r.status_code == 200, r.text
    return {m["name"] for m in r.json()["data"]}


def _admin_route(admin: httpx.Client, name: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return admin.post(f"/admin/keys/{name}/route", json=body, headers=headers)


def test_a_key_counts_what_it_may_not_use_and_the_operator_names_it(base: str, admin: httpx.Client,
                                                                    stack: tuple[str, str]) -> None:
    allowed = ["poor", "middling", "byname"]
    key = _key(admin, "tally", models=allowed, budget_usd=5.0)
    hidden = _registered(admin) - set(allowed)
    assert {"accurate", "newbie"} <= hidden  # what the key may not use: a profiled model and an unprofiled one
    body = {"messages": [{"role": "user", "content": PROMPT}], "uniroute": {"lambda": 0.05}}
    with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as client, \
            httpx.Client(base_url=base, headers={"authorization": f"Bearer {key}"}, timeout=30) as h:
        usage0 = h.get("/v1/usage").json()
        calls0 = _upstream_calls(stack)
        own = _route(client, body)
        # the key: how many, never which
        assert own["view"] == "key" and own["excluded_not_allowed"] == len(hidden)
        assert all(e["code"] != "not_allowed" for e in own["excluded"])
        assert not any(f'"{m}"' in json.dumps(own) for m in hidden), own
        # the operator, on the key's behalf: the same plan, and the hidden models by name
        r = _admin_route(admin, "tally", body)
        assert r.status_code == 200, r.text
        op = r.json()
        assert op["view"] == "operator" and op["key"] == "tally" and op["charged_usd"] == 0
        assert op["ranking"] == own["ranking"] and op["model"] == own["model"] and op["lambda"] == own["lambda"]
        assert op["fallback_order"] == own["fallback_order"] and op["cluster"] == own["cluster"]
        assert op["excluded_not_allowed"] == len(hidden)
        named = {e["model"] for e in op["excluded"] if e["code"] == "not_allowed"}
        assert named == hidden, op["excluded"]
        assert [e for e in op["excluded"] if e["code"] != "not_allowed"] == own["excluded"]
        assert "models list" in next(e["reason"] for e in op["excluded"] if e["code"] == "not_allowed")
        # the key's λ when the body names none, and λ from the header, checked against the key's range
        r = _admin_route(admin, "tally", {"input": PROMPT}, **{"x-uniroute-lambda": "0.5"})
        assert r.status_code == 200 and r.json()["lambda"] == 0.5
        assert _admin_route(admin, "tally", {"input": PROMPT}).json()["lambda"] == 0.05
        r = _admin_route(admin, "tally", {"input": PROMPT, "uniroute": {"lambda": 99}})
        assert r.status_code == 400 and "lambda" in r.text
        # a named model the key may not use: what the key would get (403)
        r = _admin_route(admin, "tally", {**body, "model": "accurate"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        # no model called, nothing charged or logged for the key
        for _ in range(3):
            assert _admin_route(admin, "tally", body).status_code == 200
        assert _upstream_calls(stack) == calls0
        time.sleep(1.0)
        usage1 = h.get("/v1/usage").json()
        assert usage1["period_requests"] == usage0["period_requests"]
        assert usage1["budget"]["spent_usd"] == usage0["budget"]["spent_usd"] == 0
        assert usage1["budget"]["reserved_usd"] == 0
    # a key without a models list: nothing is not allowed
    free = _key(admin, "unrestricted")
    with openai.OpenAI(base_url=base + "/v1", api_key=free, max_retries=0) as client:
        assert _route(client, body)["excluded_not_allowed"] == 0
    op = _admin_route(admin, "unrestricted", body).json()
    assert op["excluded_not_allowed"] == 0 and all(e["code"] != "not_allowed" for e in op["excluded"])
    # a named model: nothing is ranked, nothing excluded or counted
    with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0) as client:
        named_own = _route(client, {**body, "model": "poor"})
    assert named_own["excluded"] == [] and named_own["excluded_not_allowed"] == 0


def test_the_operator_dry_run_refusals_and_the_rate_limit(base: str, admin: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": PROMPT}]}
    r = _admin_route(admin, "no-such-key", body)
    assert r.status_code == 404 and "no-such-key" in r.json()["error"]["message"]
    gone = _key(admin, "gone")
    assert admin.delete("/admin/keys/gone").status_code == 200
    r = _admin_route(admin, "gone", body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "revoked_api_key"
    assert httpx.post(base + "/admin/keys/gone/route", json=body).status_code == 401
    limited = _key(admin, "rpm-op", rpm=2)
    r = httpx.post(base + "/admin/keys/rpm-op/route", json=body, headers={"authorization": f"Bearer {limited}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"  # a client key is not the admin
    assert httpx.post(base + "/admin/keys/rpm-op/route", json=body,
                      headers={"authorization": f"Bearer {gone}"}).status_code == 401
    r = _admin_route(admin, "tally-bad", {"input": 3})
    assert r.status_code == 404  # the key is looked up before the body is read
    _key(admin, "bodycheck")
    r = _admin_route(admin, "bodycheck", {"input": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    # the operator's dry-runs do not count toward the key's rate limit (rpm 2): the key's own two still pass
    for _ in range(3):
        assert _admin_route(admin, "rpm-op", body).status_code == 200
    own = [httpx.post(base + "/v1/route", json=body, headers={"authorization": f"Bearer {limited}"}).status_code
           for _ in range(3)]
    assert own == [200, 200, 429]


def _key_lambda_gauge(admin: httpx.Client, name: str) -> float | None:
    text = admin.get("/metrics").text
    m = re.search(rf'^uniroute_key_lambda{{api_key_alias="{re.escape(name)}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_the_operator_sees_the_paced_lambda_and_the_tenant_overlay(base: str, admin: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": PROMPT}]}
    # a paced key: the λ of its next request, as its own dry-run and the uniroute_key_lambda gauge show it
    paced = _key(admin, "paced", budget_usd=0.001, period="day", budget_policy="pace")
    op = _admin_route(admin, "paced", body).json()
    with openai.OpenAI(base_url=base + "/v1", api_key=paced, max_retries=0) as client:
        own = _route(client, body)
    # the controller steps at most once per router.pace_interval_s (1 s) and is time-driven: on a slow machine the two
    # calls may fall in different intervals, so the λs agree to within a step's drift, not necessarily bit for bit
    assert own["lambda"] == _key_lambda_gauge(admin, "paced")
    assert op["lambda"] == pytest.approx(own["lambda"], rel=0.02), (op["lambda"], own["lambda"])
    assert abs(op["lambda"] - 0.05) > 0.01, f"the paced λ {op['lambda']} is the key's default: was it paced?"
    # a key with a tenant-private profile: the operator's dry-run ranks with the key's overlay
    _key(admin, "tenant")
    labels = [{"prompt": PROMPT, "scores": {"accurate": 0.0, "poor": 1.0, "middling": 0.0}}] * 200
    r = admin.post("/admin/keys/tenant/profile", json={"labels": labels})
    assert r.status_code == 200, r.text
    tenant = _admin_route(admin, "tenant", {**body, "uniroute": {"lambda": 0.0}}).json()
    other = _admin_route(admin, "paced", {**body, "uniroute": {"lambda": 0.0}}).json()
    assert tenant["profile"] == "key" and other["profile"] == "global"
    assert tenant["model"] == "poor" and other["model"] != "poor", (tenant["ranking"], other["ranking"])


def test_the_cli_dry_run_on_behalf_of_a_key(base: str, admin: httpx.Client) -> None:
    key = _key(admin, "cli-narrow", models=["poor", "middling"])
    hidden = _registered(admin) - {"poor", "middling"}
    env = server_env(UNIROUTE_API_KEY=key, UNIROUTE_URL=base, UNIROUTE_ADMIN_KEY=ADMIN)
    no_admin = {k: v for k, v in env.items() if k != "UNIROUTE_ADMIN_KEY"}

    def cli(*args: str, environ: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
        return python(["-m", "gateway.cli.main", "route", *args], cwd=ROOT, env=environ, timeout=60)

    own = cli(PROMPT, "--lambda", "0")
    assert own.returncode == 0, own.stderr
    assert f"and {len(hidden)} registered models this key may not use" in own.stdout
    assert not any(f"{m}:" in own.stdout for m in hidden), own.stdout
    op = cli(PROMPT, "--lambda", "0", "--key", "cli-narrow")
    assert op.returncode == 0, op.stderr
    assert "key cli-narrow" in op.stdout and "[operator view]" in op.stdout
    for m in hidden:
        assert f"  {m}: not_allowed:" in op.stdout, op.stdout
    js = cli(PROMPT, "--key", "cli-narrow", "--json")
    assert js.returncode == 0 and json.loads(js.stdout)["view"] == "operator"
    unknown = cli(PROMPT, "--key", "nobody-here")
    assert unknown.returncode == 1 and unknown.stderr.startswith("error: the gateway refused the dry-run (404)")
    missing = cli(PROMPT, "--key", "cli-narrow", environ=no_admin)
    assert missing.returncode == 1 and "needs the admin key" in missing.stderr and "Traceback" not in missing.stderr
    raw = cli(PROMPT, "--key", key, environ=no_admin)
    assert raw.returncode == 1 and "--api-key" in raw.stderr and key not in raw.stderr
    as_key = cli(PROMPT, "--api-key", key, environ=no_admin)
    assert as_key.returncode == 0 and "[operator view]" not in as_key.stdout


def test_the_operator_dry_run_needs_keys_mode(fitted: tuple[Path, Path], stack: tuple[str, str],
                                              tmp_path: Path) -> None:
    """With ``auth.mode: open`` every caller is ``anonymous``: no key's settings apply, so the operator's dry-run
    on behalf of a key is a 400 saying so (the open dry-run itself still answers)."""
    data, art = fitted
    with gateway(tmp_path, data, art, stack[1], f"sqlite:///{tmp_path / 'open.db'}", auth={"mode": "open"}) as url:
        body = {"messages": [{"role": "user", "content": PROMPT}]}
        r = httpx.post(url + "/admin/keys/anyone/route", json=body, headers={"authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "auth_mode_open", r.text
        assert httpx.post(url + "/admin/keys/anyone/route", json=body).status_code == 401
        r = httpx.post(url + "/v1/route", json=body)
        assert r.status_code == 200 and r.json()["key"] == "anonymous" and r.json()["excluded_not_allowed"] == 0
