"""``uniroute replay``: serve a routing benchmark folder as an OpenAI-compatible upstream."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from replay.app import create_replay_app
from routing.dataset import load_dataset


def _pairs(items: list[str], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        model, sep, value = item.rpartition("=")
        if not sep or not model or not value:
            raise ValueError(f"{option} expects MODEL=VALUE (MODEL may be '*'); got {item!r}")
        out[model] = value
    return out


def replay_command(args: argparse.Namespace) -> int:
    """Handler of ``uniroute replay``."""
    import uvicorn

    from routing.dataset import DatasetError, default_dataset_path

    path = Path(args.dataset) if args.dataset else default_dataset_path()
    if path is None:
        print("uniroute replay: no dataset; pass --dataset DIR or set $UNIROUTE_DATASET", file=sys.stderr)
        return 2
    try:
        latency = {m: float(v) for m, v in _pairs(list(args.latency_ms or []), "--latency-ms").items()}
        faults = _pairs(list(getattr(args, "fail", None) or []), "--fail")
        data = load_dataset(path)
        app = create_replay_app(data, latency_ms=latency, chunk_delay_ms=float(args.chunk_delay_ms or 0.0),
                                stream_chunks=getattr(args, "stream_chunks", None), faults=faults)
    except (ValueError, DatasetError) as exc:
        print(f"uniroute replay: {exc}", file=sys.stderr)
        return 2
    print(f"uniroute replay: {data.n_models} models x {data.n_prompts} prompts from {path}"
          f"; starting on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=getattr(args, "log_level", "warning"),
                access_log=False)
    return 0
