"""The OpenAPI 3 document of the public endpoints, generated from the wire models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response

import gateway
from gateway.http.responses import json_response
from gateway.http.state import gateway_state
from gateway.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ErrorResponse,
    Model,
    ModelList,
    UnirouteInfo,
)
from gateway.protocol_endpoints import (
    AnthropicErrorResponse,
    EmbeddingsRequest,
    MessagesRequest,
    ResponsesRequest,
)

_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "OpenAI-shaped error",
                     "content": {"application/json": {"schema": _ref(ErrorResponse)}}} for c in codes}


_REQUESTS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, ResponsesRequest, MessagesRequest, EmbeddingsRequest)
_HEADERS = ("x-uniroute-model", "x-uniroute-request-id", "x-uniroute-client-request-id", "x-uniroute-attempts",
            "x-uniroute-cost")
_LAMBDA_PARAM = {"name": "x-uniroute-lambda", "in": "header", "required": False, "schema": {"type": "number", "minimum": 0},
                 "description": "cost/quality trade-off λ (the body's uniroute.lambda wins)"}
_CLIENT_ID_PARAM = {"name": "x-uniroute-client-request-id", "in": "header", "required": False,
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
                    "description": "your own id for the request: logged and echoed, never the gateway's "
                                   "id (x-uniroute-request-id, which feedback addresses)"}


def _served(summary: str, operation_id: str, request: type[BaseModel], answer: str, *codes: int,
            anthropic: bool = False, routed: bool = True) -> dict[str, Any]:
    """A POST of one of the served endpoints beyond chat (same headers, same errors; Anthropic-shaped ones).
    ``routed``: the endpoint takes a λ (``x-uniroute-lambda``, request and response header), as chat does."""
    errors = ({str(c): {"description": "Anthropic-shaped error",
                        "content": {"application/json": {"schema": _ref(AnthropicErrorResponse)}}} for c in codes}
              if anthropic else _errors(*codes))
    headers = (*_HEADERS, "x-uniroute-lambda") if routed else _HEADERS
    return {"post": {
        "summary": summary, "operationId": operation_id,
        "parameters": [_LAMBDA_PARAM, _CLIENT_ID_PARAM] if routed else [_CLIENT_ID_PARAM],
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {"200": {"description": answer, "headers": {h: {"schema": {"type": "string"}} for h in headers}},
                      **errors}}}


def build_openapi() -> dict[str, Any]:
    models: list[type[BaseModel]] = [*_REQUESTS, ChatCompletion, ChatCompletionChunk, Model, ModelList,
                                     UnirouteInfo, ErrorResponse, AnthropicErrorResponse]
    _, top = models_json_schema(
        [(m, "validation" if m in _REQUESTS else "serialization") for m in models], ref_template=_REF
    )
    schemas: dict[str, Any] = top.get("$defs", {})
    chat = {
        "post": {
            "summary": "Create a chat completion (OpenAI-compatible). model 'auto' lets the gateway route.",
            "operationId": "createChatCompletion",
            "parameters": [_LAMBDA_PARAM, _CLIENT_ID_PARAM],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(ChatCompletionRequest)}}},
            "responses": {
                "200": {
                    "description": "A completion (JSON), or server-sent chat.completion.chunk events ending in "
                                   "`data: [DONE]` when stream is true. The `uniroute` object is in the body / the "
                                   "last chunk.",
                    "headers": {h: {"schema": {"type": "string"}}
                                for h in ("x-uniroute-model", "x-uniroute-request-id",
                                          "x-uniroute-client-request-id", "x-uniroute-attempts", "x-uniroute-lambda",
                                          "x-uniroute-cost")},
                    "content": {"application/json": {"schema": _ref(ChatCompletion)},
                                "text/event-stream": {"schema": _ref(ChatCompletionChunk)}},
                },
                **_errors(400, 401, 403, 404, 413, 429, 502, 503, 504),
            },
        }
    }
    _name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    paths = {
        "/v1/chat/completions": chat,
        "/v1/responses": _served(
            "Create a response (OpenAI Responses API). model 'auto' lets the gateway route; previous_response_id "
            "is refused (400)", "createResponse", ResponsesRequest,
            "A response (JSON), or typed response.* server-sent events when stream is true; the `uniroute` "
            "object is in the body / the last event", 400, 401, 403, 404, 413, 429, 502, 503, 504),
        "/v1/messages": _served(
            "Create a message (Anthropic Messages API; key in x-api-key or Authorization). model 'auto' lets "
            "the gateway route", "createMessage", MessagesRequest,
            "A message (JSON), or message_start ... message_stop server-sent events when stream is true; the "
            "`uniroute` object is in the body / the last event", 400, 401, 403, 404, 413, 429, 502, 503, 504,
            anthropic=True),
        "/v1/embeddings": _served(
            "Create embeddings with an embedding model, by name ('auto' is refused: 400)", "createEmbedding",
            EmbeddingsRequest, "The embeddings (JSON) with the `uniroute` object", 400, 401, 403, 404, 413, 429,
            502, 503, 504, routed=False),
        "/v1/models": {"get": {"summary": "List the models the caller may use, including 'auto'",
                               "operationId": "listModels",
                               "responses": {"200": {"description": "models",
                                                     "content": {"application/json": {"schema": _ref(ModelList)}}},
                                             **_errors(401)}}},
        "/v1/models/{model_id}": {"get": {
            "summary": "One model", "operationId": "retrieveModel",
            "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the model",
                                  "content": {"application/json": {"schema": _ref(Model)}}}, **_errors(401, 404)}}},
        "/health/liveliness": {"get": {"summary": "The process is up", "operationId": "liveliness",
                                       "responses": {"200": {"description": "alive"}}}},
        "/health/readiness": {"get": {"summary": "Registry and router loaded, store reachable",
                                      "operationId": "readiness",
                                      "responses": {"200": {"description": "ready"}, **_errors(503)}}},
        "/v1/usage": {"get": {"summary": "The calling key's λ range, budget, spend, remaining budget and usage "
                                         "this period", "operationId": "usage",
                              "responses": {"200": {"description": "usage"}, **_errors(401)}}},
        "/admin/keys": {
            "get": {"summary": "List API keys (admin key)", "operationId": "listKeys",
                    "responses": {"200": {"description": "keys"}, **_errors(401, 403)}},
            "post": {"summary": "Create an API key (admin key); the response holds the key, shown once",
                     "operationId": "createKey",
                     "responses": {"201": {"description": "created"}, **_errors(400, 401, 403, 409)}},
        },
        "/admin/keys/{name}": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": {"summary": "One API key (admin key)", "operationId": "getKey",
                    "responses": {"200": {"description": "key"}, **_errors(401, 403, 404)}},
            "patch": {"summary": "Mark an API key trusted or not: {trusted: bool} (admin key)",
                      "operationId": "updateKey",
                      "responses": {"200": {"description": "updated"}, **_errors(400, 401, 403, 404)}},
            "delete": {"summary": "Revoke an API key (admin key)", "operationId": "revokeKey",
                       "responses": {"200": {"description": "revoked"}, **_errors(401, 403, 404)}},
        },
        "/admin/keys/{name}/profile": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": {"summary": "Upload the key's labelled set {labels: [{prompt, scores: {model: 0..1}}]}, replacing "
                                "its previous one: its tenant-private profile overlay, used for its own routing only "
                                "(admin key)", "operationId": "uploadKeyProfile",
                     "responses": {"200": {"description": "the key's overlay"}, **_errors(400, 401, 403, 404)}},
            "get": {"summary": "The key's labels and overlay Ψ against the global Ψ (admin key)",
                    "operationId": "getKeyProfile",
                    "responses": {"200": {"description": "the key's overlay"}, **_errors(400, 401, 403, 404)}},
            "delete": {"summary": "Forget the key's labels: it routes with the global Ψ again (admin key)",
                       "operationId": "deleteKeyProfile",
                       "responses": {"200": {"description": "deleted"}, **_errors(400, 401, 403, 404)}},
        },
        "/v1/feedback": {"post": {
            "summary": "Score a request you made, once: {request_id (its x-uniroute-request-id), score in [0,1] | "
                       "thumbs: up|down, source?}",
            "operationId": "createFeedback",
            "responses": {"201": {"description": "recorded"}, **_errors(400, 401, 404, 409)}}},
        "/v1/route": {"post": {
            "summary": "Routing dry-run: a chat body (messages) or a Responses body (input) and λ → the full ranking "
                       "(expected error, normalised cost, objective), cluster and membership, the model it would be "
                       "sent to, and the models left out and why (of the models the key may not use, only their "
                       "number: excluded_not_allowed); no model is called, nothing charged or logged",
            "operationId": "routeDryRun",
            "responses": {"200": {"description": "the routing decision"}, **_errors(400, 401, 403, 404, 429, 503)}}},
        "/admin/keys/{name}/route": {
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "post": {"summary": "Routing dry-run on behalf of the key (admin key): the body of POST /v1/route, answered "
                                "with the ranking that key would get (its λ or paced λ, its tenant profile overlay, "
                                "its models) and every registered model it may not use, by name (code not_allowed); "
                                "does not count toward the key's rate limit; no model is called, nothing charged or "
                                "logged. 404: no such key; 409: the key is revoked; 400: auth.mode open",
                     "operationId": "routeDryRunForKey",
                     "responses": {"200": {"description": "the routing decision, view: operator"},
                                   **_errors(400, 401, 403, 404, 409, 503)}},
        },
        "/admin/models": {
            "get": {"summary": "List the registry (admin key)", "operationId": "listRegistryModels",
                    "responses": {"200": {"description": "models"}, **_errors(401, 403)}},
            "post": {"summary": "Add a model (admin key); it is routable for auto once profiled",
                     "operationId": "addModel",
                     "responses": {"201": {"description": "added"}, **_errors(400, 401, 403, 409)}},
        },
        "/admin/models/{name}": {
            "parameters": [_name],
            "get": {"summary": "One registry model with its active profile (admin key)", "operationId": "getModel",
                    "responses": {"200": {"description": "model"}, **_errors(401, 403, 404)}},
            "patch": {"summary": "Update a model (admin key)", "operationId": "updateModel",
                      "responses": {"200": {"description": "updated"}, **_errors(400, 401, 403, 404)}},
            "delete": {"summary": "Remove a model (admin key)", "operationId": "removeModel",
                       "responses": {"200": {"description": "removed"}, **_errors(401, 403, 404)}},
        },
        "/admin/models/{name}/disable": {"parameters": [_name], "post": {
            "summary": "Disable a model (admin key)", "operationId": "disableModel",
            "responses": {"200": {"description": "disabled"}, **_errors(401, 403, 404)}}},
        "/admin/models/{name}/profile": {
            "parameters": [_name],
            "post": {"summary": "Start profiling the model on the router's validation prompts (admin key)",
                     "operationId": "startProfile",
                     "responses": {"202": {"description": "job started"}, **_errors(401, 403, 404, 409)}},
            "get": {"summary": "Progress or report of the model's profiling job (admin key)",
                    "operationId": "profileStatus",
                    "responses": {"200": {"description": "status"}, **_errors(401, 403, 404)}},
        },
        "/admin/models/{name}/impact": {
            "parameters": [_name],
            "get": {"summary": "The model's stored impact report and its follow-up with the realised figures "
                               "(admin key)", "operationId": "modelImpact",
                    "responses": {"200": {"description": "report"}, **_errors(401, 403, 404)}},
            "post": {"summary": "Compute the follow-up of the model's activated impact report now (admin key)",
                     "operationId": "modelImpactNow",
                     "responses": {"200": {"description": "report with its follow-up"},
                                   **_errors(400, 401, 403, 404, 409)}},
        },
        "/admin/reprofile": {"post": {
            "summary": "Re-profile every model from validation outcomes and feedback now (admin key)",
            "operationId": "runReprofile", "responses": {"200": {"description": "drift report"},
                                                         **_errors(401, 403, 409)}}},
        "/admin/reprofile/last": {"get": {
            "summary": "The last re-profiling run and its drift report (admin key)", "operationId": "lastReprofile",
            "responses": {"200": {"description": "report"}, **_errors(401, 403, 404)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (text exposition); with auth.mode keys it needs "
                                        "$UNIROUTE_METRICS_TOKEN or the admin key (metrics.auth)",
                             "operationId": "metrics",
                             "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}},
                                           **_errors(401, 403)}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "UniRoute Gateway", "version": gateway.__version__,
                 "description": "OpenAI-compatible LLM gateway with UniRoute routing."},
        "paths": paths,
        "components": {"schemas": schemas},
    }


async def openapi(request: Request) -> Response:
    state = gateway_state(request)
    doc = state.openapi
    if doc is None:
        doc = state.openapi = build_openapi()
    return json_response(doc)
