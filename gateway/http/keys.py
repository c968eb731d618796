"""HTTP handlers of the key-facing endpoints: ``GET /v1/usage`` and the admin API ``/admin/keys``.

Thin: parse, call :mod:`gateway.access.auth` / :mod:`gateway.access.budget` / :mod:`gateway.store.keys`,
answer with :func:`~gateway.http.responses.json_response`. Errors are raised as
:class:`~gateway.errors.GatewayError` and shaped by the handler registered in ``app.py``. The admin
API needs ``Authorization: Bearer $UNIROUTE_ADMIN_KEY`` (401 without a valid key, 403 for a
client key; :func:`gateway.http.auth.require_admin`).

- ``GET  /v1/usage``              the caller's λ range, budget, spend, remaining budget, period usage
- ``GET  /admin/keys``            every key (never the key itself or its hash)
- ``POST /admin/keys``            ``{"name", "lambda", "budget_usd"?, "period"?, "budget_policy"?, "lambda_min"?, "lambda_max"?,
                                  "rpm"?, "models"?, "trusted"?}`` → 201 with ``"key"``: the raw key, shown once.
                                  λ and the key's range must lie in the config's
                                  ``router.lambda_min..lambda_max``, which is also the range's default
- ``GET  /admin/keys/{name}``     one key
- ``PATCH /admin/keys/{name}``    ``{"trusted": bool}``: whether its feedback counts with
                                  ``profiling.feedback_from: trusted``; ``{"budget_policy": "block"|"pace"}``:
                                  whether its λ is paced to its budget (docs/PACING.md)
- ``DELETE /admin/keys/{name}``   revoke it (refused by every replica from its next request)
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from gateway.access.auth import check_budget_policy, create_key, key_summary
from gateway.errors import InvalidRequestError, validation_message
from gateway.http.auth import accounting, authenticate, require_admin
from gateway.http.responses import json_body, json_response, path_name
from gateway.store import keys as key_sql

KEY_FIELDS = "name, lambda, budget_usd, period, budget_policy, lambda_min, lambda_max, rpm, models, trusted"


async def usage(request: Request) -> Response:
    principal = await authenticate(request)
    return json_response(await accounting(request).budget.usage(principal))


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    lam: float = Field(alias="lambda")
    budget_usd: float | None = None
    period: str = "month"
    budget_policy: str = "block"
    lambda_min: float | None = None
    lambda_max: float | None = None
    rpm: int | None = None
    models: list[str] | None = None
    trusted: StrictBool = False


class KeyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trusted: StrictBool | None = None
    budget_policy: str | None = None


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
        budget_policy=body.budget_policy,
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
        raise InvalidRequestError(validation_message(exc, "key update", "trusted, budget_policy")) from None
    if body.trusted is None and body.budget_policy is None:
        raise InvalidRequestError("a key update needs 'trusted' or 'budget_policy'", param="trusted")
    name = path_name(request, "API key", 128)
    row = await asyncio.to_thread(key_sql.get_key, acc.store, name)
    if body.budget_policy is not None:
        check_budget_policy(body.budget_policy, row.budget_usd)
        row = await asyncio.to_thread(key_sql.set_budget_policy, acc.store, name, body.budget_policy)
    if body.trusted is not None:
        row = await asyncio.to_thread(key_sql.set_trusted, acc.store, name, body.trusted)
    if acc.key_authenticator is not None:  # this replica serves the change from the next request
        acc.key_authenticator.invalidate()
    return json_response(key_summary(row))


async def revoke_key_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    row = await asyncio.to_thread(key_sql.revoke_key, acc.store, path_name(request, "API key", 128))
    if acc.key_authenticator is not None:
        acc.key_authenticator.invalidate()
    return json_response(key_summary(row))
