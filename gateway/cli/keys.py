"""``uniroute keys``: create, list, revoke and trust API keys.

``keys create`` refuses what the config forbids: the key's λ and its λ range must lie in the
config's ``router.lambda_min..router.lambda_max`` (the range also defaults to it). Failures
print one line (:func:`gateway.cli.main.main`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from gateway.access.auth import check_budget_policy, create_key, key_summary
from gateway.cli.db import run
from gateway.config import ConfigError, RouterConfig, default_config_path, expand_vars
from gateway.store import keys as key_sql
from gateway.store.engine import Store


def router_config(path: str | os.PathLike[str] | None) -> RouterConfig:
    """The config's ``router`` section alone (defaults when no config file exists and none was named).

    Only that section is read, as :func:`gateway.store.engine.database_url_from_config` reads only the
    database URL, so key commands work even when the rest of the config refers to absent things.
    """
    import yaml

    cfg_path = Path(path) if path is not None else default_config_path()
    if not cfg_path.is_file():
        if path is not None:
            raise ConfigError(f"config file {str(cfg_path)!r} not found")
        return RouterConfig()
    try:
        data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{cfg_path}: not valid YAML ({exc})") from None
    section = data.get("router") if isinstance(data, dict) else None
    try:
        return RouterConfig.model_validate(expand_vars(section or {}, "router"))
    except ValidationError as exc:
        parts = [f"router{''.join(f'.{x}' for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{cfg_path}: invalid config: " + "; ".join(parts)) from None


def keys_create_command(args: argparse.Namespace) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None

    def create(store: Store) -> None:
        router = router_config(getattr(args, "config", None))
        raw, row = create_key(store, args.name, default_lambda=args.lam, budget_usd=args.budget, period=args.period,
                              lambda_min=args.lambda_min, lambda_max=args.lambda_max, rpm_limit=args.rpm,
                              models=models, lambda_range=(router.lambda_min, router.lambda_max),
                              trusted=args.trusted, budget_policy=args.budget_policy)
        budget = f"${row.budget_usd:g}/{row.budget_period}" if row.budget_usd is not None else "no budget cap"
        print(f"created key {row.name!r}: lambda={row.default_lambda:g} (range {row.lambda_min:g}..{row.lambda_max:g}), "
              f"{budget}{', paced' if row.budget_policy == 'pace' else ''}, rpm={row.rpm_limit or 'unlimited'}"
              f"{', trusted' if row.trusted else ''}", file=sys.stderr)
        print("the key is shown only once; store it now:", file=sys.stderr)
        print(raw)

    return run(args, create, migrate=True)


def keys_list_command(args: argparse.Namespace) -> int:
    def show(store: Store) -> None:
        rows = key_sql.list_keys(store, include_revoked=args.all)
        if args.json:
            print(json.dumps([key_summary(r) for r in rows], indent=2))
            return
        print(f"{'NAME':<20} {'PREFIX':<12} {'LAMBDA':>7} {'BUDGET':>14} {'SPENT':>10} {'RPM':>6}  STATUS")
        for r in rows:
            budget = f"{r.budget_usd:.2f}/{r.budget_period}" if r.budget_usd is not None else "-"
            status = f"revoked {r.revoked_at:%Y-%m-%d}" if r.revoked_at else "active"
            status += ", trusted" if r.trusted else ""
            status += ", paced" if r.budget_policy == "pace" else ""
            print(f"{r.name:<20} {r.key_prefix:<12} {r.default_lambda:>7g} {budget:>14} {r.spend_usd:>10.4f} "
                  f"{r.rpm_limit or '-':>6}  {status}")

    return run(args, show, migrate=True)


def keys_trust_command(args: argparse.Namespace) -> int:
    def trust(store: Store) -> None:
        row = key_sql.set_trusted(store, args.name, not args.off)
        print(f"key {row.name!r} ({row.key_prefix}...) is {'trusted' if row.trusted else 'not trusted'}")

    return run(args, trust, migrate=True)


def keys_policy_command(args: argparse.Namespace) -> int:
    def set_policy(store: Store) -> None:
        row = key_sql.get_key(store, args.name)
        check_budget_policy(args.policy, row.budget_usd)
        row = key_sql.set_budget_policy(store, args.name, args.policy)
        print(f"key {row.name!r} ({row.key_prefix}...): budget policy {row.budget_policy}")

    return run(args, set_policy, migrate=True)


def keys_revoke_command(args: argparse.Namespace) -> int:
    def revoke(store: Store) -> None:
        row = key_sql.revoke_key(store, args.name)
        print(f"revoked key {row.name!r} ({row.key_prefix}...) at {row.revoked_at:%Y-%m-%dT%H:%M:%SZ}")

    return run(args, revoke, migrate=True)
