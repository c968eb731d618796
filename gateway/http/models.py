"""``GET /v1/models`` and ``GET /v1/models/{id}``: the registry's models and ``auto``."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import ModelNotFoundError
from gateway.http.responses import json_response
from gateway.http.state import gateway_state
from gateway.serving.service import AUTO


def _model_card(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


async def list_models(request: Request) -> Response:
    state = gateway_state(request)
    service, created = state.chat_service(), state.started_at
    data = [_model_card(AUTO, created, "uniroute")]
    data += [_model_card(e.name, e.created or created, e.owned_by) for e in service.registry.snapshot.entries]
    return json_response({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    state = gateway_state(request)
    service, created = state.chat_service(), state.started_at
    model_id = request.path_params["model_id"]
    if model_id == AUTO:
        return json_response(_model_card(AUTO, created, "uniroute"))
    entry = service.registry.get(model_id)
    if entry is None:
        known = ", ".join((AUTO, *service.registry.names()))
        raise ModelNotFoundError(f"unknown model '{model_id}'; known: {known}", param="model")
    return json_response(_model_card(entry.name, entry.created or created, entry.owned_by))
