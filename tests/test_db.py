"""Schema and migrations: upgrade/downgrade on SQLite and PostgreSQL, models == migrations."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gateway.store.engine import Store
from gateway.store.tables import ApiKey, Base, RequestRow
from tests.procs import python
from tests.storeutil import REPO_ROOT, store_fixture

TABLES = {"api_keys", "models", "model_profiles", "requests", "feedback"}


store = store_fixture(migrate=False)


def _tables(store: Store) -> set[str]:
    return set(sa.inspect(store.engine).get_table_names())


def test_upgrade_downgrade_upgrade(store: Store) -> None:
    assert store.current_revision() is None
    store.upgrade()
    assert store.current_revision() == Store.head_revision()
    assert _tables(store) >= TABLES
    store.upgrade()  # idempotent
    store.downgrade("base")
    assert store.current_revision() is None
    assert not (TABLES & _tables(store))
    store.upgrade()
    assert _tables(store) >= TABLES


def test_models_and_migrations_agree(store: Store) -> None:
    """The equivalent of `alembic check`: autogenerate finds nothing to do after upgrading."""
    store.upgrade()
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models and migrations disagree; write a migration for: {diff}"


def test_times_come_back_aware_utc(store: Store) -> None:
    store.upgrade()
    t = datetime(2026, 3, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    with store.session() as s:
        s.add(ApiKey(name="k", key_hash="0" * 64, key_prefix="sk-ur-0000", default_lambda=0.1, period_start=t))
        s.add(RequestRow(id="r1", request_id="req-1", requested_model="auto", status_code=200, stream=False, started_at=t,
                         candidates=[{"model": "a", "objective": 0.5}], lam=0.3))
    with store.sessions() as s:
        key = s.scalar(sa.select(ApiKey))
        row = s.get(RequestRow, "r1")
    assert key is not None and row is not None
    assert key.period_start == t and key.period_start.tzinfo is not None
    assert key.period_start.utcoffset() == timedelta(0)
    assert row.candidates == [{"model": "a", "objective": 0.5}] and row.lam == 0.3
    with pytest.raises(sa.exc.StatementError, match="naive datetime"), store.session() as s:
        s.add(RequestRow(id="r2", request_id="req-2", requested_model="x", status_code=200, stream=False, started_at=datetime(2026, 1, 1)))


def test_sqlite_pragmas(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'sub' / 'dir' / 'u.db'}")  # folder created
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(sa.text("PRAGMA busy_timeout")).scalar() == 30000
    assert store.ping()
    store.dispose()


def test_ping_false_when_unreachable() -> None:
    store = Store("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_timeout_s=1)
    assert store.ping() is False
    store.dispose()


def test_unsupported_url() -> None:
    with pytest.raises(ValueError, match="unsupported database URL 'mysql://u:\\*\\*\\*@h/db'"):
        Store("mysql://u:secret@h/db")


def test_cli_db_commands(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("database_url: sqlite:///var/test.db\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("UNIROUTE_DATABASE_URL", None)

    def run(*args: str) -> str:
        out = python(["-m", "gateway.cli.main", "db", *args, "--config", str(cfg)], cwd=tmp_path, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "none (empty database)" in run("current")
    assert f"at revision {Store.head_revision()}" in run("upgrade")
    assert (tmp_path / "var" / "test.db").is_file()  # relative to the config's folder
    assert "up to date" in run("current")
    assert "base (empty)" in run("downgrade", "base")


def test_plain_alembic_command_works_from_repo_root(tmp_path: Path) -> None:
    env = {**os.environ, "UNIROUTE_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}"}
    alembic = Path(sys.executable).with_name("alembic")
    cmd = [str(alembic)] if alembic.exists() else [sys.executable, "-m", "alembic"]
    out = subprocess.run([*cmd, "upgrade", "head"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*cmd, "check"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_db_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    # in process (test_cli_db_commands above runs `uniroute db` as a real subprocess)
    from gateway.cli.main import main as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("UNIROUTE_DEBUG", raising=False)
    default_url = f"sqlite:///{tmp_path / 'e.db'}"

    def run(*args: str, url: str | None = default_url) -> tuple[int, str]:
        if url is None:
            monkeypatch.delenv("UNIROUTE_DATABASE_URL", raising=False)
        else:
            monkeypatch.setenv("UNIROUTE_DATABASE_URL", url)
        capsys.readouterr()
        code = cli(["db", *args])
        return code, capsys.readouterr().err

    for (code, err), needle in ((run("downgrade", "nonexistent"), "error: Can't locate revision identified by 'nonexistent'"),
                                (run("current", "--config", "missing.yaml", url=None),
                                 "error: config file 'missing.yaml' not found"),
                                (run("current", url="mysql://u:secret@h/db"),
                                 "error: unsupported database URL 'mysql://u:***@h/db'")):
        assert code == 1 and err.startswith(needle), err
        assert err.count("\n") == 1 and "Traceback" not in err and "secret" not in err
