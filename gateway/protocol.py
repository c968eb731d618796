"""Wire models of the OpenAI-compatible API, in OpenAI's field order.

Requests are validated here; any failure becomes a 400 naming the field
(:func:`validation_error`). Unknown request fields are accepted and ignored, as
OpenAI-compatible servers commonly do, so newer SDKs keep working.

The gateway adds one request field and one response field:

- request ``uniroute: {"lambda": float}`` — the cost/quality trade-off λ for this
  request (the OpenAI SDK sends it with ``extra_body={"uniroute": {"lambda": 0.3}}``);
- response ``uniroute`` (:class:`UnirouteInfo`) — the routing facts: request id, the
  model asked for and the one that served, the prompt's cluster, λ, the cost in USD,
  the ranked candidates and every upstream attempt. It is in the JSON body of a
  completion and in the LAST streamed chunk before ``data: [DONE]``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import InvalidRequestError
from gateway.spec import NAME_MAX_LENGTH

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
RequestT = TypeVar("RequestT", bound=BaseModel)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageUrl(_Open):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageUrl


class OtherPart(_Open):
    type: Literal["input_audio", "file", "refusal", "input_text"]


ContentPart = Annotated[TextPart | ImagePart | OtherPart, Field(discriminator="type")]
_parts = TypeAdapter(list[ContentPart])


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCall(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


_CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})


class ChatMessage(_Open):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            if not v:
                raise ValueError("content list must not be empty; give a string or at least one content part")
            return _parts.validate_python(v)
        raise ValueError(f"content must be a string or a list of content parts, got {type(v).__name__}")

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        # OpenAI requires content for these roles; without it LiteLLM fails (KeyError 'content' for
        # 'developer') and the client got a 502 after every fallback instead of a 400.
        if self.content is None and self.role in _CONTENT_REQUIRED:
            raise ValueError(f"a {self.role!r} message needs content (a string or a list of content parts); "
                             "only 'assistant' and 'function' messages may omit it")
        return self

    def text(self) -> str:
        """The message's text (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))


class StreamOptions(_Open):
    include_usage: StrictBool | None = None


class FunctionDefinition(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDefinition


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class UnirouteOptions(BaseModel):
    """The gateway's request extension."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lam: float | None = Field(default=None, alias="lambda", ge=0.0, allow_inf_nan=False)


def check_model_name(v: str) -> str:
    """A request's ``model``: printable (no model has control characters in its name; NUL and the like go no
    further), as every endpoint's request validates it."""
    if not v.isprintable():
        raise ValueError("a model name has no control characters; see GET /v1/models for the names")
    return v


class ChatCompletionRequest(_Open):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str = Field(min_length=1, max_length=NAME_MAX_LENGTH)
    audio: dict[str, Any] | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: StrictBool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    parallel_tool_calls: bool | None = None
    prediction: dict[str, Any] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    service_tier: str | None = None
    stop: str | list[str] | None = None
    store: bool | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    tools: list[Tool] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    user: str | None = None
    # legacy function calling
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None
    functions: list[FunctionDefinition] | None = None
    # gateway extension
    uniroute: UnirouteOptions | None = None

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return check_model_name(v)

    def routing_text(self) -> str:
        """The text the router sees: the LAST user message's text ('' if there is none).

        Routing on the latest user turn (not the whole conversation) keeps the embedding
        cheap and matches how the router was fitted (single prompts).
        """
        for msg in reversed(self.messages):
            if msg.role == "user":
                return msg.text()
        return ""


#: Request fields passed through to the backend (everything but the gateway's own).
PASSTHROUGH_FIELDS: tuple[str, ...] = tuple(
    name for name in ChatCompletionRequest.model_fields if name not in {"messages", "model", "stream", "uniroute"}
)


_PART_TAGS = frozenset({"text", "image_url", "input_audio", "file", "refusal", "input_text"})
_BRANCH_LABELS = frozenset({"str", "int", "float", "bool", "none"})


def _loc(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "content")`` -> ``"messages[0].content"``, without pydantic's union-branch labels."""
    out = ""
    prev: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (part in _BRANCH_LABELS or "[" in part or part.startswith("function-")
              or (isinstance(prev, int) and part in _PART_TAGS)):
            pass
        else:
            out += f".{part}" if out else part
        prev = part
    return out


def validation_error(exc: ValidationError) -> InvalidRequestError:
    """A 400 naming the first invalid field (and listing the others)."""
    errors = exc.errors(include_url=False)
    if not errors:
        return InvalidRequestError("invalid request body")
    first = errors[0]
    param = _loc(tuple(first["loc"])) or None
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "missing":
        message = f"missing required field '{param}'"
    elif first["type"] == "extra_forbidden":
        message = f"unknown field '{param}'"
    else:
        message = f"invalid value for '{param}': {msg}" if param else msg
    others = sorted({_loc(tuple(e["loc"])) for e in errors[1:]} - {param, ""})
    if others:
        message += f" (also invalid: {', '.join(others)})"
    return InvalidRequestError(message, param=param, code="invalid_value" if first["type"] != "missing" else "missing_field")


def parse_request(cls: type[RequestT], data: Any) -> RequestT:
    """``data`` (a parsed JSON body) validated as the request model ``cls``: a 400 if it is not a JSON object,
    or naming the first invalid field (:func:`validation_error`). Every endpoint's request is parsed here."""
    if not isinstance(data, dict):
        raise InvalidRequestError("request body must be a JSON object")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_chat_request(data: Any) -> ChatCompletionRequest:
    return parse_request(ChatCompletionRequest, data)


# --- responses --------------------------------------------------------------------------


class CandidateInfo(BaseModel):
    model: str
    expected_error: float
    cost: float


class AttemptInfo(BaseModel):
    model: str
    status: int
    error_type: str | None = None
    latency_ms: float


class UnirouteInfo(BaseModel):
    """The documented ``uniroute`` extension object of a response."""

    model_config = ConfigDict(populate_by_name=True)
    request_id: str  # the gateway's own id: what POST /v1/feedback addresses
    client_request_id: str | None = None  # the client's x-uniroute-client-request-id, echoed
    requested_model: str
    model: str | None
    cluster: int | None = None
    lam: float | None = Field(default=None, alias="lambda")
    cost_usd: float | None = None
    candidates: list[CandidateInfo] = Field(default_factory=list)
    attempts: list[AttemptInfo] = Field(default_factory=list)


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(_Open):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class Choice(_Open):
    index: int
    message: ResponseMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    uniroute: UnirouteInfo | None = None


class Delta(_Open):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChunkChoice(_Open):
    index: int
    delta: Delta
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    uniroute: UnirouteInfo | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
