"""``uniroute route "prompt" [--lambda X] [--url URL] [--key NAME]``: the routing dry-run of a running gateway.

It posts the prompt to ``POST /v1/route`` of the gateway at ``--url`` (default ``$UNIROUTE_URL``, else
``http://127.0.0.1:8000``) with the API key of ``--api-key`` (default ``$UNIROUTE_API_KEY``), so the answer is
the one the gateway's own registry, profiles, cooldowns and the key's λ range and models give — nothing is
loaded in the CLI process, and no model is called or charged. ``--json`` prints the answer as it came.

``--key NAME`` is the operator's dry-run on behalf of the key named NAME (``POST /admin/keys/NAME/route`` with
the admin key of ``--admin-key``, default ``$UNIROUTE_ADMIN_KEY``): that key's λ (paced λ for a paced key),
tenant profile overlay and models, and the registered models it may not use, by name.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any
from urllib.parse import quote

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "UNIROUTE_URL"
KEY_ENV = "UNIROUTE_API_KEY"
ADMIN_ENV = "UNIROUTE_ADMIN_KEY"
RAW_KEY_PREFIX = "sk-ur-"  # gateway.access.auth.KEY_PREFIX (the CLI does not import the access layer for it)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (routed on as the last user message)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="λ for this request (default: the key's); within the key's λ range")
    p.add_argument("--model", default="auto", help="a model name instead of auto (checks access; nothing is ranked)")
    p.add_argument("--url", default=None, help=f"the gateway (default: ${URL_ENV} or {DEFAULT_URL})")
    p.add_argument("--api-key", default=None, help=f"API key (default: ${KEY_ENV}; none for auth.mode: open)")
    p.add_argument("--key", dest="key_name", default=None, metavar="NAME",
                   help="operator: the dry-run on behalf of the API key named NAME, with the models it may not use "
                        f"named (needs the admin key: --admin-key or ${ADMIN_ENV})")
    p.add_argument("--admin-key", default=None, help=f"with --key NAME (default: ${ADMIN_ENV})")
    p.add_argument("--top", type=int, default=10, help="ranking rows to print (default 10; --json has all)")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON answer")


def fetch(url: str, prompt: str, *, lam: float | None = None, key: str | None = None, model: str = "auto",
          timeout_s: float = 30.0, on_behalf_of: str | None = None) -> dict[str, Any]:
    """The gateway's ``/v1/route`` answer for ``prompt`` (``key``: the API key), or with ``on_behalf_of`` (a key's
    name; ``key`` is then the admin key) its ``/admin/keys/{name}/route`` answer; a refusal raises ValueError
    with the gateway's message."""
    import httpx

    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    if lam is not None:
        body["uniroute"] = {"lambda": lam}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    base = url.rstrip("/").removesuffix("/v1")
    target = base + "/v1/route" if on_behalf_of is None else f"{base}/admin/keys/{quote(on_behalf_of, safe='')}/route"
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
    view = "  [operator view]" if report.get("view") == "operator" else ""
    lines = [f"model: {report['model']}  (λ = {report['lambda']:g}, key {report['key']}, "
             f"profile {report.get('profile') or '-'}, charged {report['charged_usd']:g} USD){view}"]
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
    hidden = report.get("excluded_not_allowed") or 0
    if hidden and not any(e["code"] == "not_allowed" for e in report["excluded"]):
        lines.append(f"  and {hidden} registered model{'s' if hidden != 1 else ''} this key may not use "
                     f"(not_allowed; their names are shown to the operator only: --key NAME)")
    return "\n".join(lines)


def route_command(args: argparse.Namespace) -> int:
    url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    name = args.key_name
    if name is None:
        key = args.api_key or os.environ.get(KEY_ENV) or None
    else:
        if name.startswith(RAW_KEY_PREFIX):  # never put a raw key in a URL (access logs)
            raise ValueError(f"--key takes a key's name, not the key itself ({RAW_KEY_PREFIX}...): pass an API key "
                             f"with --api-key or ${KEY_ENV}")
        key = args.admin_key or os.environ.get(ADMIN_ENV) or None
        if not key:
            raise ValueError(f"--key NAME is the operator's dry-run on behalf of a key: it needs the admin key "
                             f"(--admin-key or ${ADMIN_ENV}); to dry-run as a key, pass its API key with --api-key "
                             f"or ${KEY_ENV}")
    report = fetch(url, args.prompt, lam=args.lam, key=key, model=args.model, on_behalf_of=name)
    print(json.dumps(report, indent=2) if args.json else format_report(report, args.top))
    return 0
