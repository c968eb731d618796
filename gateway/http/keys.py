"""HTTP handlers of the key-facing endpoints: ``GET /v1/usage`` and the admin API ``/admin/keys``.

Thin, like ``endpoints.py``: parse, call :mod:`gateway.access.auth` / :mod:`gateway.access.budget` /
:mod:`gateway.store.keys`, shape
the response; every error goes through :func:`gateway.errors.error_body`. The admin API
needs ``Authorization: Bearer $UNIROUTE_ADMIN_KEY`` (401 without a valid key, 403 for a
client key).

- ``GET  /v1/usage``              the caller's λ range, budget, spend, remaining budget, period usage
- ``GET  /admin/keys``            every key (never the key itself or its hash)
- ``POST /admin/keys``            ``{"name", "lambda", "budget_usd"?, "period"?, "lambda_min"?, "lambda_max"?,
                                  "rpm"?, "models"?}`` → 201 with ``"key"``: the raw key, shown once. λ and
                                  the key's range must lie in the config's ``router.lambda_min..lambda_max``,
                                  which is also the range's default
- ``GET  /admin/keys/{name}``     one key
- ``DELETE /admin/keys/{name}``   revoke it (refused by every replica from its next request)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from gateway.access.accounting import Accounting
from gateway.access.auth import create_key, key_summary
from gateway.errors import InvalidRequestError, error_body
from gateway.store import keys as key_sql


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _error(exc: BaseException) -> Response:
    status, body, headers = error_body(exc)
    return _json(body, status, headers or None)


def _accounting(request: Request) -> Accounting:
    acc: Accounting = request.app.state.accounting
    return acc


async def usage(request: Request) -> Response:
    acc = _accounting(request)
    try:
        principal = await acc.authenticator.authenticate(request.headers.get("authorization"))
        return _json(await acc.budget.usage(principal))
    except Exception as exc:
        return _error(exc)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    lam: float = Field(alias="lambda")
    budget_usd: float | None = None
    period: str = "month"
    lambda_min: float | None = None
    lambda_max: float | None = None
    rpm: int | None = None
    models: list[str] | None = None


async def _admin(request: Request) -> Accounting:
    acc = _accounting(request)
    await acc.admin.check(request.headers.get("authorization"))
    return acc


async def list_keys_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        include_revoked = request.query_params.get("all", "true").lower() not in ("0", "false", "no")
        rows = await asyncio.to_thread(key_sql.list_keys, acc.store, include_revoked=include_revoked)
        return _json({"object": "list", "data": [key_summary(r) for r in rows]})
    except Exception as exc:
        return _error(exc)


async def create_key_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        try:
            body = KeyCreate.model_validate(json.loads(await request.body() or b"null"))
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
        except ValidationError as exc:
            parts = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
            raise InvalidRequestError("invalid key request: " + "; ".join(parts)
                                      + " (fields: name, lambda, budget_usd, period, lambda_min, lambda_max, rpm, "
                                      "models)") from None
        raw, row = await asyncio.to_thread(
            create_key, acc.store, body.name, default_lambda=body.lam, budget_usd=body.budget_usd,
            period=body.period, lambda_min=body.lambda_min, lambda_max=body.lambda_max, rpm_limit=body.rpm,
            models=body.models, lambda_range=acc.settings.lambda_range,
        )
        return _json({**key_summary(row), "key": raw}, 201, {"cache-control": "no-store"})
    except Exception as exc:
        return _error(exc)


async def get_key_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        row = await asyncio.to_thread(key_sql.get_key, acc.store, request.path_params["name"])
        return _json(key_summary(row))
    except Exception as exc:
        return _error(exc)


async def revoke_key_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        row = await asyncio.to_thread(key_sql.revoke_key, acc.store, request.path_params["name"])
        if acc.key_authenticator is not None:
            acc.key_authenticator.invalidate()
        return _json(key_summary(row))
    except Exception as exc:
        return _error(exc)
