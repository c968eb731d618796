"""CPU cost of one upstream call, by client: raw httpx, the openai SDK, litellm.acompletion, the gateway's Forwarder.

Attributes the gateway's per-request overhead (see :mod:`benchmarks.overhead`): the same
sequential requests go to the replay upstream through each client, in one process, and the
process CPU time (all threads, ``time.process_time``) and wall time per call are reported.
The replay upstream runs in its own process (pinned to CPU 1 when there are 2+ CPUs; this
process to CPU 0).

    python -m benchmarks.forwarding_cost --calls 400
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

import gateway  # noqa: F401  (sets LiteLLM's offline environment before anything imports litellm)
from benchmarks.overhead import replay_on_cpu1, versions

Call = Callable[[str, bool], Awaitable[None]]


async def measure(name: str, call: Call, prompts: Sequence[str], calls: int, stream: bool) -> dict[str, Any]:
    for p in prompts[:20]:  # warm-up
        await call(p, stream)
    walls: list[float] = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    for k in range(calls):
        t = time.perf_counter()
        await call(prompts[k % len(prompts)], stream)
        walls.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {"client": name, "stream": stream, "calls": calls,
            "cpu_ms_per_call": 1000 * cpu / calls, "wall_p50_ms": 1000 * statistics.median(walls),
            "wall_mean_ms": 1000 * wall / calls}


async def run(base: str, model: str, prompts: Sequence[str], calls: int) -> list[dict[str, Any]]:
    import litellm
    import openai

    url = f"{base}/chat/completions"
    hx = httpx.AsyncClient(timeout=30)
    oa = openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0)

    def body(p: str, stream: bool) -> dict[str, Any]:
        b: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": p}]}
        if stream:
            b |= {"stream": True, "stream_options": {"include_usage": True}}
        return b

    async def call_httpx(p: str, stream: bool) -> None:
        if stream:
            async with hx.stream("POST", url, json=body(p, True)) as r:
                async for _ in r.aiter_lines():
                    pass
        else:
            (await hx.post(url, json=body(p, False))).json()

    async def call_openai(p: str, stream: bool) -> None:
        b = body(p, stream)
        if stream:
            s = await oa.chat.completions.create(**b)
            async for _ in s:
                pass
        else:
            await oa.chat.completions.create(**b)

    async def call_litellm(p: str, stream: bool) -> None:
        b = body(p, stream)
        b["model"] = f"openai/{model}"
        r = await litellm.acompletion(api_base=base, api_key="x", timeout=30, **b)
        if stream:
            async for _ in r:
                pass

    from gateway.serving.forwarding import HTTP_CLIENTS, Forwarder, LiteLLMUpstream
    from gateway.serving.registry import ModelEntry, Registry

    entry = ModelEntry(name=model, litellm_params={"model": f"openai/{model}", "api_base": base, "api_key": "x"},
                       input_cost_per_token=1e-6, output_cost_per_token=2e-6, router_cost=1.0, timeout_s=30.0)
    # aiohttp (default) and httpx
    forwarders = {kind: Forwarder(upstream=LiteLLMUpstream(http_client=kind)) for kind in HTTP_CLIENTS}
    for fw in forwarders.values():
        Registry([entry]).on_replace(fw.register)

    def call_forwarder(fw: Forwarder) -> Call:
        async def call(p: str, stream: bool) -> None:
            msgs = [{"role": "user", "content": p}]
            if stream:
                opened = await fw.open_stream([entry], msgs, {"stream_options": {"include_usage": True}})
                async for _ in opened.rest:
                    pass
            else:
                await fw.complete([entry], msgs, {})
        return call

    clients: list[tuple[str, Call]] = [("httpx", call_httpx), ("openai SDK", call_openai),
                                       ("litellm.acompletion", call_litellm)]
    clients += [(f"gateway Forwarder ({kind})", call_forwarder(fw)) for kind, fw in forwarders.items()]
    rows = []
    for stream in (False, True):
        for name, fn in clients:
            rows.append(await measure(name, fn, prompts, calls, stream))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    await hx.aclose()
    await oa.close()
    for fw in forwarders.values():
        await fw.aclose()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.forwarding_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--stream-chunks", type=int, default=None, help="content chunks per streamed answer "
                                                                    "(default: the replay upstream's, one per word)")
    ap.add_argument("--litellm-set", action="append", default=[], metavar="NAME=JSON",
                    help="set a litellm module attribute first, e.g. disable_streaming_logging=true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import litellm  # after ``gateway`` (imported at the top): the offline environment is set

    for item in args.litellm_set:
        name, _, value = item.partition("=")
        if not hasattr(litellm, name):
            ap.error(f"litellm has no attribute {name!r}")
        setattr(litellm, name, json.loads(value))
    tmp = Path(tempfile.mkdtemp(prefix="uniroute-fwdcost-"))
    extra = ["--stream-chunks", str(args.stream_chunks)] if args.stream_chunks else []
    with replay_on_cpu1(args.dataset, tmp, *extra) as (base, models, prompts):
        rows = asyncio.run(run(base, models[0], prompts, args.calls))
    print("| client | stream | calls | CPU ms/call | wall p50 ms |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['client']} | {r['stream']} | {r['calls']} | {r['cpu_ms_per_call']:.2f} | {r['wall_p50_ms']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions(), "results": rows}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
