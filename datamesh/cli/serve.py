"""``python -m datamesh serve [--host H] [--port P]``: run the HTTP gateway under uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from datamesh.core import gc_tuning
from datamesh.core.config import DataMeshConfig
from datamesh.observability.context import LogContextFilter

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [request_id=%(request_id)s trace_id=%(trace_id)s] %(message)s"


def register(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the HTTP gateway (needs the gateway extra)")
    s.add_argument("--host", help="bind address (default: DATAMESH_GATEWAY_HOST)")
    s.add_argument("--port", type=int, help="port (default: DATAMESH_GATEWAY_PORT)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(handler=_serve)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(LogContextFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _serve(args: argparse.Namespace, config: DataMeshConfig) -> int:
    try:
        import uvicorn

        from datamesh.gateway.app import create_app
    except ImportError as exc:
        print(f"error: the gateway needs the gateway extra (pip install 'datamesh[gateway]'): {exc}")
        return 2
    configure_logging(args.log_level)
    host = args.host or config.gateway_host
    port = config.gateway_port if args.port is None else args.port
    app = create_app(config)
    gc_tuning.tune()  # a gateway's ingest makes and drops objects per turn like a worker's steps
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        log_level=args.log_level,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
    )
    return 0
