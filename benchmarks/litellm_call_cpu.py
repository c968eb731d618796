"""CPU per ``litellm.acompletion`` call of the gateway's forwarder, with its LiteLLM switches off and on.

In one process: the replay upstream (``uniroute replay``) runs on loopback in its own process (pinned
to CPU 1 when there are 2+ CPUs, this process to CPU 0); each variant is a
:class:`~gateway.serving.forwarding.LiteLLMUpstream` built with some of its switches, and
``LiteLLMUpstream.complete`` (or ``.stream``, read to the end, with ``--stream``) is called
sequentially. The variants are measured in turn, ``--calls`` calls per variant and round, for
``--rounds`` rounds (so that the shared machine's drift hits every variant alike); the CPU of the
whole process (all threads, ``time.process_time``) per call is reported as the median over the rounds
and its spread (min-max of the rounds); "vs none" is the median over the rounds of the difference to
``none`` measured in the same round, with the share of rounds in which the variant cost less. Variants:

- ``none``: both switches off (what the gateway did before them);
- ``pass_provider``: the entry's provider prefix passed as ``custom_llm_provider``;
- ``skip_litellm_cost``: LiteLLM's own response cost not computed during the call;
- ``gateway``: both (the gateway's default);
- ``gateway + NAME=JSON`` for each ``--litellm-set``: the default plus a LiteLLM module flag, set only
  while that variant runs (e.g. ``disable_add_transform_inline_image_block=true``).

    python -m benchmarks.litellm_call_cpu --calls 25 --rounds 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gateway  # noqa: F401  (sets LiteLLM's offline environment before anything imports litellm)
from benchmarks.overhead import replay_on_cpu1, versions

SWITCHES: dict[str, dict[str, bool]] = {
    "none": {"skip_litellm_cost": False, "pass_provider": False},
    "pass_provider": {"skip_litellm_cost": False, "pass_provider": True},
    "skip_litellm_cost": {"skip_litellm_cost": True, "pass_provider": False},
    "gateway": {"skip_litellm_cost": True, "pass_provider": True},
}


@contextlib.contextmanager
def litellm_flags(flags: dict[str, Any]) -> Iterator[None]:
    """LiteLLM module attributes set to ``flags`` meanwhile, restored after."""
    import litellm

    old = {name: getattr(litellm, name) for name in flags}
    for name, value in flags.items():
        setattr(litellm, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(litellm, name, value)


async def run(base: str, model: str, prompts: Sequence[str], calls: int, rounds: int, stream: bool,
              extra: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    from gateway.serving.forwarding import LiteLLMUpstream
    from gateway.serving.registry import ModelEntry, RegistrySnapshot

    entry = ModelEntry(name=model, litellm_params={"model": f"openai/{model}", "api_base": base, "api_key": "x"},
                       input_cost_per_token=1e-6, output_cost_per_token=2e-6, router_cost=1.0, timeout_s=30.0)
    variants: list[tuple[str, LiteLLMUpstream, dict[str, Any]]] = []
    for name, switches in SWITCHES.items():
        up = LiteLLMUpstream(skip_litellm_cost=switches["skip_litellm_cost"], pass_provider=switches["pass_provider"])
        variants.append((name, up, {}))
    for label, flags in extra.items():
        variants.append((f"gateway + {label}", LiteLLMUpstream(), flags))
    for _, up, _ in variants:
        up.register(RegistrySnapshot.build([entry]))
    params: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}

    async def call(up: LiteLLMUpstream, prompt: str) -> None:
        messages = [{"role": "user", "content": prompt}]
        if stream:
            async for _ in await up.stream(entry, messages, params):
                pass
        else:
            await up.complete(entry, messages, params)

    per_call: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    k = 0
    for rnd in range(rounds + 1):  # round 0: warm-up, not counted
        for name, up, flags in variants:
            n = calls if rnd else 20
            with litellm_flags(flags):
                c0 = time.process_time()
                for _ in range(n):
                    await call(up, prompts[k % len(prompts)])
                    k += 1
                cpu = time.process_time() - c0
            if rnd:
                per_call[name].append(1000 * cpu / n)
    for _, up, _ in variants:
        await up.aclose()
    rows = []
    for name, values in per_call.items():
        # vs none: the median over the rounds of (this variant − none) in the same round, which the machine's
        # drift between rounds does not move as much as a difference of the two medians
        paired = [v - b for v, b in zip(values, per_call["none"], strict=True)]
        rows.append({"variant": name, "stream": stream, "calls": calls * rounds,
                     "cpu_ms_per_call": statistics.median(values), "min_round": min(values), "max_round": max(values),
                     "vs_none_ms": statistics.median(paired),
                     "rounds_below_none": sum(d < 0 for d in paired) / len(paired), "rounds": values})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.litellm_call_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--calls", type=int, default=25, help="calls per variant and round")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--stream", action="store_true", help="streamed calls, each read to its end")
    ap.add_argument("--litellm-set", action="append", default=[], metavar="NAME=JSON",
                    help="one more variant: the gateway's default plus this LiteLLM module flag")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.calls < 1 or args.rounds < 1:
        ap.error("--calls and --rounds must be >= 1")

    import litellm  # after ``gateway`` (imported at the top): the offline environment is set

    extra: dict[str, dict[str, Any]] = {}
    for item in args.litellm_set:
        name, _, value = item.partition("=")
        if not hasattr(litellm, name):
            ap.error(f"litellm has no attribute {name!r}")
        extra[item] = {name: json.loads(value)}
    tmp = Path(tempfile.mkdtemp(prefix="uniroute-litellmcpu-"))
    with replay_on_cpu1(args.dataset, tmp) as (base, models, prompts):
        rows = asyncio.run(run(base, models[0], prompts, args.calls, args.rounds, args.stream, extra))
    print("| variant | stream | calls | CPU ms/call (median of rounds) | rounds min-max | vs none (paired) "
          "| rounds below none |")
    print("|---|---|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['stream']} | {r['calls']} | {r['cpu_ms_per_call']:.2f} | "
              f"{r['min_round']:.2f}-{r['max_round']:.2f} | {r['vs_none_ms']:+.2f} | {r['rounds_below_none']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions(), "results": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
