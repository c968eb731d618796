"""HTTP handlers of the model admin API (admin key, as ``/admin/keys``).

- ``GET    /admin/models``                   every model, with its active profile
- ``POST   /admin/models``                   ``{name, litellm_params, input_cost_per_1m?, output_cost_per_1m?,
                                             router_cost, timeout_s?, connect_timeout_s?,
                                             first_token_timeout_s?, routable?}`` → 201 (409 if it exists)
- ``GET    /admin/models/{name}``            one model, its active profile and profile history
- ``PATCH  /admin/models/{name}``            change any of those fields (and ``enabled``)
- ``DELETE /admin/models/{name}``            remove it
- ``POST   /admin/models/{name}/disable``    stop serving it (kept in the table)
- ``POST   /admin/models/{name}/profile``    ``{grader?, concurrency?, allow_partial?}`` → 202 with the job id
- ``GET    /admin/models/{name}/profile``    the job's progress and report
- ``POST   /admin/reprofile``                one re-profiling pass now (takes the lease) → its report
- ``GET    /admin/reprofile/last``           the last pass's report and drift table

Unknown names → 404 listing the known ones. Changes reach every replica at its next poll.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import InvalidRequestError, NotFoundError, ServiceUnavailableError
from gateway.http.keys import _admin, _error, _json
from gateway.store import models as catalog
from gateway.store import profiling as profiling_sql


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}", code="invalid_json") from None


def _key(request: Request) -> str | None:
    key: str | None = getattr(request.app.state, "profile_key", None)
    return key


async def list_models_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        key = _key(request)

        def load() -> list[dict[str, Any]]:
            rows = catalog.list_models(acc.store)
            profiles = {}
            if key is not None:
                profiles = {r.name: catalog.active_profile_row(acc.store, r.name, key) for r in rows}
            return [catalog.model_summary(r, profiles.get(r.name)) for r in rows]

        return _json({"object": "list", "data": await asyncio.to_thread(load)})
    except Exception as exc:
        return _error(exc)


async def add_model_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        spec = catalog.parse_spec(await _body(request))
        row = await asyncio.to_thread(catalog.add_model, acc.store, spec)
        return _json(catalog.model_summary(row), 201)
    except Exception as exc:
        return _error(exc)


async def get_model_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        name, key = request.path_params["name"], _key(request)

        def load() -> dict[str, Any]:
            row = catalog.get_model(acc.store, name)
            out = catalog.model_summary(row, catalog.active_profile_row(acc.store, name, key))
            out["profile_history"] = [catalog.profile_summary(p) for p in catalog.profile_history(acc.store, name)]
            return out

        return _json(await asyncio.to_thread(load))
    except Exception as exc:
        return _error(exc)


async def update_model_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        patch = catalog.parse_patch(await _body(request))
        row = await asyncio.to_thread(catalog.update_model, acc.store, request.path_params["name"], patch)
        return _json(catalog.model_summary(row))
    except Exception as exc:
        return _error(exc)


async def remove_model_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        row = await asyncio.to_thread(catalog.remove_model, acc.store, request.path_params["name"])
        return _json({"object": "model", "name": row.name, "deleted": True})
    except Exception as exc:
        return _error(exc)


async def disable_model_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        row = await asyncio.to_thread(catalog.set_enabled, acc.store, request.path_params["name"], False)
        return _json(catalog.model_summary(row))
    except Exception as exc:
        return _error(exc)


class ProfileStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: str | None = None
    concurrency: int | None = Field(default=None, ge=1, le=512)
    allow_partial: bool = False


async def start_profile_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        name = request.path_params["name"]
        try:
            opts = ProfileStart.model_validate(await _body(request))
        except ValidationError as exc:
            raise InvalidRequestError(catalog.validation_message(exc, "profiling request",
                                                                 "grader, concurrency, allow_partial")) from None
        jobs = getattr(request.app.state, "profiling", None)
        if jobs is None:
            raise ServiceUnavailableError("profiling is not available (the gateway is starting)")
        await asyncio.to_thread(catalog.get_model, acc.store, name)  # 404 listing the known models
        job = jobs.start(name, grader=opts.grader, concurrency=opts.concurrency, allow_partial=opts.allow_partial)
        return _json({"object": "profiling.job", **job.as_dict()}, 202)
    except Exception as exc:
        return _error(exc)


async def profile_status_endpoint(request: Request) -> Response:
    try:
        await _admin(request)
        name = request.path_params["name"]
        jobs = getattr(request.app.state, "profiling", None)
        job = jobs.get(name) if jobs is not None else None
        if job is None:
            raise NotFoundError(f"no profiling job for {name!r} on this replica; start one with "
                                f"POST /admin/models/{name}/profile", code="job_not_found")
        return _json({"object": "profiling.job", **job.as_dict()})
    except Exception as exc:
        return _error(exc)


async def run_reprofile_endpoint(request: Request) -> Response:
    try:
        await _admin(request)
        reprofiler = getattr(request.app.state, "reprofiler", None)
        if reprofiler is None:
            raise ServiceUnavailableError("re-profiling is not available (the gateway is starting)")
        report = await asyncio.to_thread(reprofiler.run_once)
        if report is None:
            raise reprofiler.busy_error()
        return _json(report)
    except Exception as exc:
        return _error(exc)


async def last_reprofile_endpoint(request: Request) -> Response:
    try:
        acc = await _admin(request)
        report = await asyncio.to_thread(profiling_sql.last_reprofile_run, acc.store)
        if report is None:
            raise NotFoundError("no re-profiling pass has run yet (POST /admin/reprofile or `uniroute reprofile`)",
                                code="no_report")
        return _json(report)
    except Exception as exc:
        return _error(exc)
