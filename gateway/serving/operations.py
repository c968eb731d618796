"""The endpoints beyond chat completions as the chat service runs them: one :class:`Operation` per request.

The service (``service.py``) runs every endpoint through the same steps (auth, λ, rate limit, plan, reserve,
forward with fallback and timeouts, log, settle; ``ChatService.run`` / ``run_stream``). An operation adds
only what differs per API:

- ``endpoint`` (the log column, the metric label) and the model ``kind`` it serves (``embedding`` for
  ``/v1/embeddings``, else ``chat``);
- :meth:`payload`: the request's fields for LiteLLM (``Upstream.call``);
- :meth:`body`: the answer with ``model`` = the model that served;
- for streams, per event (dicts with a ``type``): :meth:`event` (names the served model), :meth:`event_usage`
  (tokens, for the cost), :meth:`final_usage` and :meth:`set_event_usage` (the event with the stream's final
  usage, and putting the figure charged in it when the counted figure replaced the provider's),
  :meth:`event_text` (text relayed, for the partial cost of a cut-short stream) and :meth:`error_event` (how a
  failure mid-stream is told, in the API's own shape).
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import GatewayError, UpstreamError, anthropic_error
from gateway.protocol_endpoints import EmbeddingsRequest, EndpointRequest, MessagesRequest, ResponsesRequest
from gateway.secrets import scrub
from gateway.serving.estimate import count_text
from gateway.serving.forwarding import Completion, token_counts


class Operation:
    """A request of another endpoint; subclasses say how its answers and events read."""

    def __init__(self, request: EndpointRequest) -> None:
        self.request = request
        self.endpoint: str = request.endpoint
        self.kind: str = request.kind

    #: The request field that bounds the output (None: no output, as for embeddings).
    output_field: str | None = None

    @property
    def stream(self) -> bool:
        return bool(self.request.stream)

    def payload(self, max_output_tokens: int | None = None) -> dict[str, Any]:
        """The request's fields for LiteLLM; ``max_output_tokens``: the output bound the budget estimate forces
        (a key with a budget, no bound in the request, a model whose maximum output is unknown), sent as the
        API's own field (``output_field``)."""
        payload = self.request.payload()
        if max_output_tokens is not None and self.output_field is not None:
            payload[self.output_field] = max_output_tokens
        return payload

    def answer_texts(self, response: Any) -> list[str]:
        """Every billed text of a non-streaming answer (its output: text, tool-call arguments, reasoning)."""
        return []

    def counted_completion(self, model: str, response: Any) -> int:
        """Completion tokens of a non-streaming answer, counted by LiteLLM's counter for ``model`` (the figure
        charged when the provider reports no usage or impossible usage)."""
        text = "\n".join(t for t in self.answer_texts(response) if t)
        if not text:
            return 0
        counted = count_text(model, text)
        return counted if counted is not None else max(1, len(text) // 4)

    def body(self, done: Completion) -> dict[str, Any]:
        body: dict[str, Any] = dict(done.response)
        body["model"] = done.entry.name
        return body

    def event(self, raw: dict[str, Any], model: str) -> dict[str, Any]:
        """``raw`` as the client gets it (naming ``model``). An ``error`` event (LiteLLM's adapters report a
        failure mid-stream as one) raises: the service ends the stream with its own, scrubbed, error event."""
        if raw.get("type") == "error":
            detail = raw.get("error")
            message = detail.get("message") if isinstance(detail, dict) else raw.get("message")
            raise UpstreamError(f"model '{model}' failed mid-stream: {scrub(str(message or 'error event'))}")
        return raw

    def event_usage(self, event: dict[str, Any]) -> tuple[int | None, int | None]:
        return None, None

    def final_usage(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` tells the stream's final usage (what the client reads as the tokens charged)."""
        return False

    def set_event_usage(self, event: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> None:
        """Put the tokens charged (the counted figure) in a :meth:`final_usage` event, in place."""

    def event_text(self, event: dict[str, Any]) -> str | None:
        return None

    def error_event(self, err: GatewayError) -> dict[str, Any]:
        return {"type": "error", "code": err.code, "message": err.message, "param": err.param}


class ResponsesOperation(Operation):
    """``POST /v1/responses``: typed ``response.*`` events; usage on ``response.completed``."""

    output_field = "max_output_tokens"

    def answer_texts(self, response: Any) -> list[str]:
        return _strings(_get(response, "output"), ("text", "arguments", "name"))

    _WITH_RESPONSE = frozenset({"response.created", "response.in_progress", "response.completed",
                                "response.incomplete", "response.failed"})

    def event(self, raw: dict[str, Any], model: str) -> dict[str, Any]:
        raw = super().event(raw, model)
        if raw.get("type") in self._WITH_RESPONSE and isinstance(raw.get("response"), dict):
            raw["response"]["model"] = model
        return raw

    def event_usage(self, event: dict[str, Any]) -> tuple[int | None, int | None]:
        response = event.get("response")
        if event.get("type") in self._WITH_RESPONSE and isinstance(response, dict):
            return token_counts(response.get("usage"))
        return None, None

    _FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})

    def final_usage(self, event: dict[str, Any]) -> bool:
        return event.get("type") in self._FINAL and isinstance(event.get("response"), dict)

    def set_event_usage(self, event: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> None:
        usage = event["response"].get("usage")
        if isinstance(usage, dict):  # (none sent: none is made up, as on chat)
            usage.update(input_tokens=prompt_tokens, output_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)

    def event_text(self, event: dict[str, Any]) -> str | None:
        if event.get("type") in ("response.output_text.delta", "response.function_call_arguments.delta"):
            delta = event.get("delta")
            return delta if isinstance(delta, str) else None
        return None


class MessagesOperation(Operation):
    """``POST /v1/messages``: ``message_start`` … ``message_stop`` events; usage on ``message_start`` (input)
    and ``message_delta`` (both); errors in Anthropic's shape."""

    output_field = "max_tokens"

    def answer_texts(self, response: Any) -> list[str]:
        return _strings(_get(response, "content"), ("text", "thinking", "name", "input"))

    def event(self, raw: dict[str, Any], model: str) -> dict[str, Any]:
        raw = super().event(raw, model)
        if raw.get("type") == "message_start" and isinstance(raw.get("message"), dict):
            raw["message"]["model"] = model
        return raw

    def event_usage(self, event: dict[str, Any]) -> tuple[int | None, int | None]:
        kind = event.get("type")
        if kind == "message_start" and isinstance(event.get("message"), dict):
            pt, ct = token_counts(event["message"].get("usage"))
            return (pt or None), (ct or None)  # a bridged stream announces zeros before it knows
        if kind == "message_delta":
            return token_counts(event.get("usage"))
        return None, None

    def final_usage(self, event: dict[str, Any]) -> bool:
        return event.get("type") == "message_delta"

    def set_event_usage(self, event: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> None:
        """Both counts: a ``message_delta``'s totals replace ``message_start``'s in the client's message."""
        usage = event.get("usage")
        if isinstance(usage, dict):
            usage.update(input_tokens=prompt_tokens, output_tokens=completion_tokens)

    def event_text(self, event: dict[str, Any]) -> str | None:
        delta = event.get("delta")
        if event.get("type") == "content_block_delta" and isinstance(delta, dict):
            text = delta.get("text", delta.get("partial_json"))
            return text if isinstance(text, str) else None
        return None

    def error_event(self, err: GatewayError) -> dict[str, Any]:
        return anthropic_error(err.status_code, err.message)


class EmbeddingsOperation(Operation):
    """``POST /v1/embeddings``: never streamed."""


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _strings(value: Any, keys: tuple[str, ...]) -> list[str]:
    """The values under ``keys`` anywhere in ``value`` (dicts, lists, pydantic objects): strings as they are,
    other values as JSON (a tool call's ``input`` object)."""
    out: list[str] = []
    if hasattr(value, "model_dump"):
        value = value.model_dump(exclude_none=True)
    if isinstance(value, list | tuple):
        for item in value:
            out.extend(_strings(item, keys))
    elif isinstance(value, dict):
        for k, v in value.items():
            if k in keys and isinstance(v, str):
                out.append(v)
            elif k in keys and isinstance(v, dict | list):
                out.append(json.dumps(v, ensure_ascii=False))
            elif isinstance(v, dict | list):
                out.extend(_strings(v, keys))
    return out


def operation(request: EndpointRequest) -> Operation:
    """The operation that runs ``request``."""
    if isinstance(request, ResponsesRequest):
        return ResponsesOperation(request)
    if isinstance(request, MessagesRequest):
        return MessagesOperation(request)
    if isinstance(request, EmbeddingsRequest):
        return EmbeddingsOperation(request)
    raise TypeError(f"no operation for {type(request).__name__}")
