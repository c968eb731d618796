"""``uniroute profiles upload|show|delete --key NAME``: a key's tenant-private profile, through a running gateway.

The gateway maps the prompts to clusters with its own router, so the commands talk to it over HTTP
(``/admin/keys/{name}/profile``) at ``--url`` (default ``$UNIROUTE_URL``, else ``http://127.0.0.1:8000``) with
the admin key (``--admin-key``, default ``$UNIROUTE_ADMIN_KEY``).

The labels FILE is JSON Lines, one labelled prompt per line, or one JSON array of them::

    {"prompt": "Solve for x: 2x + 3 = 7", "scores": {"model-a": 0, "model-b": 1}}

(scores in [0, 1], 1 = right; a model a line does not score is not labelled by it).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from gateway.cli.route import DEFAULT_URL, URL_ENV, gateway_answer

ADMIN_ENV = "UNIROUTE_ADMIN_KEY"


def add_arguments(sub: Any) -> None:
    psub = sub.add_subparsers(dest="profiles_command", required=True, metavar="ACTION")
    q = psub.add_parser("upload", help="upload a key's labelled set (replaces its previous one)")
    q.add_argument("file", help="JSON Lines (or a JSON array) of {prompt, scores: {model: 0..1}}")
    q.set_defaults(handler_name="upload_command")
    q = psub.add_parser("show", help="the key's labels and its Ψ against the global Ψ")
    q.set_defaults(handler_name="show_command")
    q = psub.add_parser("delete", help="forget the key's labels (it routes with the global Ψ again)")
    q.set_defaults(handler_name="delete_command")
    for q in psub.choices.values():
        q.add_argument("--key", required=True, action="append",
                       help="the API key's name; repeat it for a group of keys (each gets the same labels)")
        q.add_argument("--url", default=None, help=f"the gateway (default: ${URL_ENV} or {DEFAULT_URL})")
        q.add_argument("--admin-key", default=None, help=f"default: ${ADMIN_ENV}")
        q.add_argument("--json", action="store_true", help="print the gateway's JSON answer")


def read_labels(path: str | Path) -> list[dict[str, Any]]:
    """The labelled prompts of ``path``; ValueError naming the file and line of the first bad one."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        rows = list(enumerate(data, 1))
        where = "item"
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        where = "line"
    for n, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("scores"), dict):
            raise ValueError(f"{path}: {where} {n}: expected {{\"prompt\": str, \"scores\": {{model: 0..1}}}}")
    if not rows:
        raise ValueError(f"{path}: no labelled prompt")
    return [row for _, row in rows]


def _call(args: argparse.Namespace, key: str, method: str, body: Any = None) -> dict[str, Any]:
    import httpx

    url = (args.url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/").removesuffix("/v1")
    admin = args.admin_key or os.environ.get(ADMIN_ENV)
    if not admin:
        raise ValueError(f"the admin key is needed: --admin-key or ${ADMIN_ENV}")
    target = f"{url}/admin/keys/{key}/profile"
    try:
        r = httpx.request(method, target, json=body, headers={"authorization": f"Bearer {admin}"}, timeout=300)
    except httpx.HTTPError as exc:
        raise ValueError(f"cannot reach the gateway at {target} ({type(exc).__name__}: {exc}); pass --url") from None
    return gateway_answer(r, target)


def format_profile(data: dict[str, Any]) -> str:
    lines = [f"key {data['key']}: {len(data.get('models', {}))} models labelled (prior weight m = "
             f"{data.get('prior_weight')})"]
    for model, row in data.get("models", {}).items():
        lines.append(f"  {model}: {row['labels']} labels, per cluster {row['labels_per_cluster']}")
        if "psi_key" in row:
            pairs = ", ".join(f"{g:.3f}→{k:.3f}" for g, k in zip(row["psi_global"], row["psi_key"], strict=True))
            lines.append(f"    Ψ global→key: {pairs}")
        else:
            lines.append(f"    {row.get('note', '')}")
    return "\n".join(lines)


def _print(args: argparse.Namespace, data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2) if args.json else format_profile(data))


def profiles_command(args: argparse.Namespace) -> int:
    labels = read_labels(args.file) if args.handler_name == "upload_command" else None
    for key in args.key:  # a group of keys: each gets the same labels (and its own overlay)
        if labels is not None:
            _print(args, _call(args, key, "POST", {"labels": labels}))
        elif args.handler_name == "show_command":
            _print(args, _call(args, key, "GET"))
        else:
            data = _call(args, key, "DELETE")
            print(json.dumps(data, indent=2) if args.json else
                  f"key {data['key']}: " + ("labels deleted" if data["deleted"] else "had no labels"))
    return 0
