"""HTTP handlers of the model admin API (admin key, as ``/admin/keys``).

- ``GET    /admin/models``                   every model, with its active profile
- ``POST   /admin/models``                   a :class:`gateway.spec.ModelSpec` → 201 (409 if it exists)
- ``GET    /admin/models/{name}``            one model, its active profile and profile history
- ``PATCH  /admin/models/{name}``            a :data:`gateway.spec.ModelPatch`: any spec field but the name,
                                             and ``enabled``
- ``DELETE /admin/models/{name}``            remove it
- ``POST   /admin/models/{name}/disable``    stop serving it (kept in the table)
- ``POST   /admin/models/{name}/profile``    ``{grader?, concurrency?, allow_partial?, activate?, max_prompts?,
                                             target_ci?, allocation?}`` → 202 with the job id; its report has the
                                             impact report; ``activate: true`` also activates (a profile reported
                                             earlier and still current: as reported); ``max_prompts`` /
                                             ``target_ci``: sequential profiling, as the CLI's flags
- ``GET    /admin/models/{name}/profile``    the job's progress and report
- ``GET    /admin/models/{name}/impact``     the stored impact report and its follow-up (docs/IMPACT.md)
- ``POST   /admin/models/{name}/impact``     compute the follow-up now (``uniroute impact NAME --now``)
- ``POST   /admin/reprofile``                one re-profiling pass now (takes the lease) → its report
- ``GET    /admin/reprofile/last``           the last pass's report and drift table

Unknown names → 404 listing the known ones; invalid bodies → 400 naming the field and the valid ones
(:func:`gateway.errors.validation_message`). Handlers raise :class:`~gateway.errors.GatewayError`; the
registered handler shapes the answer. Changes reach every replica at its next poll.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import InvalidRequestError, NotFoundError, ServiceUnavailableError, validation_message
from gateway.http.auth import require_admin
from gateway.http.responses import json_body, json_response, path_name
from gateway.http.state import gateway_state
from gateway.secrets import admin_params
from gateway.spec import NAME_MAX_LENGTH, parse_patch, parse_spec
from gateway.store import models as catalog
from gateway.store import profiling as profiling_sql


def _key(request: Request) -> str | None:
    return gateway_state(request).profile_key


def _checked_params(request: Request, params: dict[str, Any]) -> dict[str, Any]:
    """``litellm_params`` as the table stores them: ``os.environ/NAME`` only for names on
    ``admin.env_allowlist``; literal secrets refused unless ``admin.allow_literal_keys``, then encrypted
    (:func:`gateway.secrets.admin_params`). A 400 names each refused value and the setting."""
    cfg = gateway_state(request).admin
    stored, problems = admin_params(params, env_allowlist=cfg.env_allowlist, allow_literal_keys=cfg.allow_literal_keys)
    if problems:
        raise InvalidRequestError("; ".join(problems), param="litellm_params", code="secret_refused")
    return stored


async def list_models_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    key = _key(request)

    def load() -> list[dict[str, Any]]:
        rows = catalog.list_models(acc.store)
        profiles = {}
        if key is not None:
            profiles = {r.name: catalog.active_profile_row(acc.store, r.name, key) for r in rows}
        return [catalog.model_summary(r, profiles.get(r.name)) for r in rows]

    return json_response({"object": "list", "data": await asyncio.to_thread(load)})


async def add_model_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    spec = parse_spec(await json_body(request, empty={}))
    spec = spec.model_copy(update={"litellm_params": _checked_params(request, spec.litellm_params)})
    row = await asyncio.to_thread(catalog.add_model, acc.store, spec)
    return json_response(catalog.model_summary(row), 201)


async def get_model_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    name, key = path_name(request, "model", NAME_MAX_LENGTH), _key(request)

    def load() -> dict[str, Any]:
        row = catalog.get_model(acc.store, name)
        out = catalog.model_summary(row, catalog.active_profile_row(acc.store, name, key))
        out["profile_history"] = [catalog.profile_summary(p) for p in catalog.profile_history(acc.store, name)]
        return out

    return json_response(await asyncio.to_thread(load))


async def update_model_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    changes = parse_patch(await json_body(request, empty={}))
    if "litellm_params" in changes:
        changes["litellm_params"] = _checked_params(request, changes["litellm_params"])
    name = path_name(request, "model", NAME_MAX_LENGTH)
    row = await asyncio.to_thread(catalog.update_model, acc.store, name, changes)
    return json_response(catalog.model_summary(row))


async def remove_model_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    name = path_name(request, "model", NAME_MAX_LENGTH)
    row = await asyncio.to_thread(catalog.remove_model, acc.store, name)
    return json_response({"object": "model", "name": row.name, "deleted": True})


async def disable_model_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    name = path_name(request, "model", NAME_MAX_LENGTH)
    row = await asyncio.to_thread(catalog.set_enabled, acc.store, name, False)
    return json_response(catalog.model_summary(row))


class ProfileStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: str | None = None
    concurrency: int | None = Field(default=None, ge=1, le=512)
    allow_partial: bool = False
    activate: bool = False  # true: also activate (a profile reported earlier: as reported; docs/IMPACT.md)
    # sequential profiling (docs/PROFILING.md): as `uniroute profile --max-prompts N --target-ci X --allocation A`
    max_prompts: int | None = Field(default=None, ge=1)
    target_ci: float | None = Field(default=None, gt=0, lt=1)
    allocation: str | None = Field(default=None, max_length=32)  # checked by the profiling jobs (routing.active)


async def start_profile_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    name = path_name(request, "model", NAME_MAX_LENGTH)
    try:
        opts = ProfileStart.model_validate(await json_body(request, empty={}))
    except ValidationError as exc:
        raise InvalidRequestError(validation_message(exc, "profiling request",
                                                     ", ".join(ProfileStart.model_fields))) from None
    jobs = gateway_state(request).profiling
    if jobs is None:
        raise ServiceUnavailableError("profiling is not available (the gateway is starting)")
    await asyncio.to_thread(catalog.get_model, acc.store, name)  # 404 listing the known models
    job = jobs.start(name, grader=opts.grader, concurrency=opts.concurrency, allow_partial=opts.allow_partial,
                     activate=opts.activate, max_prompts=opts.max_prompts, target_ci=opts.target_ci,
                     allocation=opts.allocation)
    return json_response({"object": "profiling.job", **job.as_dict()}, 202)


async def profile_status_endpoint(request: Request) -> Response:
    await require_admin(request)
    name = path_name(request, "model", NAME_MAX_LENGTH)
    jobs = gateway_state(request).profiling
    job = jobs.get(name) if jobs is not None else None
    if job is None:
        raise NotFoundError(f"no profiling job for {name!r} on this replica; start one with "
                            f"POST /admin/models/{name}/profile", code="job_not_found")
    return json_response({"object": "profiling.job", **job.as_dict()})


def _impacts(request: Request) -> Any:
    impacts = gateway_state(request).impacts
    if impacts is None:
        raise ServiceUnavailableError("impact reports are not available (the gateway is starting)")
    return impacts


async def impact_endpoint(request: Request) -> Response:
    await require_admin(request)
    name = path_name(request, "model", NAME_MAX_LENGTH)
    return json_response({"object": "model.impact", **await asyncio.to_thread(_impacts(request).show, name)})


async def impact_now_endpoint(request: Request) -> Response:
    await require_admin(request)
    name = path_name(request, "model", NAME_MAX_LENGTH)
    if await json_body(request, empty={}) != {}:
        raise InvalidRequestError("POST /admin/models/{name}/impact takes no options: send no body or {}",
                                  code="unexpected_body")
    return json_response({"object": "model.impact", **await asyncio.to_thread(_impacts(request).run_now, name)})


async def run_reprofile_endpoint(request: Request) -> Response:
    await require_admin(request)
    reprofiler = gateway_state(request).reprofiler
    if reprofiler is None:
        raise ServiceUnavailableError("re-profiling is not available (the gateway is starting)")
    report = await asyncio.to_thread(reprofiler.run_once)
    if report is None:
        raise reprofiler.busy_error()
    return json_response(report)


async def last_reprofile_endpoint(request: Request) -> Response:
    acc = await require_admin(request)
    report = await asyncio.to_thread(profiling_sql.last_reprofile_run, acc.store)
    if report is None:
        raise NotFoundError("no re-profiling pass has run yet (POST /admin/reprofile or `uniroute reprofile`)",
                            code="no_report")
    return json_response(report)
