"""Every input gets a clear answer (issue 10, row 11): hostile bodies, names and numbers on /v1/feedback, the
admin API, the chat endpoint, config.yaml and the CLI are refused with a 4xx (a one-line error for the CLI),
never a 500, on SQLite AND PostgreSQL.

Each case here was a 500 (or was silently accepted) before: NUL characters reached PostgreSQL text columns,
``rpm`` beyond 32 bits overflowed ``api_keys.rpm_limit``, 1000-deep ``litellm_params`` overflowed the JSON
encoder, and a model name outside Latin-1 could not be sent in the ``x-uniroute-model`` header.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

from gateway.app import create_app
from gateway.cli.main import main as cli
from gateway.config import parse_config
from gateway.http.responses import header_value
from gateway.serving.interfaces import RequestRecord
from gateway.spec import MODEL_NAME_PATTERN, parse_spec
from gateway.store.engine import Store
from gateway.store.requestlog import record_to_row
from gateway.store.tables import ModelRow
from tests.storeutil import database

ADMIN = "sk-admin-inputs-test"
H = {"authorization": f"Bearer {ADMIN}"}
MODEL = {"name": "ok-model", "router_cost": 1.0,
         "litellm_params": {"model": "openai/ok", "api_base": "http://127.0.0.1:9/v1", "api_key": "x"}}
DEEP = b'{"request_id":' + b"[" * 5000 + b"]" * 5000 + b"}"


def _deep_model(n: int, name: str = "m") -> bytes:
    """A model body whose litellm_params nest ``n`` levels (as bytes: json.dumps itself overflows at ~1000)."""
    return (b'{"name": "%s", "router_cost": 1, "litellm_params": {"model": "openai/x", "extra": ' % name.encode()
            + b'{"a": ' * n + b"1" + b"}" * n + b"}}")


def _deep_params(n: int) -> dict[str, Any]:
    inner: Any = 1
    for _ in range(n):
        inner = {"a": inner}
    return {"model": "openai/x", "extra": inner}


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    with database(request.param, tmp_path) as url:
        cfg = parse_config({"auth": {"mode": "keys"}, "database_url": url, "models": [MODEL]}, base_dir=tmp_path)
        with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
            yield c


def _err(r: Any, status: int, needle: str = "") -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert needle in err["message"], err
    return err


def test_hostile_bodies_names_and_numbers_are_4xx(client: TestClient) -> None:
    r = client.post("/admin/keys", headers=H, json={"name": "alice", "lambda": 0.1})
    key = {"authorization": f"Bearer {r.json()['key']}"}

    # /v1/feedback: deep nesting, invalid UTF-8, huge numbers, a NUL in the request id (PostgreSQL: was a 500)
    for body in (DEEP, b'{"request_id": "\xff\xfe", "score": 1}', b'{"request_id": "r", "score": %d}' % 2**70,
                 b'{"request_id": "r", "score": 1e400}', b'{"request_id": "r", "score": NaN}', b"", b"[]"):
        _err(client.post("/v1/feedback", headers=key, content=body), 400)
    _err(client.post("/v1/feedback", headers=key, json={"request_id": "r\x00", "score": 1}), 400,
         "'request_id' is 1-128 characters from ASCII letters, digits and . _ : -")
    _err(client.post("/v1/feedback", headers=key, json={"request_id": "r", "score": 1, "source": "é"}), 400)

    # /admin/keys: rpm beyond the 32-bit column (PostgreSQL: was a 500), NUL in names and model lists
    _err(client.post("/admin/keys", headers=H, json={"name": "b", "lambda": 0.1, "rpm": 2**40}), 400,
         "rpm must be an integer in [1, 2147483647]")
    _err(client.post("/admin/keys", headers=H, content=b'{"name": "b", "lambda": 0.1, "rpm": %d}' % 2**70), 400)
    _err(client.post("/admin/keys", headers=H, json={"name": "b\x00", "lambda": 0.1}), 400, "invalid key name")
    _err(client.post("/admin/keys", headers=H, json={"name": "bé", "lambda": 0.1}), 400,
         "1-128 characters from ASCII letters, digits and . _ @ -")
    _err(client.post("/admin/keys", headers=H, json={"name": "b", "lambda": 0.1, "models": ["m\x00"]}), 400,
         "models: invalid model name")
    _err(client.post("/admin/keys", headers=H, content=b'{"name": "b", "lambda": 0.1, "budget_usd": 1e999}'), 400)
    for body in (DEEP, b'{"name": "\xff"}', b"{", b"null"):
        _err(client.post("/admin/keys", headers=H, content=body), 400)
    assert client.post("/admin/keys", headers=H, json={"name": "b", "lambda": 0.1, "rpm": 2**31 - 1,
                                                      "models": ["ok-model", "auto"]}).status_code == 201

    # /admin/models: Infinity, NUL and non-Latin-1 names, 1000-deep litellm_params (was a 500), absurd numbers
    bad: list[tuple[dict[str, Any] | bytes, str]] = [
        (b'{"name": "m", "router_cost": Infinity, "litellm_params": {"model": "openai/x"}}', "not valid JSON"),
        (b'{"name": "m", "router_cost": 1e400, "litellm_params": {"model": "openai/x"}}', "not valid JSON"),
        ({**MODEL, "name": "m\x00"}, "invalid model name"),
        ({**MODEL, "name": "模型"}, "an ASCII letter or digit, then ASCII letters, digits and . _ : / @ + -"),
        ({**MODEL, "name": "has space"}, "invalid model name"),
        (_deep_model(40), "nested deeper than 16 levels"),  # the spec's rule on litellm_params
        (_deep_model(1000), "limits.max_json_depth"),  # any body: refused while it arrives
        ({**MODEL, "name": "m", "litellm_params": {"model": "openai/x\x00"}}, "NUL characters are not allowed"),
        ({**MODEL, "name": "m", "timeout_s": 1e300}, "timeout_s"),
        ({**MODEL, "name": "m", "router_cost": 1e300}, "router_cost"),
        ({**MODEL, "name": "m", "input_cost_per_1m": 1e300}, "input_cost_per_1m"),
    ]
    for payload, needle in bad:
        kw: dict[str, Any] = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
        _err(client.post("/admin/models", headers=H, **kw), 400, needle)
        _err(client.patch("/admin/models/ok-model", headers=H, **kw), 400)
    for depth, says in ((40, "nested deeper than 16 levels"), (1000, "limits.max_json_depth")):
        deep_patch = (b'{"litellm_params": {"model": "openai/x", "extra": ' + b'{"a": ' * depth + b"1" + b"}" * (depth + 1)
                      + b"}")
        _err(client.patch("/admin/models/ok-model", headers=H, content=deep_patch), 400, says)
    _err(client.post("/admin/models/ok-model/profile", headers=H, content=b'{"concurrency": %d}' % 2**70), 400)
    for path in ("/admin/models", "/admin/models/ok-model/profile"):
        for body in (DEEP, b'{"name": "\xff"}'):
            _err(client.post(path, headers=H, content=body), 400)

    # names in paths no row can have (PostgreSQL refused to look up a NUL: was a 500)
    _err(client.get("/admin/keys/a%00b", headers=H), 404, "no API key named")
    _err(client.delete("/admin/keys/a%00b", headers=H), 404)
    for method, path in (("GET", "/admin/models/a%00b"), ("PATCH", "/admin/models/a%00b"),
                         ("DELETE", "/admin/models/a%00b"), ("POST", "/admin/models/a%00b/disable"),
                         ("POST", "/admin/models/a%00b/profile"), ("GET", "/admin/models/a%00b/profile"),
                         ("GET", "/admin/models/" + "x" * 300)):
        assert client.request(method, path, headers=H, json={}).status_code in (400, 404), (method, path)

    # a chat request naming a model with control characters is a 400 before anything is logged
    _err(client.post("/v1/chat/completions", headers=key,
                     json={"model": "m\x00", "messages": [{"role": "user", "content": "hi"}]}), 400, "model")
    _err(client.post("/v1/chat/completions", headers=key,
                     json={"model": "m" * 300, "messages": [{"role": "user", "content": "hi"}]}), 400, "model")

    assert client.get("/health/readiness").status_code == 200
    assert [m["name"] for m in client.get("/admin/models", headers=H).json()["data"]] == ["ok-model"]


def test_a_wrong_admin_key_is_told_so(client: TestClient) -> None:
    r = client.post("/admin/keys", headers=H, json={"name": "carol", "lambda": 0.1})
    client_key = r.json()["key"]
    err = _err(client.get("/admin/keys"), 401, "missing admin key: send 'Authorization: Bearer <the admin key>'")
    assert err["code"] == "missing_api_key"
    for wrong in ("sk-admin-wrong", "sk-ur-guessed", ADMIN + "x"):
        err = _err(client.get("/admin/keys", headers={"authorization": f"Bearer {wrong}"}), 401,
                   "invalid admin key")
        assert err["code"] == "invalid_admin_key" and err["type"] == "authentication_error"
    err = _err(client.get("/admin/models", headers={"authorization": f"Bearer {client_key}"}), 403,
               "needs the admin key")
    assert err["code"] == "admin_required"


def test_a_legacy_row_with_a_name_outside_the_set_is_left_out_but_removable(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A row written before names were validated (or around the API) is not served, and can still be removed."""
    monkeypatch.setenv("UNIROUTE_ADMIN_KEY", ADMIN)
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    cfg = parse_config({"auth": {"mode": "open"}, "database_url": url, "models": [MODEL]}, base_dir=tmp_path)
    with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
        store = Store(url)
        with store.session() as s:
            s.add(ModelRow(name="模型", litellm_params={"model": "openai/x"}, router_cost=1.0, enabled=True,
                           source="admin", version=1))
        store.dispose()
        assert "模型" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
        r = c.post("/v1/chat/completions", json={"model": "模型", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404
        assert c.delete("/admin/models/%E6%A8%A1%E5%9E%8B", headers=H).json()["deleted"] is True


class _Stub:
    """A chat service answering from a model whose name is not Latin-1 (one from before names were validated)."""

    def __init__(self) -> None:
        self.closed = False

    async def authenticate(self, ctx: Any) -> None:  # the handler asks before it reads the body
        return None

    async def complete(self, req: Any, ctx: Any) -> Any:
        from gateway.serving.service import ChatResult

        return ChatResult(body={"id": "x", "choices": []}, model="模型-α", cost_usd=0.001, attempts=1)

    async def stream(self, req: Any, ctx: Any) -> Any:
        from gateway.serving.service import ChatStream

        async def chunks() -> AsyncGenerator[dict[str, Any], None]:
            yield {"id": "x", "choices": []}

        async def finish() -> None:
            self.closed = True

        return ChatStream(model="模型-α", chunks=chunks(), _finish=finish)


def test_a_model_name_beyond_latin1_is_sent_percent_encoded(tmp_path: Path) -> None:
    """Was a 500 after the provider answered (non-streaming: charged and logged as 200; streaming: the
    reservation leaked). The header is now percent-encoded UTF-8, and a stream is always closed."""
    cfg = parse_config({"auth": {"mode": "open"}, "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
                        "models": [MODEL]}, base_dir=tmp_path)
    stub = _Stub()
    with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
        c.app.state.gateway.service = stub  # type: ignore[attr-defined]
        body = {"model": "anything", "messages": [{"role": "user", "content": "hi"}]}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.headers["x-uniroute-model"] == "%E6%A8%A1%E5%9E%8B-%CE%B1"
        r = c.post("/v1/chat/completions", json={**body, "stream": True})
        assert r.status_code == 200 and r.headers["x-uniroute-model"] == "%E6%A8%A1%E5%9E%8B-%CE%B1"
        assert r.text.endswith("data: [DONE]\n\n") and stub.closed
    assert header_value("gpt-4o-mini") == "gpt-4o-mini" and header_value("a\x00b") == "a%00b"


def test_request_log_rows_never_carry_a_nul() -> None:
    rec = RequestRecord(request_id="r", started_at=datetime.now(UTC), requested_model="m", stream=False,
                        prompt_text="a\x00b")
    assert record_to_row(rec, "id")["prompt_text"] == "a\ufffdb"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_request_log_writes_a_prompt_with_a_nul(kind: str, tmp_path: Path) -> None:
    """With ``database.store_prompts`` on, a prompt holding NUL was refused by PostgreSQL and its row dropped."""
    from gateway.store.requestlog import RequestLogWriter, _Item
    from gateway.store.tables import RequestRow

    with database(kind, tmp_path) as url:
        store = Store(url)
        store.upgrade()
        writer = RequestLogWriter(store)
        rec = RequestRecord(request_id="r-nul", started_at=datetime.now(UTC), requested_model="m", stream=False,
                            prompt_text="before\x00after", status_code=200)
        writer._write([_Item("row-nul", rec)])
        with store.session() as s:
            row = s.get(RequestRow, "row-nul")
            assert row is not None and row.prompt_text == "before\ufffdafter"
        store.dispose()


@pytest.mark.parametrize(("change", "needle"), [
    ({"name": "模型"}, "invalid model name"),
    ({"name": "a b"}, "invalid model name"),
    ({"router_cost": float("inf")}, "router_cost"),
    ({"timeout_s": float("nan")}, "timeout_s"),
    ({"litellm_params": {"model": "openai/x", "temperature": float("inf")}}, "numbers must be finite"),
    ({"litellm_params": _deep_params(40)}, "nested deeper than 16 levels"),
])
def test_config_refuses_what_the_api_refuses(tmp_path: Path, change: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_config({"database_url": f"sqlite:///{tmp_path / 'gw.db'}", "models": [{**MODEL, **change}]},
                     base_dir=tmp_path)
    assert needle in str(e.value)


def test_config_numbers_are_finite(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="finite number"):
        parse_config({"router": {"lambda_max": float("inf")}}, base_dir=tmp_path)
    cfg = tmp_path / "config.yaml"
    cfg.write_text("router:\n  default_lambda: .nan\n")
    with pytest.raises(ValueError, match="finite number"):
        parse_config(yaml.safe_load(cfg.read_text()), base_dir=tmp_path)


def test_model_names_of_the_shipped_dataset_and_common_providers_are_valid() -> None:
    names = [line.split(",")[0] for line in (Path(__file__).parent.parent / "data" / "mmlu_pro_27" /
                                             "models.csv").read_text().splitlines()[1:]]
    names += ["gpt-4o-mini", "openai/gpt-4o", "llama3.1:8b", "meta-llama/Llama-3-8b@v2", "claude-3.5+tools"]
    assert all(MODEL_NAME_PATTERN.fullmatch(n) for n in names)
    assert parse_spec({**MODEL, "name": "meta-llama/Llama-3-8b"}).name == "meta-llama/Llama-3-8b"


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(("args", "needle"), [
    (["--name", "k", "--lambda", "0.1", "--rpm", str(2**40)], "rpm must be an integer in [1, 2147483647]"),
    (["--name", "k", "--lambda", "0.1", "--rpm", "0"], "rpm must be an integer in [1, 2147483647]"),
    (["--name", "k", "--lambda", "0.1", "--budget", "inf"], "budget must be a number of USD >= 0"),
    (["--name", "k", "--lambda", "0.1", "--budget", "-1"], "budget must be a number of USD >= 0"),
    (["--name", "k é", "--lambda", "0.1"], "invalid key name"),
    (["--name", "k", "--lambda", "0.1", "--models", "ok,bad name"], "models: invalid model name 'bad name'"),
    (["--name", "k", "--lambda", "20"], "lambda must lie in [0, 10]"),
])
def test_cli_keys_create_refuses_what_the_config_forbids(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                        needle: str) -> None:
    monkeypatch.setenv("UNIROUTE_DATABASE_URL", f"sqlite:///{tmp_path / 'k.db'}")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"database_url": f"sqlite:///{tmp_path / 'k.db'}"}))
    assert cli(["keys", "create", *args, "--config", str(cfg)]) == 1
    assert needle in _one_error_line(capsys)


@pytest.mark.parametrize(("args", "needle"), [
    (["模型", "--litellm-model", "openai/x", "--router-cost", "1"], "invalid model name"),
    (["m", "--litellm-model", "openai/x", "--router-cost", "inf"], "router_cost"),
    (["m", "--litellm-model", "openai/x", "--router-cost", "1", "--timeout-s", "1e12"], "timeout_s"),
    (["m", "--litellm-model", "openai/x", "--router-cost", "1", "--input-cost-per-1m", "nan"], "input_cost_per_1m"),
    (["m", "--litellm-params", json.dumps(_deep_params(30)), "--router-cost", "1"], "nested deeper than 16"),
])
def test_cli_models_add_refuses_what_the_api_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    args: list[str], needle: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"database_url": f"sqlite:///{tmp_path / 'm.db'}"}))
    assert cli(["models", "add", *args, "--config", str(cfg)]) == 1
    assert needle in _one_error_line(capsys)
