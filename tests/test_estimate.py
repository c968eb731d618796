"""The budget estimate (gateway/serving/estimate.py) counts everything a provider bills (issue 10, row 1).

The landed estimate counted message text / 4 + ``max_tokens`` (512 when absent): 200 KB of ``tools`` with
``max_tokens: 1`` was priced as a few tokens. Each test below breaks that.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.config import BudgetConfig, parse_config
from gateway.protocol import parse_chat_request
from gateway.serving.estimate import Estimate, Estimator, count_text, counted_completion
from gateway.serving.registry import ModelEntry, Registry

CFG = BudgetConfig()


def entry(name: str = "m", model: str = "openai/unknown-model-xyz", **kw: Any) -> ModelEntry:
    spec = {"name": name, "router_cost": 1.0, "input_cost_per_1m": 1.0, "output_cost_per_1m": 4.0,
            "litellm_params": {"model": model, "api_key": "t"}, **kw}
    e = Registry.from_config(parse_config({"models": [spec]})).get(name)
    assert e is not None
    return e


def req(**kw: Any) -> Any:
    return parse_chat_request({"model": "auto", "messages": [{"role": "user", "content": "hi"}], **kw})


def big_tools(total_bytes: int) -> list[dict[str, Any]]:
    desc = "Look up the weather for a city and return a long forecast with many details. " * 40
    out: list[dict[str, Any]] = []
    while len(json.dumps(out)) < total_bytes:
        out.append({"type": "function", "function": {"name": f"tool_{len(out)}", "description": desc,
                                                      "parameters": {"type": "object", "properties": {
                                                          "city": {"type": "string", "description": desc}}}}})
    return out


def test_tools_are_counted_at_least_as_the_tokenizer_counts_them() -> None:
    tools = big_tools(200_000)
    est = Estimator().estimate(req(tools=tools, max_tokens=1), [entry()])
    counted = count_text("openai/gpt-4o", json.dumps(tools))
    assert counted is not None and counted > 10_000
    assert est.prompt_tokens >= counted * CFG.prompt_factor  # the landed estimate: ~1 token
    assert est.prompt_tokens >= CFG.tool_prompt_tokens
    without = Estimator().estimate(req(max_tokens=1), [entry()])
    assert without.prompt_tokens < 200  # a short prompt stays cheap


def test_a_short_prompt_is_bounded_by_its_bytes() -> None:
    text = "héllo wörld " * 20
    est = Estimator().estimate(req(messages=[{"role": "user", "content": text}], max_tokens=5), [entry()])
    assert est.prompt_tokens == (len(text.encode()) + CFG.prompt_slack_tokens + CFG.message_overhead_tokens)
    counted = count_text("openai/gpt-4o", text)
    assert counted is not None and counted < len(text.encode())


def test_without_a_budget_a_long_prompt_is_bounded_by_its_bytes_and_never_tokenized(
        monkeypatch: pytest.MonkeyPatch) -> None:
    text = "Summarise this report section by section. " * 400  # ~17 KB: tokenized for a budgeted key
    long = req(messages=[{"role": "user", "content": text}], max_tokens=5, tools=big_tools(20_000),
               prediction={"type": "content", "content": "x " * 3000})
    budgeted = Estimator().estimate(long, [entry()])
    calls: list[str] = []
    import gateway.serving.estimate as estimate_module

    real = estimate_module.count_text

    def counting(model: str, t: str) -> int | None:
        calls.append(t)
        return real(model, t)

    monkeypatch.setattr(estimate_module, "count_text", counting)
    free = Estimator().estimate(long, [entry()], budgeted=False)
    assert calls == []  # the fast path of a key without a budget counts no tokens
    n_bytes = len("\n".join([text, *(json.dumps(t, ensure_ascii=False) for t in long.model_dump(
        exclude_none=True)["tools"])]).encode())
    assert free.prompt_tokens == (n_bytes + CFG.prompt_slack_tokens + CFG.message_overhead_tokens
                                  + CFG.tool_prompt_tokens)
    assert free.output_tokens == 5 + 6000  # the prediction's text by its bytes too
    # never below the budgeted (tokenized) bound: the reservation a key gets is never smaller for it
    assert free.prompt_tokens >= budgeted.prompt_tokens and free.output_tokens >= budgeted.output_tokens
    assert budgeted.prompt_tokens < n_bytes  # the budgeted bound is the tighter, tokenized one
    # the usage sanity check still refuses what no prompt of these bytes could bill
    assert free.plausible("m", n_bytes, 5) and not free.plausible("m", 10 * n_bytes, 5)


def test_response_format_schema_names_and_tool_calls_are_counted() -> None:
    schema = {"name": "s", "schema": {"type": "object", "properties": {f"field_{i}": {"type": "string",
              "description": "x" * 200} for i in range(50)}}}
    plain = Estimator().prompt_tokens(req(), "openai/gpt-4o")
    with_schema = Estimator().prompt_tokens(req(response_format={"type": "json_schema", "json_schema": schema}),
                                            "openai/gpt-4o")
    counted = count_text("openai/gpt-4o", json.dumps(schema))
    assert counted is not None and with_schema - plain >= counted * CFG.prompt_factor
    calls = req(messages=[{"role": "user", "content": "hi"},
                          {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                              "name": "f", "arguments": json.dumps({"q": "y" * 3000})}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "ok"}])
    assert Estimator().prompt_tokens(calls, "openai/gpt-4o") > 3000 * 0.1


def test_images_by_formula_and_never_fetched() -> None:
    def image(detail: str | None) -> dict[str, Any]:
        url: dict[str, Any] = {"url": "http://127.0.0.1:9/never-fetched.png"}
        if detail:
            url["detail"] = detail
        return {"role": "user", "content": [{"type": "text", "text": "what is it"}, {"type": "image_url",
                                                                                     "image_url": url}]}
    base = Estimator().prompt_tokens(req(messages=[{"role": "user", "content": "what is it"}]), "openai/gpt-4o")
    high = Estimator().prompt_tokens(req(messages=[image(None), image("high")]), "openai/gpt-4o")
    low = Estimator().prompt_tokens(req(messages=[image("low")]), "openai/gpt-4o")
    assert low - base == CFG.low_detail_image_tokens
    assert high >= 2 * CFG.image_tokens


def test_output_bound_is_max_tokens_times_n() -> None:
    e = entry()
    est = Estimator().estimate(req(max_tokens=100, n=3), [e])
    assert est.output_tokens == 300 and est.output_source == "max_tokens" and est.force_max_tokens is None
    est = Estimator().estimate(req(max_completion_tokens=50, max_tokens=70), [e])
    assert est.output_tokens == 70
    assert est.usd == pytest.approx(est.prompt_tokens * e.input_cost_per_token + 70 * e.output_cost_per_token)


def test_without_max_tokens_the_models_max_output_or_the_default_which_is_then_forced() -> None:
    registry_max = entry(max_output_tokens=1234)
    est = Estimator().estimate(req(), [registry_max])
    assert (est.output_tokens, est.output_source, est.force_max_tokens) == (1234, "registry", None)
    known = entry(model="openai/gpt-4o-mini")  # LiteLLM's offline model info knows it
    est = Estimator().estimate(req(n=2), [known])
    assert est.output_source == "litellm" and est.output_tokens == 2 * 16384 and est.force_max_tokens is None
    unknown = entry()
    est = Estimator(BudgetConfig(default_max_output_tokens=999)).estimate(req(), [unknown])
    assert (est.output_tokens, est.output_source, est.force_max_tokens) == (999, "default", 999)
    est = Estimator(BudgetConfig(default_max_output_tokens=999)).estimate(req(), [unknown], budgeted=False)
    assert est.force_max_tokens is None  # a key without a budget is not truncated


def test_the_dearest_model_tried_is_reserved() -> None:
    cheap = entry("cheap", input_cost_per_1m=0.1, output_cost_per_1m=0.2, max_output_tokens=100)
    dear = entry("dear", input_cost_per_1m=10.0, output_cost_per_1m=40.0, max_output_tokens=50)
    est = Estimator().estimate(req(), [cheap, dear])
    assert est.model == "dear" and est.output_by_model == {"cheap": 100, "dear": 50}
    assert est.usd == pytest.approx(est.prompt_tokens * 10e-6 + 50 * 40e-6)


@pytest.mark.parametrize(("pt", "ct", "ok"), [
    (10, 10, True), (None, None, True), (-1, 10, False), (10, -5, False), (10**12, 10, False), (10, 10**9, False),
    (float("inf"), 1, False), (float("nan"), 1, False), (1.5, 1, False), (True, 1, False), ("7", 1, False),
])
def test_usage_sanity(pt: Any, ct: Any, ok: bool) -> None:
    est = Estimate(prompt_tokens=100, output_tokens=50, usd=0.0, model="m", output_by_model={"m": 50}, tolerance=2.0)
    assert est.plausible("m", pt, ct) is ok


def test_counted_completion_counts_content_and_tool_arguments() -> None:
    from openai.types.chat import ChatCompletion

    resp = ChatCompletion.model_validate({
        "id": "x", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "a " * 100,
                     "tool_calls": [{"id": "c", "type": "function",
                                     "function": {"name": "f", "arguments": "b " * 100}}]}}]})
    assert counted_completion("openai/gpt-4o", resp) >= 190


# -- the other endpoints: the request as the estimate reads it (protocol_endpoints.estimate_request) -----------

def test_other_endpoints_are_estimated_on_everything_they_bill() -> None:
    from gateway.protocol_endpoints import EmbeddingsRequest, MessagesRequest, ResponsesRequest
    from gateway.serving.operations import operation

    est, e = Estimator(CFG), entry()
    tools = big_tools(20_000)
    anthropic_tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
                        "input_schema": t["function"]["parameters"]} for t in tools]
    result = {"type": "tool_result", "tool_use_id": "t1", "content": "sunny " * 500}
    msgs = MessagesRequest.model_validate({"model": "auto", "max_tokens": 7, "tools": anthropic_tools, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "tool_0", "input": {"c": "x"}}]},
        {"role": "user", "content": [result]}]})
    m = est.estimate(msgs.estimate_request(), [e])
    assert m.prompt_tokens >= len(json.dumps(anthropic_tools)) // 4 + len(result["content"]) // 4 \
        + CFG.tool_prompt_tokens + CFG.image_tokens
    assert m.output_tokens == 7 and m.force_max_tokens is None

    resp = ResponsesRequest.model_validate({"model": "auto", "instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                     {"type": "input_image", "image_url": "http://x/y.png", "detail": "low"}]},
        {"type": "function_call_output", "call_id": "c1", "output": "rain " * 400}]})
    r = est.estimate(resp.estimate_request(), [e])
    assert r.prompt_tokens >= len("rain " * 400) // 4 + CFG.low_detail_image_tokens
    assert r.output_source == "default" and r.force_max_tokens == CFG.default_max_output_tokens
    assert operation(resp).payload(r.force_max_tokens)["max_output_tokens"] == CFG.default_max_output_tokens
    assert "max_output_tokens" not in operation(resp).payload(None)

    ids = EmbeddingsRequest.model_validate({"model": "emb", "input": [[1, 2, 3] * 300]})
    assert est.estimate(ids.estimate_request(), [e]).prompt_tokens >= 900  # each token id is at least a token
