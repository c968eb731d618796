"""HTTP handlers of the key-facing endpoints: ``GET /v1/usage`` and the admin API ``/admin/keys``.

Thin: parse, call :mod:`gateway.access.auth` / :mod:`gateway.access.budget` / :mod:`gateway.store.keys`,
answer with :func:`~gateway.http.responses.json_response`. Errors are raised as
:class:`~gateway.errors.GatewayError` and shaped by the handler registered in ``app.py``. The admin
API needs ``Authorization: Bearer $UNIROUTE_ADMIN_KEY`` (401 without a valid key, 403 for a
client key; :func:`gateway.http.auth.require_admin`).

- ``GET  /v1/usage``              the caller's λ range, budget, spend, remaining budget, period usage
- ``GET  /admin/keys``            every key (never the key itself or its hash)
- ``POST /admin/keys``            ``{"name", "lambda", "budget_usd"?, "period"?, "lambda_min"?, "lambda_max"?,
                                  "rpm"?, "models"?, "trusted"?}`` → 201 with ``"key"``: the raw key, shown once.
                                  λ and the key's range must lie in the config's
                                  ``router.lambda_min..lambda_max``, which is also the range's default
- ``GET  /admin/keys/{name}``     one key
- ``PATCH /admin/keys/{name}``    ``{"trusted": bool}``: whether its feedback counts with
                                  ``profiling.feedback_from: trusted``
- ``DELETE /admin/keys/{name}``   revoke it (refused by every replica from its next request)
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from gateway.access.auth import create_key, key_summary
from gateway.errors import InvalidRequestError, validation_message
from gateway.http.auth import accounting, authenticate, require_admin
from gateway.http.responses import json_body, json_response, path_name
from gateway.store import keys as key_sql

KEY_FIELDS = "name, lambda, budget_usd, period, lambda_min, lambda_max, rpm, models, trusted"


async def usage(request: Request) -> Response:
    principal = await authenticate(request)
    return json_response(await accounting(request).budget.usage(principal))


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
    trusted: StrictBool = False


class KeyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trusted: StrictBool


async def list_keys_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    include_revoked = request.query_params.get("all", "true").lower() not in ("0", "false", "no")
    rows = await asyncio.to_thread(key_sql.list_keys, acc.store, include_revoked=include_revoked)
    return json_response({"object": "list", "data": [key_summary(r) for r in rows]})


async def create_key_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    try:
        body = KeyCreate.model_validate(await json_body(request))
    except ValidationError as exc:
        raise InvalidRequestError(validation_message(exc, "key request", KEY_FIELDS)) from None
    raw, row = await asyncio.to_thread(
        create_key, acc.store, body.name, default_lambda=body.lam, budget_usd=body.budget_usd,
        period=body.period, lambda_min=body.lambda_min, lambda_max=body.lambda_max, rpm_limit=body.rpm,
        models=body.models, lambda_range=acc.settings.lambda_range, trusted=body.trusted,
    )
    return json_response({**key_summary(row), "key": raw}, 201, {"cache-control": "no-store"})


async def get_key_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    row = await asyncio.to_thread(key_sql.get_key, acc.store, path_name(request, "API key", 128))
    return json_response(key_summary(row))


async def update_key_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    try:
        body = KeyUpdate.model_validate(await json_body(request))
    except ValidationError as exc:
        raise InvalidRequestError(validation_message(exc, "key update", "trusted")) from None
    row = await asyncio.to_thread(key_sql.set_trusted, acc.store, request.path_params["name"], body.trusted)
    return json_response(key_summary(row))


async def revoke_key_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    row = await asyncio.to_thread(key_sql.revoke_key, acc.store, path_name(request, "API key", 128))
    if acc.key_authenticator is not None:
        acc.key_authenticator.invalidate()
    return json_response(key_summary(row))
