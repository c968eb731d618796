"""API keys: format, hashing (never stored raw), the cached authenticator, revocation, admin guard, CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.access.auth import (
    AdminGuard,
    KeyAuthenticator,
    bearer_token,
    create_key,
    generate_key,
    hash_key,
    key_summary,
)
from gateway.access.budget import SqlBudgetGuard
from gateway.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    error_body,
)
from gateway.serving.interfaces import Principal
from gateway.store.engine import Store
from gateway.store.keys import list_keys, revoke_key
from gateway.store.tables import ApiKey
from tests.procs import python
from tests.storeutil import REPO_ROOT


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'u.db'}")
    s.upgrade()
    yield s
    s.dispose()


def test_key_format_and_hash() -> None:
    a, b = generate_key(), generate_key()
    assert a != b and a.startswith("sk-ur-") and len(a) == 6 + 43
    assert all(c.isalnum() or c in "-_" for c in a[6:])
    assert hash_key(a) == hash_key(a) and len(hash_key(a)) == 64 and hash_key(a) != hash_key(b)


def test_bearer_parsing() -> None:
    assert bearer_token("Bearer sk-ur-x") == "sk-ur-x"
    assert bearer_token("bearer   sk-ur-x ") == "sk-ur-x"
    with pytest.raises(AuthenticationError, match="missing API key") as e:
        bearer_token(None)
    assert e.value.code == "missing_api_key"
    for bad in ("Basic abc", "Bearer", "sk-ur-x"):
        with pytest.raises(AuthenticationError, match="expected 'Bearer <key>'"):
            bearer_token(bad)


def test_raw_key_is_never_stored(store: Store, tmp_path: Path) -> None:
    raw, row = create_key(store, "alice", default_lambda=0.2, budget_usd=5.0, rpm_limit=10, models=["a", "b"])
    assert row.key_hash == hash_key(raw) and row.key_prefix == raw[:10]
    with store.engine.connect() as conn:
        values = [str(v) for r in conn.execute(sa.select(ApiKey.__table__)) for v in r]
    assert not any(raw in v or raw[10:] in v for v in values)
    store.engine.dispose()  # checkpoint the WAL so the file holds everything
    data = b"".join(p.read_bytes() for p in tmp_path.glob("u.db*") if p.is_file())
    assert raw[10:].encode() not in data
    assert "key_hash" not in key_summary(row) and raw not in str(key_summary(row))


def test_create_key_validation(store: Store) -> None:
    create_key(store, "alice", default_lambda=0.2)
    with pytest.raises(ConflictError, match="'alice' already exists"):
        create_key(store, "alice", default_lambda=0.2)
    with pytest.raises(InvalidRequestError, match=r"need lambda_min <= lambda <= lambda_max, got 0.5 <= 0.2 <= 1"):
        create_key(store, "b", default_lambda=0.2, lambda_min=0.5, lambda_max=1.0)
    with pytest.raises(InvalidRequestError, match="unknown budget period 'week'; valid: day, month"):
        create_key(store, "b", default_lambda=0.2, period="week")
    with pytest.raises(InvalidRequestError, match="budget must be"):
        create_key(store, "b", default_lambda=0.2, budget_usd=-1)
    with pytest.raises(InvalidRequestError, match="invalid key name"):
        create_key(store, "has space", default_lambda=0.2)
    with pytest.raises(NotFoundError, match="no API key named 'nobody'"):
        revoke_key(store, "nobody")


def test_create_key_stays_in_the_configs_lambda_range(store: Store) -> None:
    """A key's λ and λ range lie in router.lambda_min..lambda_max; the range defaults to it (no silent widening)."""
    _, row = create_key(store, "a", default_lambda=0.2, lambda_range=(0.1, 2.0))
    assert (row.lambda_min, row.lambda_max) == (0.1, 2.0)
    _, row = create_key(store, "b", default_lambda=0.2)  # no config: router's defaults
    assert (row.lambda_min, row.lambda_max) == (0.0, 10.0)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"default_lambda": 20.0}, "lambda"), ({"default_lambda": 0.2, "lambda_max": 11.0}, "lambda_max"),
        ({"default_lambda": 0.2, "lambda_min": 0.05}, "lambda_min")]
    for kw, label in cases:
        with pytest.raises(InvalidRequestError, match=rf"^{label} must lie in \[0.1, 10\], the λ range the config "
                                                      r"allows \(router.lambda_min, router.lambda_max\)") as e:
            create_key(store, "c", lambda_range=(0.1, 10.0), **kw)
        assert e.value.param == label
    assert [r.name for r in list_keys(store)] == ["a", "b"]


async def test_authenticate(store: Store) -> None:
    raw, _ = create_key(store, "alice", default_lambda=0.2, lambda_min=0.1, lambda_max=2.0, budget_usd=5.0,
                        period="day", rpm_limit=10, models=["a", "b"])
    auth = KeyAuthenticator(store)
    p = await auth.authenticate(f"Bearer {raw}")
    assert (p.key_name, p.default_lambda, p.lambda_min, p.lambda_max) == ("alice", 0.2, 0.1, 2.0)
    assert (p.budget_usd, p.budget_period, p.rpm_limit, p.allowed_models) == (5.0, "day", 10, frozenset({"a", "b"}))
    assert p.metric_label == "alice" and raw not in repr(p)
    for header in (None, "Bearer sk-ur-nope", f"Bearer {raw}x"):
        with pytest.raises(AuthenticationError) as e:
            await auth.authenticate(header)
        status, body, _ = error_body(e.value)
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert "sk-ur-nope" not in body["error"]["message"] and raw not in body["error"]["message"]


async def test_revocation_within_cache_ttl_and_at_once_on_reserve(store: Store) -> None:
    raw, _ = create_key(store, "alice", default_lambda=0.2, budget_usd=5.0)
    replica_a = KeyAuthenticator(store, cache_ttl_s=0.5)
    replica_b = KeyAuthenticator(store, cache_ttl_s=0.5)
    guard = SqlBudgetGuard(store)
    pa = await replica_a.authenticate(f"Bearer {raw}")
    await replica_b.authenticate(f"Bearer {raw}")
    revoke_key(store, "alice")
    # replica B's cache still holds the key, but the per-request reservation refuses it at once
    pb = await replica_b.authenticate(f"Bearer {raw}")
    with pytest.raises(AuthenticationError, match="revoked"):
        await guard.reserve(pb, 0.01)
    with pytest.raises(AuthenticationError, match="revoked"):
        await guard.reserve(pa, 0.01)
    await asyncio.sleep(0.6)  # after the TTL every replica's authenticator refuses it too
    for auth in (replica_a, replica_b):
        with pytest.raises(AuthenticationError, match=r"API key 'alice' \(sk-ur-.{4}\.\.\.\) was revoked") as e:
            await auth.authenticate(f"Bearer {raw}")
        assert e.value.code == "revoked_api_key"


async def test_cache_avoids_database_and_is_bounded(store: Store) -> None:
    raw, _ = create_key(store, "alice", default_lambda=0.2)
    auth = KeyAuthenticator(store, cache_ttl_s=60, max_entries=3)
    calls = 0
    orig = auth._lookup

    def counting(digest: str) -> Principal | AuthenticationError:
        nonlocal calls
        calls += 1
        return orig(digest)

    auth._lookup = counting  # type: ignore[method-assign]
    for _ in range(5):
        await auth.authenticate(f"Bearer {raw}")
    assert calls == 1
    for i in range(5):
        with pytest.raises(AuthenticationError):
            await auth.authenticate(f"Bearer sk-ur-guess{i}")
    assert len(auth._cache) == 3


async def test_admin_guard(store: Store) -> None:
    raw, _ = create_key(store, "alice", default_lambda=0.2)
    guard = AdminGuard("sk-admin-secret", KeyAuthenticator(store))
    await guard.check("Bearer sk-admin-secret")
    with pytest.raises(AuthenticationError):
        await guard.check(None)
    with pytest.raises(AuthenticationError):
        await guard.check("Bearer wrong")
    with pytest.raises(PermissionDeniedError, match="needs the admin key") as e:
        await guard.check(f"Bearer {raw}")
    assert error_body(e.value)[0] == 403
    disabled = AdminGuard("", KeyAuthenticator(store))
    with pytest.raises(PermissionDeniedError, match="set UNIROUTE_ADMIN_KEY"):
        await disabled.check(f"Bearer {raw}")
    no_keys = AdminGuard("sk-admin-secret")
    with pytest.raises(AuthenticationError):
        await no_keys.check("Bearer wrong")


def test_cli_keys(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "UNIROUTE_DATABASE_URL": f"sqlite:///{db}"}

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        out = python(["-m", "gateway.cli.main", "keys", *args], env=env, timeout=60)
        assert (out.returncode == 0) == ok, out.stderr
        return out

    out = run("create", "--name", "alice", "--lambda", "0.3", "--budget", "2.5", "--period", "day", "--rpm", "5",
              "--models", "a,b")
    raw = out.stdout.strip()
    assert raw.startswith("sk-ur-") and "shown only once" in out.stderr and raw not in out.stderr
    listing = run("list").stdout
    assert "alice" in listing and raw[:10] in listing and raw[10:] not in listing
    assert "already exists" in run("create", "--name", "alice", "--lambda", "0.3", ok=False).stderr
    assert "revoked key 'alice'" in run("revoke", "alice").stdout
    assert "alice" not in run("list").stdout and "alice" in run("list", "--all").stdout
    store = Store(f"sqlite:///{db}")
    [row] = list_keys(store)
    assert row.key_hash == hash_key(raw) and row.revoked_at is not None and row.budget_period == "day"
    store.dispose()


def test_cli_keys_refuses_what_the_config_forbids_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # in process (test_cli_keys above runs the same command as a real subprocess): main() returns the exit status
    from gateway.cli.main import main as cli

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"database_url: sqlite:///{tmp_path / 'k.db'}\nrouter:\n  lambda_min: 0.0\n  lambda_max: 10.0\n")
    monkeypatch.delenv("UNIROUTE_DATABASE_URL", raising=False)
    monkeypatch.delenv("UNIROUTE_DEBUG", raising=False)

    def run(*args: str, config: Path = cfg) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli(["keys", *args, "--config", str(config)])
        out = capsys.readouterr()
        return code, out.out, out.err

    for args, needle in ((("--lambda", "20"), "lambda must lie in [0, 10]"),
                         (("--lambda", "1", "--lambda-max", "11"), "lambda_max must lie in [0, 10]"),
                         (("--lambda", "1", "--budget", "-1"), "budget must be a number of USD >= 0")):
        code, out, err = run("create", "--name", "alice", *args)
        assert code == 1 and out == "", err
        assert err.startswith(f"error: {needle}") and err.count("\n") == 1, err
    code, out, err = run("create", "--name", "alice", "--lambda", "1")
    assert code == 0 and "range 0..10" in err
    assert run("revoke", "nobody")[::2] == (1, "error: no API key named 'nobody'\n")
    (tmp_path / "bad.yaml").write_text("router:\n  lambda_max: -1\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = run("create", "--name", "b", "--lambda", "1", config=tmp_path / "bad.yaml")
    assert code == 1 and err.count("\n") == 1, err
    assert "router.lambda_max: Input should be greater than or equal to 0" in err
