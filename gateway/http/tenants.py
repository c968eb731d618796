"""Tenant-private profiles of a key (admin key): ``/admin/keys/{name}/profile`` (docs/ROUTING_FEATURES.md).

- ``POST   /admin/keys/{name}/profile``  ``{"labels": [{"prompt": str, "scores": {model: 0..1}}, ...]}``: the
  key's labelled set, replacing the one it had. Each prompt is mapped to its cluster membership by the serving
  router; the per-cluster sums are stored (``tenant_profiles``) and the key's ``auto`` requests are ranked with
  its overlay from then on (every replica within ``registry.poll_interval_s``). Answers the summary below.
- ``GET    /admin/keys/{name}/profile``  per model: labels, labels per cluster, the global Ψ and the key's Ψ.
- ``DELETE /admin/keys/{name}/profile``  forget the labels: the key routes with the global Ψ again.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import InvalidRequestError, validation_message
from gateway.http.auth import require_admin
from gateway.http.responses import json_body, json_response, path_name
from gateway.http.state import gateway_state
from gateway.serving.interfaces import LabelStats
from gateway.serving.service import ChatService
from gateway.serving.tenants import aggregate, memberships, overlay
from gateway.store import keys as key_sql
from gateway.store import tenants as tenant_sql

MAX_LABELS = 100_000


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=100_000)
    scores: dict[str, float] = Field(min_length=1)

    def checked(self) -> Label:
        for model, score in self.scores.items():
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"score of {model!r} is {score}: scores lie in [0, 1] (1 = right)")
        return self


class LabelUpload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: list[Label] = Field(min_length=1, max_length=MAX_LABELS)


def _context(request: Request) -> tuple[ChatService, str]:
    state = gateway_state(request)
    service = state.chat_service()
    if state.profile_key is None or service.overlays is None:
        raise InvalidRequestError("tenant profiles need the UniRoute router (router.policy: uniroute)",
                                  code="no_router")
    return service, state.profile_key


def summary(name: str, service: ChatService, stats: dict[str, LabelStats]) -> dict[str, Any]:
    """The key's label set against the global profiles of the serving registry."""
    assert service.overlays is not None
    models: dict[str, Any] = {}
    for model, st in stats.items():
        entry = service.registry.get(model)
        psi = entry.psi if entry is not None else None
        row: dict[str, Any] = {"labels": st.labels, "labels_per_cluster": [round(c, 3) for c in st.counts]}
        if psi is None or len(psi) != len(st.counts):
            row["note"] = "no global profile for this router: the labels do not make it routable"
        else:
            row["psi_global"] = [float(v) for v in psi]
            row["psi_key"] = [float(v) for v in overlay(psi, st, service.overlays.prior_weight)]
        models[model] = row
    return {"object": "tenant_profile", "key": name, "prior_weight": service.overlays.prior_weight, "models": models}


async def _key_id(request: Request) -> tuple[int, str]:
    acc = await require_admin(request)
    name = path_name(request, "API key", 128)
    row = await asyncio.to_thread(key_sql.get_key, acc.store, name)
    return int(row.id), name


async def upload_profile_endpoint(request: Request) -> Response:
    key_id, name = await _key_id(request)
    service, router = _context(request)
    try:
        body = LabelUpload.model_validate(await json_body(request))
        labels = [label.checked() for label in body.labels]
    except (ValidationError, ValueError) as exc:
        msg = validation_message(exc, "label set", "labels: [{prompt, scores: {model: 0..1}}]") \
            if isinstance(exc, ValidationError) else f"invalid label set: {exc}"
        raise InvalidRequestError(msg, param="labels") from None
    known = set(service.registry.names())
    unknown = sorted({m for label in labels for m in label.scores} - known)
    if unknown:
        raise InvalidRequestError(f"labels score models that are not in the registry: {', '.join(unknown[:10])}; "
                                  f"known: {', '.join(sorted(known))}", param="labels", code="model_not_found")
    try:
        z = await memberships(service.embed, service.policy, [label.prompt for label in labels])
    except ValueError as exc:
        raise InvalidRequestError(str(exc), code="no_router") from None
    stats = aggregate(z, [label.scores for label in labels])
    acc = gateway_state(request).accounting
    await asyncio.to_thread(tenant_sql.replace_labels, acc.store, key_id, router, stats)
    assert service.overlays is not None
    service.overlays.replace(await asyncio.to_thread(tenant_sql.load_all, acc.store, router))  # this replica now
    return json_response({**summary(name, service, stats), "uploaded": len(labels)})


async def get_profile_endpoint(request: Request) -> Response:
    key_id, name = await _key_id(request)
    service, router = _context(request)
    stats = await asyncio.to_thread(tenant_sql.labels_of, gateway_state(request).accounting.store, key_id, router)
    return json_response(summary(name, service, stats))


async def delete_profile_endpoint(request: Request) -> Response:
    key_id, name = await _key_id(request)
    service, router = _context(request)
    store = gateway_state(request).accounting.store
    removed = await asyncio.to_thread(tenant_sql.delete_labels, store, key_id, router)
    assert service.overlays is not None
    service.overlays.replace(await asyncio.to_thread(tenant_sql.load_all, store, router))
    return json_response({"object": "tenant_profile", "key": name, "deleted": removed > 0, "models_removed": removed})
