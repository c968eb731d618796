"""CPU cost of the budget estimate per request (gateway/serving/estimate.py), against the estimate it replaced.

The estimate runs on every chat request, on the event loop for bodies up to ``limits.offload_bytes``. The
issue's bar: the fast path may not get more than 10% slower. This measures, in one process, the time per call of

- ``landed``: the estimate before issue 10 (message characters / 4 + ``max_tokens`` or 512: cheap and wrong),
- ``estimator``: :class:`gateway.serving.estimate.Estimator` (every billed part, bounded),
- ``token_counter``: one ``litellm.token_counter(messages=...)`` call (what counting with LiteLLM costs),

on a typical small request (a system and a user message, ``max_tokens`` set; and one without it), a 10 KB
prompt (tokenized for a key with a budget; bounded by its bytes for one without: the "key without budget"
column), and with 200 KB of ``tools`` (run off the event loop in the gateway). Compare the per-call figure with the gateway's
CPU per request in docs/PERFORMANCE.md (~4-6 ms non-streaming).

    python -m benchmarks.estimate_cost --calls 20000
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import gateway  # noqa: F401  (offline environment before litellm is imported)
from gateway.config import parse_config
from gateway.protocol import ChatCompletionRequest, parse_chat_request
from gateway.serving.estimate import Estimator
from gateway.serving.registry import ModelEntry, Registry


def landed(req: ChatCompletionRequest, entry: ModelEntry) -> float:
    """The estimate the gateway had before issue 10 (ChatService._estimate)."""
    chars = sum(len(m.text()) for m in req.messages)
    out = req.max_completion_tokens or req.max_tokens or 512
    return (chars / 4) * entry.input_cost_per_token + out * (req.n or 1) * entry.output_cost_per_token


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    for _ in range(min(200, calls)):
        fn()
    best = float("inf")
    for _ in range(3):  # best of 3 rounds: the machine is shared
        t0 = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - t0) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args(argv)
    import litellm

    cfg = parse_config({"models": [{"name": "m", "router_cost": 1.0, "input_cost_per_1m": 0.15,
                                    "output_cost_per_1m": 0.6, "litellm_params": {"model": "openai/gpt-4o-mini"}}]})
    entry = Registry.from_config(cfg).get("m")
    assert entry is not None
    estimator = Estimator()
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                {"role": "user", "content": "Which is larger, the Pacific or the Atlantic ocean, and by how much? "
                                            "Give the areas in square kilometres."}]
    tool = {"type": "function", "function": {"name": "lookup", "description": "word " * 400,
                                             "parameters": {"type": "object", "properties": {}}}}
    cases: dict[str, dict[str, Any]] = {
        "small, max_tokens": {"model": "m", "messages": messages, "max_tokens": 256},
        "small, no max_tokens": {"model": "m", "messages": messages},
        "10 KB prompt": {"model": "m", "max_tokens": 256, "messages": [
            messages[0], {"role": "user", "content": "Summarise this report section by section. " * 240}]},
        "200 KB tools": {"model": "m", "messages": messages, "max_tokens": 1,
                         "tools": [tool] * (200_000 // len(json.dumps(tool)) + 1)},
    }
    print("| request | landed µs | estimator µs | estimator, key without budget µs | "
          "litellm.token_counter(messages) µs | calls |")
    print("|---|---|---|---|---|---|")
    for name, body in cases.items():
        req = parse_chat_request(body)
        msgs = body["messages"]
        calls = args.calls if "KB" not in name else max(5, args.calls // (1000 if "tools" in name else 20))
        a = per_call_us(functools.partial(landed, req, entry), calls)
        b = per_call_us(functools.partial(estimator.estimate, req, [entry]), calls)
        free = per_call_us(functools.partial(estimator.estimate, req, [entry], budgeted=False), calls)
        c = per_call_us(functools.partial(litellm.token_counter, model=entry.litellm_model, messages=msgs),
                        max(5, calls // 10))
        print(f"| {name} | {a:.1f} | {b:.1f} | {free:.1f} | {c:.1f} | {calls} |")


if __name__ == "__main__":
    main()
