"""Wire models of the endpoints beyond chat completions: the OpenAI Responses API (``POST /v1/responses``),
the Anthropic Messages API (``POST /v1/messages``) and OpenAI embeddings (``POST /v1/embeddings``).

Each request model is validated here (a failure is a 400 naming the field, as for chat completions) and
offers what the chat service needs of any request (:class:`gateway.serving.service.RoutedRequest`): the
``model`` (``auto`` is routed, except for embeddings), the ``uniroute`` extension (λ), the text routed on
(:meth:`routing_text`: the last user turn), and :meth:`estimate_request`, the request as a chat completion
with everything it bills (texts, images, tools, other blocks as JSON) and the same output bound, which is what
the budget estimate (gateway/serving/estimate.py) reads. :meth:`payload` is what goes
to LiteLLM: every declared field but the gateway's own (``model``, ``stream``, ``uniroute``). Unknown fields
are accepted and ignored, as on the chat endpoint.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from gateway.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    FunctionDefinition,
    ImagePart,
    ImageUrl,
    RequestT,
    TextPart,
    Tool,
    UnirouteOptions,
    check_model_name,
    parse_request,
)
from gateway.spec import NAME_MAX_LENGTH

#: The APIs the gateway serves, as the request log's ``endpoint`` column and the metrics' ``endpoint`` label.
ENDPOINTS = ("chat", "responses", "messages", "embeddings")
_GATEWAY_FIELDS = frozenset({"model", "stream", "uniroute"})


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    endpoint: ClassVar[str]
    kind: ClassVar[str] = "chat"  # the model kind (gateway.spec.MODEL_KINDS) the endpoint serves

    model: str = Field(min_length=1, max_length=NAME_MAX_LENGTH)
    stream: StrictBool | None = False
    uniroute: UnirouteOptions | None = None

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return check_model_name(v)

    def routing_text(self) -> str:
        raise NotImplementedError

    def estimate_messages(self) -> list[ChatMessage]:
        """The request's turns as chat messages with everything they bill (what the budget estimate counts)."""
        raise NotImplementedError

    def estimate_tools(self) -> list[dict[str, Any]]:
        """The tool definitions the request sends (each billed as its JSON, plus the provider's tool prompt)."""
        return []

    def output_bound(self) -> int | None:
        """The request's own bound on the output tokens (None: unbounded; the estimate then uses the model's)."""
        return None

    def estimate_request(self) -> ChatCompletionRequest:
        """This request as a chat completion with everything it bills and the same output bound: what the budget
        estimate reads (and what a stream without usage is charged for, counted)."""
        tools = [Tool(type="function", function=FunctionDefinition(
            name=str(t.get("name") or t.get("type") or "tool"), parameters=t)) for t in self.estimate_tools()]
        return ChatCompletionRequest(model=self.model, messages=self.estimate_messages() or [_message([])],
                                     max_tokens=self.output_bound(), tools=tools or None)

    def payload(self) -> dict[str, Any]:
        """The declared fields sent upstream (None left out), without the gateway's own."""
        fields = set(type(self).model_fields) - _GATEWAY_FIELDS
        return self.model_dump(include=fields, exclude_none=True)


def _text(content: Any, kinds: frozenset[str]) -> str:
    """A message's text: a string, or its text parts (``type`` in ``kinds``) joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") in kinds)
    return ""


def _message(parts: list[ContentPart]) -> ChatMessage:
    return ChatMessage(role="user", content=parts or "")


def _parts(content: Any, text_kinds: frozenset[str], image_kinds: frozenset[str]) -> list[ContentPart]:
    """``content`` (a string or a list of blocks) as chat content parts: text blocks as text, images as image
    parts (priced by formula, never fetched), any other block as its JSON text (over-counts, never under)."""
    if isinstance(content, str):
        return [TextPart(type="text", text=content)]
    parts: list[ContentPart] = []
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in text_kinds and isinstance(block.get("text"), str):
            parts.append(TextPart(type="text", text=block["text"]))
        elif kind in image_kinds:
            low = block.get("detail") == "low"
            parts.append(ImagePart(type="image_url", image_url=ImageUrl(url="", detail="low" if low else None)))
        elif block is not None:
            parts.append(TextPart(type="text", text=json.dumps(block, ensure_ascii=False, default=str)))
    return parts


# --- POST /v1/responses ------------------------------------------------------------------------------------

_INPUT_TEXT = frozenset({"input_text", "text", "output_text"})
_INPUT_IMAGE = frozenset({"input_image"})


class ResponsesRequest(_Request):
    """``POST /v1/responses``. ``previous_response_id`` is refused (400): the gateway stores no responses, so
    a conversation is continued by sending its items again in ``input``."""

    endpoint: ClassVar[str] = "responses"

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    previous_response_id: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("input must be a string or a non-empty list of input items")
        return v

    @field_validator("previous_response_id")
    @classmethod
    def _no_previous(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("previous_response_id is not supported: this gateway stores no responses; send the "
                             "conversation's items again in 'input'")
        return v

    def _messages(self) -> list[dict[str, Any]]:
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [i for i in self.input if i.get("type", "message") == "message" and "role" in i]

    def routing_text(self) -> str:
        for item in reversed(self._messages()):
            if item.get("role") == "user":
                return _text(item.get("content"), _INPUT_TEXT)
        return ""

    def estimate_messages(self) -> list[ChatMessage]:
        out = [_message(_parts(self.instructions, _INPUT_TEXT, _INPUT_IMAGE))] if self.instructions else []
        if self.text is not None:  # a structured-output schema is billed as prompt
            out.append(_message(_parts([self.text], frozenset(), frozenset())))
        if isinstance(self.input, str):
            return [*out, _message(_parts(self.input, _INPUT_TEXT, _INPUT_IMAGE))]
        for item in self.input:
            if "content" in item:  # a message: its parts (and any other field of it as JSON)
                rest = {k: v for k, v in item.items() if k not in ("content", "role", "type")}
                parts = _parts(item["content"], _INPUT_TEXT, _INPUT_IMAGE)
                out.append(_message(parts + (_parts([rest], frozenset(), frozenset()) if rest else [])))
            else:  # a function call, its output, a reasoning item, ...: its JSON
                out.append(_message(_parts([item], frozenset(), frozenset())))
        return out

    def estimate_tools(self) -> list[dict[str, Any]]:
        return list(self.tools or ())

    def output_bound(self) -> int | None:
        return self.max_output_tokens


# --- POST /v1/messages (Anthropic) ---------------------------------------------------------------------------

_BLOCK_TEXT = frozenset({"text"})
_BLOCK_IMAGE = frozenset({"image"})


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("content must be a string or a non-empty list of content blocks")
            for block in v:
                if not isinstance(block.get("type"), str):
                    raise ValueError("every content block needs a 'type' (text, image, tool_use, tool_result, ...)")
        return v


class MessagesRequest(_Request):
    """``POST /v1/messages`` (Anthropic): ``max_tokens`` and ``messages`` are required, as Anthropic's are."""

    endpoint: ClassVar[str] = "messages"

    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None

    def routing_text(self) -> str:
        for msg in reversed(self.messages):
            if msg.role == "user":
                return _text(msg.content, _BLOCK_TEXT)
        return ""

    def estimate_messages(self) -> list[ChatMessage]:
        out = [_message(_parts(self.system, _BLOCK_TEXT, _BLOCK_IMAGE))] if self.system is not None else []
        return out + [_message(_parts(msg.content, _BLOCK_TEXT, _BLOCK_IMAGE)) for msg in self.messages]

    def estimate_tools(self) -> list[dict[str, Any]]:
        return list(self.tools or ())

    def output_bound(self) -> int | None:
        return self.max_tokens


# --- POST /v1/embeddings -------------------------------------------------------------------------------------


class EmbeddingsRequest(_Request):
    """``POST /v1/embeddings``: a named embedding model only (``auto`` routes chat models, not embeddings)."""

    endpoint: ClassVar[str] = "embeddings"
    kind: ClassVar[str] = "embedding"

    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("embeddings are not streamed; leave stream out or false")
        return v

    @field_validator("model")
    @classmethod
    def _named(cls, v: str) -> str:
        if v == "auto":
            raise ValueError("'auto' routes chat models; /v1/embeddings needs an embedding model by name "
                             "(see GET /v1/models)")
        return v

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("input must be a string or a non-empty list")
        return v

    def routing_text(self) -> str:
        if isinstance(self.input, str):
            return self.input
        return "\n".join(x for x in self.input if isinstance(x, str))

    def estimate_messages(self) -> list[ChatMessage]:
        """The inputs as text; token-id inputs as their ids in decimal, space-separated (each id is at least
        one token of that text: the bound holds)."""
        items = [self.input] if isinstance(self.input, str) else self.input
        texts = [x if isinstance(x, str) else " ".join(str(t) for t in (x if isinstance(x, list) else [x]))
                 for x in items]
        return [_message([TextPart(type="text", text="\n".join(texts))])]

    def output_bound(self) -> int | None:
        return 1  # embeddings produce no output tokens; 1 is the estimate's least bound


EndpointRequest = ResponsesRequest | MessagesRequest | EmbeddingsRequest


def parse_endpoint_request(cls: type[RequestT], data: Any) -> RequestT:
    """``data`` validated as ``cls`` (:func:`gateway.protocol.parse_request`: a 400 naming the first invalid field
    otherwise)."""
    return parse_request(cls, data)


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """An error on ``/v1/messages``: ``{"type": "error", "error": {"type", "message"}}``."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail
