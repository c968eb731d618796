"""``POST /v1/responses``, ``POST /v1/messages`` (Anthropic) and ``POST /v1/embeddings``: thin adapters.

Each parses its body with ``gateway/protocol_endpoints.py``, wraps it in its operation
(``gateway/serving/operations.py``) and runs it through the one flow of the chat endpoint
(:func:`gateway.http.chat.serve`): the same key check before the body, the same limits, the same service steps
and ``x-uniroute-*`` headers. Streams are named server-sent events (``event: <type>``). ``/v1/messages``
answers errors in Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``) and takes the key
from ``x-api-key`` (Anthropic's header) when there is no ``Authorization`` header.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from gateway.http.bodies import embeddings_shape, responses_shape
from gateway.http.chat import SSEResponse, serve
from gateway.http.responses import anthropic_error_response, parse_json
from gateway.http.state import gateway_state
from gateway.protocol_endpoints import (
    EmbeddingsRequest,
    MessagesRequest,
    ResponsesRequest,
    parse_endpoint_request,
)
from gateway.serving.operations import Operation, operation
from gateway.serving.service import ChatStream


def _parser(cls: type[ResponsesRequest | MessagesRequest | EmbeddingsRequest]) -> Callable[[bytes], Operation]:
    def parse(raw: bytes) -> Operation:
        return operation(parse_endpoint_request(cls, parse_json(raw)))

    return parse


_RESPONSES, _MESSAGES, _EMBEDDINGS = _parser(ResponsesRequest), _parser(MessagesRequest), _parser(EmbeddingsRequest)


def _named_sse(stream: ChatStream) -> Response:
    return SSEResponse(stream, named=True)


async def responses(request: Request) -> Response:
    service = gateway_state(request).chat_service()
    return await serve(request, _RESPONSES, service.run, service.run_stream, _named_sse, shape=responses_shape)


async def messages(request: Request) -> Response:
    service = gateway_state(request).chat_service()
    api_key = request.headers.get("x-api-key")
    authorization = request.headers.get("authorization") or (f"Bearer {api_key}" if api_key else None)
    return await serve(request, _MESSAGES, service.run, service.run_stream, _named_sse,
                       error=anthropic_error_response, authorization=authorization)


async def embeddings(request: Request) -> Response:
    service = gateway_state(request).chat_service()
    return await serve(request, _EMBEDDINGS, service.run, service.run_stream, _named_sse, shape=embeddings_shape)
