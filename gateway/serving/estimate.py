"""What a chat request may cost at most, before it is sent: the figure a key's budget reserves.

A budget is a hard cap (docs/security/budgets.md) only if the reservation bounds what the provider
bills. :class:`Estimator` bounds both sides of the bill:

- **Prompt**: everything the provider bills as input — every message's text and content parts, names,
  tool calls and their arguments, the message's other fields, ``tools``/``functions`` and a
  ``response_format`` JSON schema (as JSON text), ``budget.message_overhead_tokens`` per message,
  ``budget.prompt_slack_tokens``, ``budget.tool_prompt_tokens`` when tools are given (the system
  prompt a provider writes around them), and images by formula: ``budget.low_detail_image_tokens`` for
  ``detail: low``, else ``budget.image_tokens`` (the largest documented formula; the image is never
  fetched: LiteLLM's counter would GET a client-chosen URL). The text is bounded by its UTF-8 byte
  count when it is short (``budget.bytes_bound_below``; a token of any byte-level tokenizer covers at
  least one byte, so this is a true bound and costs no tokenizing), else counted with LiteLLM's token
  counter for the first model tried × ``budget.prompt_factor`` (tokenizers differ per model), and never
  above the byte count. For a key without a budget nothing is reserved, so the text is bounded by its byte
  count whatever its length (never tokenized: the fast path pays no token counting for such keys; the usage
  sanity check below then reads that looser, still true, bound).
- **Output**: ``max_completion_tokens``/``max_tokens`` × ``n`` (+ a ``prediction``'s text: rejected
  predicted tokens are billed as completion), else the model's ``max_output_tokens`` from the registry,
  else LiteLLM's model info (its offline cost map), else ``budget.default_max_output_tokens``, which the
  chat service then sends upstream as ``max_tokens`` for a key with a budget, so it bounds the answer.

``auto`` may fall back: :meth:`Estimator.estimate` prices every model the forwarder will try
(``Forwarder.tries``) and reserves for the dearest, up front (no top-up later). :meth:`Estimator.each`
prices each candidate alone: a key with ``budget_policy: pace`` whose reservation does not fit is served
by the ranked candidates that do (docs/PACING.md).

:meth:`Estimate.plausible` is the usage sanity check: provider usage that is negative, not an integer,
or beyond ``budget.usage_tolerance`` × the bound is impossible for the request, and the chat service
replaces it by the counted figure (:func:`counted_completion`, ``Forwarder.partial_usage``).

No HTTP, no SQL: plain functions of the parsed request and the registry entries.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import gateway  # noqa: F401  (offline environment before litellm is imported)
from gateway.config import BudgetConfig
from gateway.protocol import ChatCompletionRequest, ChatMessage, ImagePart, TextPart
from gateway.serving.registry import ModelEntry

OutputSource = Literal["max_tokens", "registry", "litellm", "default"]


@dataclass(frozen=True)
class Estimate:
    """The most a request may cost: token bounds and USD, for the dearest model it may be served by."""

    prompt_tokens: int  # bound on the prompt tokens billed
    output_tokens: int  # bound on the completion tokens billed (the largest over the models tried)
    usd: float  # the reservation: the dearest model tried at these bounds
    model: str | None = None  # the model priced at ``usd``
    output_source: OutputSource = "max_tokens"  # where the output bound came from (of ``model``)
    force_max_tokens: int | None = None  # send this as ``max_tokens``: without it the output would be unbounded
    output_by_model: Mapping[str, int] = field(default_factory=dict)  # each tried model's output bound
    tolerance: float = 2.0  # budget.usage_tolerance

    def plausible(self, model: str, prompt_tokens: Any, completion_tokens: Any) -> bool:
        """Whether usage reported by ``model`` could be true for this request: integers ≥ 0, within
        ``tolerance`` × the bounds."""
        out_bound = self.output_by_model.get(model, self.output_tokens)
        for value, bound in ((prompt_tokens, self.prompt_tokens), (completion_tokens, out_bound)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                return False
            if value < 0 or value != int(value) or value > bound * self.tolerance:
                return False
        return True


class Estimator:
    """Builds an :class:`Estimate` of a request for the models it may be served by (``budget:`` config)."""

    def __init__(self, config: BudgetConfig | None = None) -> None:
        self.config = config or BudgetConfig()

    # -- the whole estimate -------------------------------------------------------------------------
    def estimate(self, req: ChatCompletionRequest, tries: Sequence[ModelEntry], *, budgeted: bool = True) -> Estimate:
        """The bound for ``req`` served by any of ``tries`` (the models the forwarder will try, in order).
        ``budgeted``: the key has a budget, so an output bound that is only the configured default is
        forced upstream as ``max_tokens``, and a long text is tokenized for a tighter bound; without a budget
        every text is bounded by its byte count (a true bound, never smaller: no token counting)."""
        cfg = self.config
        if not tries:
            return Estimate(0, 0, 0.0, tolerance=cfg.usage_tolerance)
        prompt = self.prompt_tokens(req, tries[0].litellm_model, tokenize=budgeted)
        extra_out = self._text_bound(_prediction_text(req), tries[0].litellm_model, tokenize=budgeted)
        best: tuple[float, ModelEntry, int, OutputSource] | None = None
        by_model: dict[str, int] = {}
        force: int | None = None
        for entry in tries:
            per_choice, source = self.output_bound(req, entry)
            if source == "default" and budgeted:
                force = cfg.default_max_output_tokens
            out = per_choice * (req.n or 1) + extra_out
            by_model[entry.name] = out
            usd = prompt * entry.input_cost_per_token + out * entry.output_cost_per_token
            if best is None or usd > best[0]:
                best = (usd, entry, out, source)
        assert best is not None
        usd, entry, _out, source = best
        return Estimate(prompt_tokens=prompt, output_tokens=max(by_model.values()), usd=usd, model=entry.name,
                        output_source=source, force_max_tokens=force, output_by_model=by_model,
                        tolerance=cfg.usage_tolerance)

    def each(self, req: ChatCompletionRequest, candidates: Sequence[ModelEntry]) -> list[float]:
        """The bound in USD for ``req`` served by each of ``candidates`` alone (the prompt bounded once, with the
        first candidate's counter, as :meth:`estimate` bounds it): what a paced key's degraded request picks
        the models that fit its remaining budget by (``ChatService._reserve``)."""
        if not candidates:
            return []
        prompt = self.prompt_tokens(req, candidates[0].litellm_model)
        extra_out = self._text_bound(_prediction_text(req), candidates[0].litellm_model)
        out: list[float] = []
        for entry in candidates:
            per_choice, _source = self.output_bound(req, entry)
            tokens = per_choice * (req.n or 1) + extra_out
            out.append(prompt * entry.input_cost_per_token + tokens * entry.output_cost_per_token)
        return out

    # -- prompt -------------------------------------------------------------------------------------
    def prompt_tokens(self, req: ChatCompletionRequest, model: str, *, counted: bool = False,
                      tokenize: bool = True) -> int:
        """Bound on the prompt tokens of ``req`` (see the module's docstring). ``counted``: the count instead of
        the bound — every part the same way, but the text by LiteLLM's counter alone (no byte bound, no
        ``prompt_factor``, no slack): the figure charged when the provider reports no usage or impossible usage.
        ``tokenize=False``: the text is bounded by its byte count however long it is (no token counting)."""
        cfg = self.config
        texts: list[str] = []
        images = 0
        for msg in req.messages:
            images += self._message(msg, texts)
        tools = req.tools or req.functions
        for tool in tools or ():
            texts.append(_dumps(tool.model_dump(exclude_none=True)))
        if req.response_format is not None and req.response_format.json_schema is not None:
            texts.append(_dumps(req.response_format.json_schema))
        text = "\n".join(texts)
        if counted:
            n = count_text(model, text) if text else 0
            tokens = n if n is not None else len(text) // 4
        else:
            tokens = self._text_bound(text, model, tokenize=tokenize) + cfg.prompt_slack_tokens
        tokens += cfg.message_overhead_tokens * len(req.messages) + images
        if tools:
            tokens += cfg.tool_prompt_tokens
        return tokens

    def _message(self, msg: ChatMessage, texts: list[str]) -> int:
        """Append ``msg``'s billed text to ``texts``; return its images' tokens."""
        images = 0
        content = msg.content
        if isinstance(content, str):
            texts.append(content)
        elif content is not None:
            for part in content:
                if isinstance(part, TextPart):
                    texts.append(part.text)
                elif isinstance(part, ImagePart):
                    low = part.image_url.detail == "low"
                    images += self.config.low_detail_image_tokens if low else self.config.image_tokens
                else:  # audio, file, ...: their JSON, base64 included (over-counts, never under)
                    texts.append(_dumps(part.model_dump(exclude_none=True)))
        if msg.name:
            texts.append(msg.name)
        for call in msg.tool_calls or ():
            texts.append(call.function.name)
            texts.append(call.function.arguments)
        if msg.function_call is not None:
            texts.append(msg.function_call.name)
            texts.append(msg.function_call.arguments)
        if msg.tool_call_id:
            texts.append(msg.tool_call_id)
        if msg.model_extra:
            texts.append(_dumps(msg.model_extra))
        return images

    def _text_bound(self, text: str, model: str, *, tokenize: bool = True) -> int:
        """Bound on the tokens of ``text``: its UTF-8 byte count when short (or when not ``tokenize``), else the
        counted tokens × ``prompt_factor`` (never above the byte count)."""
        if not text:
            return 0
        n_bytes = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if n_bytes <= self.config.bytes_bound_below or not tokenize:
            return n_bytes
        counted = count_text(model, text)
        if counted is None:
            return n_bytes
        return min(n_bytes, math.ceil(counted * self.config.prompt_factor))

    # -- output -------------------------------------------------------------------------------------
    def output_bound(self, req: ChatCompletionRequest, entry: ModelEntry) -> tuple[int, OutputSource]:
        """Bound on the completion tokens of ONE choice from ``entry``, and where it came from."""
        asked = [v for v in (req.max_completion_tokens, req.max_tokens) if v is not None]
        if asked:
            return max(asked), "max_tokens"
        if entry.max_output_tokens is not None:
            return entry.max_output_tokens, "registry"
        known = litellm_max_output(entry.litellm_model)
        if known is not None:
            return known, "litellm"
        return self.config.default_max_output_tokens, "default"


@functools.lru_cache(maxsize=1024)
def litellm_max_output(model: str) -> int | None:
    """``max_output_tokens`` (else ``max_tokens``) of ``model`` in LiteLLM's model info (its offline cost
    map), or None when it does not know the model."""
    import litellm

    for name in (model, model.split("/", 1)[-1]):
        try:
            info = litellm.get_model_info(name)
        except Exception:
            continue
        for k in ("max_output_tokens", "max_tokens"):
            v = info.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def count_text(model: str, text: str) -> int | None:
    """Tokens of ``text`` by LiteLLM's counter for ``model`` (None if it fails)."""
    import litellm

    try:
        return int(litellm.token_counter(model=model, text=text))
    except Exception:
        return None


def counted_completion(model: str, response: Any) -> int:
    """Completion tokens of a non-streaming answer, counted: every choice's content, refusal and tool-call
    arguments, by LiteLLM's counter for ``model`` (the figure that replaces an impossible usage)."""
    texts: list[str] = []
    for choice in getattr(response, "choices", None) or ():
        msg = getattr(choice, "message", None)
        if msg is None:
            continue
        texts.extend(t for t in (getattr(msg, "content", None), getattr(msg, "refusal", None)) if isinstance(t, str))
        for call in getattr(msg, "tool_calls", None) or ():
            fn = getattr(call, "function", None)
            texts.extend(t for t in (getattr(fn, "name", None), getattr(fn, "arguments", None)) if isinstance(t, str))
    text = "\n".join(texts)
    if not text:
        return 0
    counted = count_text(model, text)
    return counted if counted is not None else max(1, len(text) // 4)


def _prediction_text(req: ChatCompletionRequest) -> str:
    content = (req.prediction or {}).get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)  # with spaces: tokenizes to more, not fewer
