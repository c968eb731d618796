"""Secrets stay secret (issue 10, rows 7 and 8; docs/security/secrets.md), tried as a careless provider and a
careless or hostile admin would:

- a provider that echoes ``Authorization: Bearer <provider key>`` in its error: neither the client (official
  openai SDK, streaming or not) nor the gateway's log (``uniroute serve`` on loopback) ever holds the key;
  a connection error names the model and the request id, never the internal ``host:port``;
- config.yaml's literal keys and ``${VAR}`` keys reach the provider intact (the fake upstream records the
  ``Authorization`` header it got), though the ``models`` table holds them masked;
- the admin API: ``os.environ/NAME`` only from ``admin.env_allowlist`` (``UNIROUTE_ADMIN_KEY`` refused),
  literal keys refused unless ``admin.allow_literal_keys``, then stored encrypted (SQLite and PostgreSQL)
  and decrypted only in memory; every nested secret masked in every admin answer and the CLI's output.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
import yaml
from cryptography.fernet import Fernet
from starlette.testclient import TestClient

from gateway import secrets
from gateway.app import create_app
from gateway.config import parse_config
from gateway.secrets import mask, scrub
from gateway.serving.forwarding import Forwarder
from gateway.serving.registry import ModelEntry, RegistrySnapshot
from gateway.spec import ModelSpec
from tests.fake_upstream import FakeUpstream, ProviderError
from tests.procs import ROOT, fake_upstream, free_port, popen, server_env
from tests.storeutil import fresh_pg_database

ADMIN = "sk-admin-secrets-test-0123456789"
LEAK_KEY = "sk-live-provider-key-7f3a9c2e1b"  # what the careless provider echoes back
LITERAL_KEY = "literal-config-key-4d2c8e"  # written as is in config.yaml
VAR_KEY = "var-config-key-9b1f7a"  # config.yaml: ${SECRETS_TEST_VAR}
REF_KEY = "ref-config-key-1e5d3c"  # config.yaml: os.environ/SECRETS_TEST_API_KEY
ADMIN_LITERAL = "admin-literal-key-6a8b2d"
HEADER_SECRET = "header-secret-3c7e9f"
FERNET_KEY = Fernet.generate_key().decode()


# ------------------------------------------------------------------------------------------ scrub
@pytest.mark.parametrize("text, secret", [
    ("Error code: 401 - {'error': {'message': 'got Authorization: Bearer abcdEFGH1234'}}", "abcdEFGH1234"),
    ('{"headers": {"authorization": "Bearer abcdEFGH1234"}}', "abcdEFGH1234"),
    ("Incorrect API key provided: sk-proj-abcdef123456789. You can find your key", "abcdef123456789"),
    ("bad x-api-key: q1w2e3r4t5 sent", "q1w2e3r4t5"),
    ("api-key=q1w2e3r4t5&model=x", "q1w2e3r4t5"),
    ("'api_key': 'q1w2e3r4t5'", "q1w2e3r4t5"),
    ("cannot reach https://user:hunter2pass@10.0.0.7:8443/v1", "hunter2pass"),
    ("password=hunter2pass", "hunter2pass"),
    ("Basic dXNlcjpodW50ZXIy was refused", "dXNlcjpodW50ZXIy"),
])
def test_scrub_removes_credentials(text: str, secret: str) -> None:
    assert secret not in scrub(text) and "***" in scrub(text)


def test_scrub_removes_registry_keys_verbatim_and_internal_hosts() -> None:
    secrets.remember([{"model": "openai/x", "api_key": "plainvaluewithnoprefix42",
                       "api_base": "http://gpu-box.internal:9911/v1"}])
    out = scrub("key plainvaluewithnoprefix42 refused by gpu-box.internal:9911 (also 10.2.3.4:80)")
    assert "plainvaluewithnoprefix42" not in out and "gpu-box.internal" not in out and "10.2.3.4" not in out
    # DEBUG keeps the host, never the key
    assert "gpu-box.internal:9911" in scrub("at gpu-box.internal:9911", hosts=False)
    # ordinary provider messages are left alone
    for text in ("maximum context length is 8192 tokens, you requested 9000 tokens", "max_tokens: 100 is too large",
                 "model 'gpt-x' does not exist"):
        assert scrub(text) == text


def test_a_short_host_name_is_replaced_only_where_it_stands_as_a_name() -> None:
    # a host like "h" or "api" must not mangle words that contain it ("this" -> "t<upstream>is")
    secrets.remember([{"model": "openai/y", "api_base": "http://u:pw@h/v1"},
                      {"model": "openai/z", "api_base": "https://api/v1"}])
    text = "this provider rejects the request: which api_key? see the rapid API docs at apis.example"
    assert scrub(text) == text
    assert scrub("connect to h:443 failed") == "connect to <upstream>:443 failed"
    assert scrub("GET https://api/v1/chat (h)") == "GET https://<upstream>/v1/chat (<upstream>)"
    assert scrub("at api.internal.example") == "at api.internal.example"


def test_log_filter_scrubs_messages_arguments_and_tracebacks() -> None:
    record = logging.LogRecord("uniroute.x", logging.ERROR, __file__, 1, "upstream said %s", ("Bearer abcdEFGH1234",),
                               None)
    try:
        raise RuntimeError("Authorization: Bearer zyxwVUTS9876")
    except RuntimeError:
        record.exc_info = sys.exc_info()
    secrets.ScrubFilter().filter(record)
    text = logging.Formatter().format(record)
    assert "abcdEFGH1234" not in text and "zyxwVUTS9876" not in text and "RuntimeError" in text


def test_mask_reaches_every_nesting_level() -> None:
    params = {"model": "openai/x", "api_key": "lit-abc", "api_base": "http://u:pw123@h:1/v1",
              "extra_headers": {"Authorization": "Bearer tqz9", "X-Trace": "sk-abcdefghijk", "X-Team": "blue"},
              "ref": "os.environ/OPENAI_API_KEY", "nested": [{"client_secret": "s"}, {"note": "ok"}],
              "max_tokens": 64, "aws_secret_access_key": "AKIA"}
    out = mask(params)
    text = json.dumps(out)
    for secret in ("lit-abc", "pw123", "tqz9", "sk-abcdefghijk", '"s"', "AKIA"):
        assert secret not in text
    assert out["ref"] == "os.environ/OPENAI_API_KEY" and out["extra_headers"]["X-Team"] == "blue"
    assert out["max_tokens"] == 64 and out["api_base"] == "http://u:***@h:1/v1"


# --------------------------------------------------------------------- forwarder: one scrub for all
async def test_forwarder_error_and_log_never_hold_the_provider_key(caplog: pytest.LogCaptureFixture) -> None:
    class Echoing(FakeUpstream):
        async def complete(self, entry: ModelEntry, messages: list[dict[str, Any]], params: Any) -> Any:
            raise ProviderError(500, f"upstream auth failed; headers were Authorization: Bearer "
                                     f"{entry.litellm_params['api_key']}")

    entry = ModelEntry.from_spec(ModelSpec(name="m", router_cost=1.0, litellm_params={
        "model": "openai/m", "api_key": "nonprefixedkeyvalue123", "api_base": "http://10.9.8.7:4000/v1"}))
    fwd = Forwarder(max_attempts=1, upstream=Echoing())
    fwd.register(RegistrySnapshot.build([entry]))
    caplog.set_level(logging.DEBUG, logger="uniroute")
    with pytest.raises(Exception) as err:
        await fwd.complete([entry], [{"role": "user", "content": "hi"}], {})
    assert "nonprefixedkeyvalue123" not in str(err.value) and "***" in str(err.value)
    assert "nonprefixedkeyvalue123" not in caplog.text


# ------------------------------------------------------------------------------ the real gateway
def _config(up: str, dead: str, root: Path) -> dict[str, Any]:
    def model(name: str, api_key: str, base: str = up, **extra: Any) -> dict[str, Any]:
        return {"name": name, "router_cost": 1.0, "timeout_s": 10,
                "litellm_params": {"model": f"openai/{name}", "api_base": base, "api_key": api_key, **extra}}

    return {
        "auth": {"mode": "open"},
        "database_url": f"sqlite:///{root / 'gw.db'}",
        "registry": {"poll_interval_s": 0.2},
        "fallback": {"max_attempts": 1, "cooldown_failures": 0},
        "admin": {"allow_literal_keys": True},  # env_allowlist: the default, *_API_KEY
        "models": [model("m-leak", "os.environ/SECRETS_LEAK_API_KEY"), model("literal", LITERAL_KEY), model("envvar", "${SECRETS_TEST_VAR}"),
                   model("ref", "os.environ/SECRETS_TEST_API_KEY"),
                   model("headers", "unused", extra_headers={"X-Api-Key": HEADER_SECRET}),
                   model("dead", LEAK_KEY, base=dead)],
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """(gateway /v1 URL, fake upstream /v1 URL, the gateway's log file): `uniroute serve` at log level info."""
    root = tmp_path_factory.mktemp("secrets")
    with fake_upstream() as up:
        cfg = root / "config.yaml"
        cfg.write_text(yaml.safe_dump(_config(up, f"http://127.0.0.1:{free_port()}/v1", root)))
        port = free_port()
        log = root / "gateway.log"
        env = server_env(UNIROUTE_ADMIN_KEY=ADMIN, UNIROUTE_SECRET_KEY=FERNET_KEY, SECRETS_TEST_VAR=VAR_KEY,
                         SECRETS_TEST_API_KEY=REF_KEY, SECRETS_LEAK_API_KEY=LEAK_KEY)
        with log.open("wb") as fh:
            proc = popen(["-m", "gateway.cli.main", "serve", "--config", str(cfg), "--port", str(port)], cwd=ROOT,
                         env=env, stdout=fh)
            try:
                deadline = time.monotonic() + 90
                while True:
                    assert proc.poll() is None, log.read_text()[-3000:]
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/health/readiness", timeout=1).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert time.monotonic() < deadline, "gateway not ready"
                    time.sleep(0.2)
                yield f"http://127.0.0.1:{port}/v1", up, log
            finally:
                proc.terminate()
                proc.wait(timeout=20)


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)


def test_provider_echoing_the_key_never_reaches_client_or_log(served: tuple[str, str, Path]) -> None:
    base, _, log = served
    client = _client(base)
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="m-leak", messages=[{"role": "user", "content": "hi"}])
    seen = json.dumps(err.value.body) + str(err.value)
    assert LEAK_KEY not in seen and "***" in seen, seen
    with pytest.raises(openai.APIStatusError) as err:
        for _ in client.chat.completions.create(model="m-leak", messages=[{"role": "user", "content": "hi"}],
                                                stream=True):
            pass
    seen = json.dumps(err.value.body) + str(err.value)
    assert LEAK_KEY not in seen and "***" in seen, seen
    # the provider key is in no log line, however it was echoed (the key's tail alone neither)
    time.sleep(0.3)
    text = log.read_text()
    assert "m-leak" in text and LEAK_KEY not in text and LEAK_KEY[8:] not in text


def test_connection_error_names_model_and_request_id_not_the_host(served: tuple[str, str, Path]) -> None:
    base, _, log = served
    r = httpx.post(f"{base}/chat/completions", json={"model": "dead", "messages": [{"role": "user", "content": "x"}]},
                   timeout=30)
    assert r.status_code == 502, r.text
    message, rid = r.json()["error"]["message"], r.headers["x-uniroute-request-id"]
    assert "'dead'" in message and rid in message and "127.0.0.1" not in message, message
    dead_port = yaml.safe_load((log.parent / "config.yaml").read_text())["models"][-1]["litellm_params"]["api_base"]
    time.sleep(0.3)
    assert dead_port.split("//")[1].split("/")[0] not in log.read_text()  # INFO log: no internal host:port


def test_config_literal_and_var_keys_reach_the_provider_intact(served: tuple[str, str, Path]) -> None:
    base, up, _ = served
    client = _client(base)
    for name in ("literal", "envvar", "ref", "headers"):
        assert client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}]).choices
    auth = httpx.get(up.removesuffix("/v1") + "/auth").json()
    assert auth["literal"] == f"Bearer {LITERAL_KEY}"
    assert auth["envvar"] == f"Bearer {VAR_KEY}"
    assert auth["ref"] == f"Bearer {REF_KEY}"
    # ...while the table holds no secret of config.yaml and the admin API shows none
    engine = sa.create_engine(f"sqlite:///{served[2].parent / 'gw.db'}")
    with engine.connect() as conn:
        stored = json.dumps([r[0] for r in conn.execute(sa.text("SELECT litellm_params FROM models"))])
    engine.dispose()
    for secret in (LITERAL_KEY, VAR_KEY, LEAK_KEY, HEADER_SECRET):
        assert secret not in stored
    listed = httpx.get(f"{base.removesuffix('/v1')}/admin/models", headers={"authorization": f"Bearer {ADMIN}"}).text
    for secret in (LITERAL_KEY, VAR_KEY, REF_KEY, LEAK_KEY, HEADER_SECRET):
        assert secret not in listed


def test_admin_api_env_allowlist_and_encrypted_literal_keys(served: tuple[str, str, Path]) -> None:
    base, up, log = served
    gw = base.removesuffix("/v1")
    h = {"authorization": f"Bearer {ADMIN}"}

    def body(name: str, **params: Any) -> dict[str, Any]:
        return {"name": name, "router_cost": 1.0, "litellm_params": {"model": f"openai/{name}", "api_base": up,
                                                                       **params}}

    r = httpx.post(f"{gw}/admin/models", headers=h, json=body("steal", api_key="os.environ/UNIROUTE_ADMIN_KEY"))
    assert r.status_code == 400 and "admin.env_allowlist" in r.text and "*_API_KEY" in r.text, r.text
    r = httpx.post(f"{gw}/admin/models", headers=h,
                   json=body("steal2", api_key="x", extra_headers={"X-Key": "os.environ/UNIROUTE_SECRET_KEY"}))
    assert r.status_code == 400 and "UNIROUTE_SECRET_KEY" in r.text and FERNET_KEY not in r.text
    # a literal key (allowed by this config) is stored encrypted, shown masked, and sent as it was
    r = httpx.post(f"{gw}/admin/models", headers=h,
                   json=body("added", api_key=ADMIN_LITERAL, extra_headers={"X-Api-Key": HEADER_SECRET}))
    assert r.status_code == 201, r.text
    assert ADMIN_LITERAL not in r.text and HEADER_SECRET not in r.text
    assert r.json()["litellm_params"]["api_key"] == "***"
    engine = sa.create_engine(f"sqlite:///{log.parent / 'gw.db'}")
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT litellm_params FROM models WHERE name = 'added'")).scalar_one()
    engine.dispose()
    params = json.loads(row) if isinstance(row, str) else row
    assert params["api_key"].startswith("encrypted/") and ADMIN_LITERAL not in json.dumps(params)
    deadline = time.monotonic() + 10
    while True:
        r = httpx.post(f"{base}/chat/completions", json={"model": "added", "messages": [{"role": "user", "content": "x"}]},
                       timeout=30)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    assert httpx.get(up.removesuffix("/v1") + "/auth").json()["added"] == f"Bearer {ADMIN_LITERAL}"
    # a masked value sent back is refused, not stored
    r = httpx.patch(f"{gw}/admin/models/added", headers=h,
                    json={"litellm_params": {"model": "openai/added", "api_key": "***"}})
    assert r.status_code == 400 and "masked" in r.text
    for path in ("/admin/models", "/admin/models/added"):
        text = httpx.get(f"{gw}{path}", headers=h).text
        assert ADMIN_LITERAL not in text and HEADER_SECRET not in text


# ------------------------------------------------------- admin defaults, on SQLite and PostgreSQL
@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gw.db'}"
    else:
        with fresh_pg_database() as url:
            yield url


def test_admin_defaults_refuse_literal_keys_and_unlisted_env(database_url: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-openai-key-000000")
    cfg = parse_config({"auth": {"mode": "open"}, "database_url": database_url}, base_dir=tmp_path)
    h = {"authorization": f"Bearer {ADMIN}"}

    def body(name: str, **params: Any) -> dict[str, Any]:
        return {"name": name, "router_cost": 1.0, "litellm_params": {"model": f"openai/{name}", **params}}

    with TestClient(create_app(cfg)) as client:
        for bad, needle in [
            (body("a", api_key=ADMIN_LITERAL), "admin.allow_literal_keys"),
            (body("b", api_key="x", extra_headers={"Authorization": f"Bearer {ADMIN_LITERAL}"}), "Authorization"),
            (body("c", api_base=f"http://user:{ADMIN_LITERAL}@10.0.0.1/v1"), "api_base"),
            (body("d", api_key="os.environ/UNIROUTE_ADMIN_KEY"), "admin.env_allowlist"),
            (body("e", api_key="os.environ/HOME"), "admin.env_allowlist"),
            (body("f", api_key="12345678"), "admin.allow_literal_keys"),
        ]:
            r = client.post("/admin/models", headers=h, json=bad)
            assert r.status_code == 400 and needle in r.text and ADMIN_LITERAL not in r.text, r.text
        assert client.post("/admin/models", headers=h, json=body("ok", api_key="os.environ/OPENAI_API_KEY")
                           ).status_code == 201
        # the dummy key of a keyless upstream (vLLM's EMPTY, the replay upstream's "replay") is no secret
        assert client.post("/admin/models", headers=h, json=body("local", api_key="EMPTY")).status_code == 201
        r = client.patch("/admin/models/ok", headers=h,
                         json={"litellm_params": {"model": "openai/ok", "api_key": ADMIN_LITERAL}})
        assert r.status_code == 400 and "admin.allow_literal_keys" in r.text
        assert client.get("/admin/models/ok", headers=h).json()["litellm_params"]["api_key"] == \
            "os.environ/OPENAI_API_KEY"
    # rows written around the API (the CLI, an old database): every nested secret is masked when shown
    from gateway.cli.main import main as cli
    from gateway.store import models as catalog
    from gateway.store.engine import Store

    store = Store(database_url)
    try:
        catalog.add_model(store, ModelSpec(name="raw", router_cost=1.0, litellm_params={
            "model": "openai/raw", "api_key": ADMIN_LITERAL, "api_base": f"http://u:{HEADER_SECRET}@raw-upstream.internal/v1",
            "extra_headers": {"Authorization": f"Bearer {ADMIN_LITERAL}"}, "fallbacks": [{"token": ADMIN_LITERAL}]}))
    finally:
        store.dispose()
    with TestClient(create_app(cfg)) as client:
        for path in ("/admin/models", "/admin/models/raw"):
            text = client.get(path, headers=h).text
            assert "raw" in text and ADMIN_LITERAL not in text and HEADER_SECRET not in text
    conf = tmp_path / "cli.yaml"
    conf.write_text(yaml.safe_dump({"database_url": database_url}))
    capsys.readouterr()
    assert cli(["models", "list", "--json", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "raw" in out and ADMIN_LITERAL not in out and HEADER_SECRET not in out


def test_encrypted_value_needs_the_key_and_a_placeholder_is_never_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIROUTE_SECRET_KEY", FERNET_KEY)
    stored, problems = secrets.admin_params({"model": "openai/x", "api_key": ADMIN_LITERAL}, env_allowlist=[],
                                            allow_literal_keys=True)
    assert not problems and stored["api_key"].startswith("encrypted/")
    spec = ModelSpec(name="enc", router_cost=1.0, litellm_params=stored)
    assert ModelEntry.from_spec(spec).litellm_params["api_key"] == ADMIN_LITERAL
    monkeypatch.setenv("UNIROUTE_SECRET_KEY", Fernet.generate_key().decode())
    with pytest.raises(ValueError, match="another key"):
        ModelEntry.from_spec(spec)
    monkeypatch.delenv("UNIROUTE_SECRET_KEY")
    with pytest.raises(ValueError, match="UNIROUTE_SECRET_KEY is not set"):
        ModelEntry.from_spec(spec)
    _, problems = secrets.admin_params({"model": "openai/x", "api_key": ADMIN_LITERAL}, env_allowlist=[],
                                       allow_literal_keys=True)
    assert problems and "UNIROUTE_SECRET_KEY" in problems[0]
    placeholder = ModelSpec(name="p", router_cost=1.0,
                            litellm_params={"model": "openai/p", "api_key": secrets.TABLE_PLACEHOLDER})
    with pytest.raises(ValueError, match="masked placeholder"):
        ModelEntry.from_spec(placeholder)
