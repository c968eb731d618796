"""``POST /v1/route``: the routing dry-run. Parse, call :meth:`ChatService.route`, answer JSON.

The body is a chat completion body (``messages``; ``model`` defaults to ``auto``) or a Responses-style
body (``input``: a string, or a list of message items ``{"role", "content"}`` whose content is a string or
``input_text`` / ``output_text`` / ``text`` parts; ``instructions`` becomes a system message). λ comes from
``uniroute.lambda`` or the ``x-uniroute-lambda`` header, as for chat. The key is checked from the headers
before the body is read, the rate limit counts the call, and the answer is
:func:`gateway.serving.dryrun.route_report`'s. Nothing is called, reserved, charged or logged.

``POST /admin/keys/{name}/route`` (admin key) is the same dry-run with the same body on behalf of the key
``name``: that key's λ (its default, or its paced λ), its tenant-private profile overlay and its models, without
counting toward its rate limit; the answer also names the registered models the key may not use (``not_allowed``).
404 for an unknown key, 409 for a revoked one, 400 with ``auth.mode: open`` (every caller is ``anonymous``
there, so no key's settings apply).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.access.auth import principal_from_row
from gateway.access.budget import store_call
from gateway.config import LimitsConfig
from gateway.errors import ConflictError, InvalidRequestError
from gateway.http.auth import authenticate, require_admin
from gateway.http.bodies import ArrayLimit, JsonShape, off_loop, read_body
from gateway.http.chat import request_id
from gateway.http.responses import json_response, parse_json, path_name
from gateway.http.state import gateway_state
from gateway.protocol import ChatCompletionRequest, parse_chat_request
from gateway.serving.service import AUTO, ChatContext
from gateway.store import keys as key_sql

_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def route_shape(limits: LimitsConfig) -> JsonShape:
    """The chat body's structural limits, and ``limits.max_messages`` on ``input`` too."""
    return JsonShape(limits.max_json_depth, limits.max_json_items, {
        ("messages",): ArrayLimit(limits.max_messages, "messages", "limits.max_messages"),
        ("input",): ArrayLimit(limits.max_messages, "input items", "limits.max_messages"),
        ("messages", "*", "content"): ArrayLimit(limits.max_content_parts, "content parts",
                                                 "limits.max_content_parts"),
        ("input", "*", "content"): ArrayLimit(limits.max_content_parts, "content parts", "limits.max_content_parts"),
        ("tools",): ArrayLimit(limits.max_tools, "tools", "limits.max_tools"),
    })


def _item_message(i: int, item: Any) -> dict[str, Any] | None:
    """One Responses ``input`` item as a chat message; None for an item that is not a message (a tool call)."""
    if not isinstance(item, dict):
        raise InvalidRequestError(f"input[{i}] must be an object with 'role' and 'content'", param=f"input[{i}]")
    if item.get("type", "message") != "message":
        return None
    content = item.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
                if isinstance(part, dict) and part.get("type") in {"input_image", "input_file", "input_audio"}:
                    continue  # not text: the router reads text only
                raise InvalidRequestError(f"input[{i}].content[{j}] must be a text part "
                                          f"{{'type': 'input_text', 'text': ...}}", param=f"input[{i}].content[{j}]")
            parts.append({"type": "text", "text": part["text"]})
        content = parts or ""
    return {"role": item.get("role"), "content": content}


def as_chat(data: Any) -> dict[str, Any]:
    """A chat completion body from a dry-run body (see the module docstring); 400 naming what is wrong."""
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    body = dict(data)
    body.setdefault("model", AUTO)
    body.pop("stream", None)  # a dry-run answers one JSON object whatever the body asks
    body.pop("stream_options", None)
    if "input" not in body:
        return body
    if "messages" in body:
        raise InvalidRequestError("give 'messages' (a chat body) or 'input' (a Responses body), not both",
                                  param="input")
    given = body.pop("input")
    messages: list[dict[str, Any]] = []
    instructions = body.pop("instructions", None)
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        messages += [m for i, item in enumerate(given) if (m := _item_message(i, item)) is not None]
    else:
        raise InvalidRequestError("'input' must be a string or a list of message items {'role', 'content'}",
                                  param="input")
    if not any(m.get("role") == "user" for m in messages):
        raise InvalidRequestError("'input' has no user message to route on", param="input")
    body["messages"] = messages
    return body


def _parse(raw: bytes) -> ChatCompletionRequest:
    return parse_chat_request(as_chat(parse_json(raw)))


async def route_endpoint(request: Request) -> Response:
    service = gateway_state(request).chat_service()
    limits = gateway_state(request).limits
    ctx = ChatContext(request_id=request_id(request), authorization=request.headers.get("authorization"),
                      lambda_header=request.headers.get("x-uniroute-lambda"))
    ctx.principal = await authenticate(request)  # from the headers: a refused key costs no body read (nor a log row)
    raw = await read_body(request, route_shape(limits))
    ctx.body_bytes = len(raw)
    req = await off_loop(len(raw), limits, _parse, raw)
    return json_response(await service.route(req, ctx))


async def admin_route_endpoint(request: Request) -> Response:
    """``POST /admin/keys/{name}/route``: the dry-run the key ``name`` would get, as the operator sees it."""
    acc = await require_admin(request)
    name = path_name(request, "API key", 128)
    if acc.key_authenticator is None:
        raise InvalidRequestError("auth.mode is 'open': every caller is served as 'anonymous', so no key's settings "
                                  "apply; a dry-run on behalf of a key needs auth.mode: keys (POST /v1/route shows "
                                  "what anonymous gets)", code="auth_mode_open")
    row = await store_call(key_sql.get_key, acc.store, name)  # 404 naming the key when there is none
    if row.revoked_at is not None:
        raise ConflictError(f"API key {name!r} was revoked at {row.revoked_at:%Y-%m-%dT%H:%M:%SZ}: its requests are "
                            f"refused before routing, so there is nothing to dry-run", param="name",
                            code="revoked_api_key")
    service = gateway_state(request).chat_service()
    limits = gateway_state(request).limits
    ctx = ChatContext(request_id=request_id(request), authorization=None,
                      lambda_header=request.headers.get("x-uniroute-lambda"))
    ctx.principal = principal_from_row(row)
    raw = await read_body(request, route_shape(limits))
    ctx.body_bytes = len(raw)
    req = await off_loop(len(raw), limits, _parse, raw)
    return json_response(await service.route(req, ctx, operator=True))
