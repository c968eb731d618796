"""The ``uniroute`` command line.

Each sub-command's handler is imported lazily, so ``uniroute --help`` stays fast and
heavy dependencies (torch, litellm) load only for the commands that need them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

import gateway  # noqa: F401  (sets the offline environment before anything imports litellm)


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """Return a handler that imports ``module:function`` on first call."""

    def run(args: argparse.Namespace) -> int:
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(args)
        return int(result or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniroute", description="UniRoute Gateway command line.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # --- gateway server ------------------------------------------------------------------
    p = sub.add_parser("serve", help="run the gateway (uvicorn)")
    p.add_argument("--config", default=None, help="path to config.yaml (default: $UNIROUTE_CONFIG or ./config.yaml)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(handler=_lazy("gateway.server:serve_command"))

    # --- replay upstream -----------------------------------------------------------------
    p = sub.add_parser("replay", help="serve a routing benchmark folder as an OpenAI-compatible upstream")
    p.add_argument("--dataset", default=None, help="routing benchmark folder (default: $UNIROUTE_DATASET)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--latency-ms", action="append", default=[], metavar="MODEL=MS",
                   help="add latency per model (repeatable; MODEL may be '*')")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between streamed chunks")
    p.add_argument("--stream-chunks", type=int, default=None, metavar="N",
                   help="split each streamed answer into N pieces (default: one per word)")
    p.add_argument("--fail", action="append", default=[], metavar="MODEL=500|429|timeout",
                   help="inject a fault per model (repeatable; MODEL may be '*')")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.set_defaults(handler=_lazy("gateway.replay:replay_command"))

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
