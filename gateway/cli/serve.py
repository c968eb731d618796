"""``uniroute serve``: run the gateway under uvicorn (uvloop/httptools when installed)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

from gateway.config import (
    CONFIG_ENV,
    SERVE_OVERRIDES_ENV,
    ConfigError,
    default_config_path,
    load_config,
    with_server_overrides,
)
from gateway.secrets import install_log_scrubber

#: import strings of gateway.http.server's protocols (uvicorn imports them in each worker)
_BOUNDED_HTTPTOOLS = "gateway.http.server:BoundedHttpToolsProtocol"
_BOUNDED_H11 = "gateway.http.server:BoundedH11Protocol"
#: uvicorn's loop factory: uvloop with batched accepts
_BATCH_ACCEPT_LOOP = "gateway.http.eventloop:new_event_loop"


def serve_command(args: argparse.Namespace) -> int:
    path = Path(args.config) if getattr(args, "config", None) else default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"uniroute serve: {exc}", file=sys.stderr)
        return 2
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    workers = args.workers or config.server.workers
    overrides = {"host": host, "port": port, "workers": workers}
    try:  # what each worker's config says is what is served (the liveness listener binds the same host and
        # shares its port between the workers); validated as the config is (--port may not be its health_port)
        config = with_server_overrides(config, overrides)
    except ConfigError as exc:
        print(f"uniroute serve: {exc}", file=sys.stderr)
        return 2
    # workers re-import the app through the factory, which reads the config (and these) from the environment
    os.environ[CONFIG_ENV] = str(path.resolve())
    os.environ[SERVE_OVERRIDES_ENV] = json.dumps(overrides)
    logging.basicConfig(level=config.server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_scrubber()  # no credential (nor, above DEBUG, internal host) of an upstream message is logged

    import uvicorn

    from gateway.metrics import prepare_multiprocess_dir

    prom_dir = prepare_multiprocess_dir(workers)  # with workers > 1, /metrics merges every worker
    try:
        uvicorn.run(
            "gateway.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            # uvloop, accepting pending connections in batches (gateway/http/eventloop.py)
            loop=_BATCH_ACCEPT_LOOP if importlib.util.find_spec("uvloop") else "asyncio",
            # uvicorn's protocols with header/body deadlines and a header size bound (gateway/http/server.py)
            http=(_BOUNDED_HTTPTOOLS if importlib.util.find_spec("httptools") else _BOUNDED_H11),
            h11_max_incomplete_event_size=config.server.max_header_bytes,
            log_level=config.server.log_level,
            access_log=config.server.access_log,
            timeout_graceful_shutdown=10,
        )
    finally:
        if prom_dir is not None:
            import shutil

            shutil.rmtree(prom_dir, ignore_errors=True)
    return 0
