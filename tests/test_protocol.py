from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import InvalidRequestError
from gateway.http.openapi import build_openapi
from gateway.protocol import PASSTHROUGH_FIELDS, ChatCompletionRequest, UnirouteInfo, parse_chat_request

OK: dict[str, Any] = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


def test_full_request_parses() -> None:
    req = parse_chat_request({
        **OK,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": "really"},
            {"role": "user", "content": [{"type": "text", "text": "first"},
                                         {"type": "image_url", "image_url": {"url": "data:,"}}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "text", "text": "part"}]},
        ],
        "temperature": 0.2, "top_p": 0.9, "n": 2, "max_tokens": 5, "max_completion_tokens": 6, "stop": ["x"],
        "seed": 1, "user": "u", "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto", "response_format": {"type": "json_object"}, "logprobs": True, "top_logprobs": 2,
        "stream": True, "stream_options": {"include_usage": True}, "frequency_penalty": -2, "presence_penalty": 2,
        "uniroute": {"lambda": 0.3}, "some_future_field": 1,
    })
    assert req.uniroute is not None and req.uniroute.lam == 0.3
    assert req.routing_text() == "second\npart"
    dumped = req.model_dump(include=set(PASSTHROUGH_FIELDS), exclude_none=True)
    assert dumped["tools"][0]["function"]["name"] == "f"
    assert "uniroute" not in dumped and "messages" not in dumped


def test_routing_text_without_user_message() -> None:
    req = parse_chat_request({"model": "m", "messages": [{"role": "system", "content": "s"}]})
    assert req.routing_text() == ""


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "a"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({**OK, "messages": []}, "messages"),
        ({**OK, "messages": "hi"}, "messages"),
        ({**OK, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({**OK, "messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({**OK, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({**OK, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({**OK, "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0]"),
        ({**OK, "temperature": 2.5}, "temperature"),
        ({**OK, "temperature": "hot"}, "temperature"),
        ({**OK, "top_p": -0.1}, "top_p"),
        ({**OK, "n": 0}, "n"),
        ({**OK, "max_tokens": 0}, "max_tokens"),
        ({**OK, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({**OK, "presence_penalty": 3}, "presence_penalty"),
        ({**OK, "stop": 5}, "stop"),
        ({**OK, "stream": "yes"}, "stream"),
        ({**OK, "uniroute": {"lambda": -1}}, "uniroute.lambda"),
        ({**OK, "uniroute": {"lambada": 1}}, "uniroute.lambada"),
        ({**OK, "model": 7}, "model"),
    ],
)
def test_invalid_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(body)
    assert info.value.status_code == 400
    assert info.value.param == param
    assert f"'{param}'" in info.value.message


def test_non_object_body() -> None:
    with pytest.raises(InvalidRequestError, match="JSON object"):
        parse_chat_request([1, 2])


def test_field_order_follows_openai() -> None:
    fields = list(ChatCompletionRequest.model_fields)
    assert fields[:2] == ["messages", "model"]
    assert fields[-1] == "uniroute"


def test_uniroute_info_serialises_lambda_alias() -> None:
    info = UnirouteInfo.model_validate({"request_id": "r", "requested_model": "auto", "model": "m", "lambda": 0.2})
    assert info.model_dump(by_alias=True)["lambda"] == 0.2


def test_openapi_document() -> None:
    doc = build_openapi()
    assert doc["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/models", "/v1/models/{model_id}", "/health/liveliness",
            "/health/readiness"} <= set(doc["paths"])
    # every model endpoint is in the document (issue 12: "the OpenAPI document ... apply the same way")
    assert {"/v1/responses", "/v1/messages", "/v1/embeddings"} <= set(doc["paths"])
    for path in ("/v1/responses", "/v1/messages", "/v1/embeddings"):
        params = {p["name"] for p in doc["paths"][path]["post"].get("parameters", [])}
        assert "x-uniroute-client-request-id" in params, (path, params)
        assert ("x-uniroute-lambda" in params) == (path != "/v1/embeddings"), (path, params)
    schemas = doc["components"]["schemas"]
    assert {"ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk", "UnirouteInfo", "ModelList"} <= set(schemas)
    refs: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if "$ref" in x:
                refs.append(x["$ref"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    assert refs and all(r.removeprefix("#/components/schemas/") in schemas for r in refs)


@pytest.mark.parametrize("role", ["system", "developer", "user", "tool"])
def test_content_required_except_assistant_and_function(role: str) -> None:
    # found by tests/test_fuzz.py: {"role": "developer"} without content made LiteLLM raise KeyError('content'),
    # which reached the client as a 502 after every fallback
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "q"}, {"role": role}]})
    assert info.value.param == "messages[1]" and role in info.value.message
    for ok in ("assistant", "function"):
        parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "q"}, {"role": ok}]})
