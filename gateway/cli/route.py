"""``uniroute route "prompt" [--lambda X] [--url URL]``: the routing dry-run of a running gateway.

It posts the prompt to ``POST /v1/route`` of the gateway at ``--url`` (default ``$UNIROUTE_URL``, else
``http://127.0.0.1:8000``) with the key of ``--key`` (default ``$UNIROUTE_API_KEY``), so the answer is the
one the gateway's own registry, profiles, cooldowns and the key's λ range and models give — nothing is
loaded in the CLI process, and no model is called or charged. ``--json`` prints the answer as it came.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "UNIROUTE_URL"
KEY_ENV = "UNIROUTE_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (routed on as the last user message)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="λ for this request (default: the key's); within the key's λ range")
    p.add_argument("--model", default="auto", help="a model name instead of auto (checks access; nothing is ranked)")
    p.add_argument("--url", default=None, help=f"the gateway (default: ${URL_ENV} or {DEFAULT_URL})")
    p.add_argument("--key", default=None, help=f"API key (default: ${KEY_ENV}; none for auth.mode: open)")
    p.add_argument("--top", type=int, default=10, help="ranking rows to print (default 10; --json has all)")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON answer")


def fetch(url: str, prompt: str, *, lam: float | None = None, key: str | None = None, model: str = "auto",
          timeout_s: float = 30.0) -> dict[str, Any]:
    """The gateway's ``/v1/route`` answer for ``prompt``; a refusal raises ValueError with the gateway's message."""
    import httpx

    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if lam is not None:
        body["uniroute"] = {"lambda": lam}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    target = url.rstrip("/").removesuffix("/v1") + "/v1/route"
    try:
        r = httpx.post(target, json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach the gateway at {target} ({type(exc).__name__}: {exc}); start it with "
                         f"`uniroute serve` or pass --url") from None
    return gateway_answer(r, target, "the gateway refused the dry-run")


def gateway_answer(r: Any, target: str, refused: str = "the gateway refused") -> dict[str, Any]:
    """The JSON body of the gateway's 200 answer ``r`` (an httpx response from ``target``); anything else raises
    ValueError with the gateway's own message (the CLI prints it as one line)."""
    try:
        data = r.json()
    except ValueError:
        raise ValueError(f"{target} answered {r.status_code} without JSON: is it a UniRoute gateway?") from None
    if r.status_code != 200:
        message = (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        raise ValueError(f"{refused} ({r.status_code}): {message or data}")
    return dict(data)


def format_report(report: dict[str, Any], top: int = 10) -> str:
    lines = [f"model: {report['model']}  (λ = {report['lambda']:g}, key {report['key']}, "
             f"profile {report.get('profile') or '-'}, charged {report['charged_usd']:g} USD)"]
    if report.get("cluster") is not None:
        z = report.get("membership") or []
        lines.append(f"cluster: {report['cluster']}" + (f" (z = {max(z):.3f})" if z else ""))
    lines.append("would try: " + (" → ".join(report["fallback_order"]) or "-"))
    if report["ranking"]:
        lines += ["", f"{'rank':>4}  {'model':<40} {'exp. error':>10} {'cost':>8} {'objective':>10}"]
        for row in report["ranking"][:top]:
            cool = "  (cooling)" if row.get("cooling") else ""
            lines.append(f"{row['rank']:>4}  {row['model']:<40} {row['expected_error']:>10.4f} {row['cost']:>8.4f} "
                         f"{row['objective']:>10.4f}{cool}")
        if len(report["ranking"]) > top:
            lines.append(f"      … {len(report['ranking']) - top} more (--top N, --json)")
    if report["excluded"]:
        lines += ["", "excluded:"] + [f"  {e['model']}: {e['code']}: {e['reason']}" for e in report["excluded"]]
    return "\n".join(lines)


def route_command(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    key = args.key or os.environ.get(KEY_ENV) or None
    report = fetch(url, args.prompt, lam=args.lam, key=key, model=args.model)
    print(json.dumps(report, indent=2) if args.json else format_report(report, args.top))
    return 0
