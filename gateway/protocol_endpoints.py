"""Wire models of the endpoints beyond chat completions: the OpenAI Responses API (``POST /v1/responses``),
the Anthropic Messages API (``POST /v1/messages``) and OpenAI embeddings (``POST /v1/embeddings``).

Each request model is validated here (a failure is a 400 naming the field, as for chat completions) and
offers what the chat service needs of any request (:class:`gateway.serving.service.RoutedRequest`): the
``model`` (``auto`` is routed, except for embeddings), the ``uniroute`` extension (λ), the text routed on
(:meth:`routing_text`: the last user turn), and :meth:`estimate_request`, the request as a chat completion
with the same text and output bound, which is what the budget estimate reads. :meth:`payload` is what goes
to LiteLLM: every declared field but the gateway's own (``model``, ``stream``, ``uniroute``). Unknown fields
are accepted and ignored, as on the chat endpoint.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from gateway.errors import InvalidRequestError
from gateway.protocol import ChatCompletionRequest, ChatMessage, UnirouteOptions, validation_error
from gateway.spec import NAME_MAX_LENGTH

#: The APIs the gateway serves, as the request log's ``endpoint`` column and the metrics' ``endpoint`` label.
ENDPOINTS = ("chat", "responses", "messages", "embeddings")
_GATEWAY_FIELDS = frozenset({"model", "stream", "uniroute"})
_DEFAULT_OUTPUT_TOKENS = 512  # the estimate's output bound when the request sets none (as for chat)


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
        if not v.isprintable():
            raise ValueError("a model name has no control characters; see GET /v1/models for the names")
        return v

    def routing_text(self) -> str:
        raise NotImplementedError

    def all_text(self) -> str:
        """Every text of the request (what the budget estimate counts)."""
        raise NotImplementedError

    def output_bound(self) -> int | None:
        return None

    def estimate_request(self) -> ChatCompletionRequest:
        """This request as a chat completion with the same text and output bound: what the estimate reads."""
        return ChatCompletionRequest(model=self.model, messages=[ChatMessage(role="user", content=self.all_text())],
                                     max_tokens=self.output_bound() or _DEFAULT_OUTPUT_TOKENS)

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


# --- POST /v1/responses ------------------------------------------------------------------------------------

_INPUT_TEXT = frozenset({"input_text", "text", "output_text"})


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

    def all_text(self) -> str:
        texts = [self.instructions or ""]
        if isinstance(self.input, str):
            texts.append(self.input)
        else:
            for item in self.input:
                texts.append(_text(item.get("content"), _INPUT_TEXT) or str(item.get("output") or "")
                             or str(item.get("arguments") or ""))
        return "\n".join(t for t in texts if t)

    def output_bound(self) -> int | None:
        return self.max_output_tokens


# --- POST /v1/messages (Anthropic) ---------------------------------------------------------------------------

_BLOCK_TEXT = frozenset({"text"})


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

    def all_text(self) -> str:
        texts = [_text(self.system, _BLOCK_TEXT) if self.system is not None else ""]
        for msg in self.messages:
            if isinstance(msg.content, str):
                texts.append(msg.content)
                continue
            for block in msg.content:
                value = block.get("text") or block.get("content") or block.get("input")
                texts.append(value if isinstance(value, str) else (str(value) if value else ""))
        return "\n".join(t for t in texts if t)

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
        return self.all_text()

    def all_text(self) -> str:
        if isinstance(self.input, str):
            return self.input
        return "\n".join(x for x in self.input if isinstance(x, str))

    def output_bound(self) -> int | None:
        return 1  # embeddings produce no output tokens; 1 is the estimate's least bound


EndpointRequest = ResponsesRequest | MessagesRequest | EmbeddingsRequest


def parse_endpoint_request(cls: type[_Request], data: Any) -> Any:
    """``data`` validated as ``cls`` (a 400 naming the first invalid field otherwise)."""
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """An error on ``/v1/messages``: ``{"type": "error", "error": {"type", "message"}}``."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail
