"""``GET /v1/models`` and ``GET /v1/models/{id}``: the models the caller may use, and ``auto``.

With ``auth.mode: keys`` both need the caller's key (401 without one) and show only the models
that key may use (its ``models`` list); a model the key may not use is a 404 as if it did not
exist, and the 404's "known" list names only the key's models. In ``auth.mode: open`` every
caller sees every model.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import ModelNotFoundError
from gateway.http.responses import json_response
from gateway.http.state import gateway_state
from gateway.serving.interfaces import Principal
from gateway.serving.service import AUTO, ChatService


def _model_card(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


async def _caller(request: Request, service: ChatService) -> Principal:
    return await service.authenticator.authenticate(request.headers.get("authorization"))


async def list_models(request: Request) -> Response:
    state = gateway_state(request)
    service, created = state.chat_service(), state.started_at
    allowed = (await _caller(request, service)).allowed_models
    data = [_model_card(AUTO, created, "uniroute")]
    data += [_model_card(e.name, e.created or created, e.owned_by) for e in service.registry.snapshot.entries
             if allowed is None or e.name in allowed]
    return json_response({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    state = gateway_state(request)
    service, created = state.chat_service(), state.started_at
    principal = await _caller(request, service)
    model_id = request.path_params["model_id"]
    if model_id == AUTO:
        return json_response(_model_card(AUTO, created, "uniroute"))
    entry = service.registry.get(model_id)
    allowed = principal.allowed_models
    if entry is None or (allowed is not None and entry.name not in allowed):
        known = ", ".join(service.usable_models(principal))
        raise ModelNotFoundError(f"unknown model '{model_id}'; known: {known}", param="model")
    return json_response(_model_card(entry.name, entry.created or created, entry.owned_by))
