"""``python -m datamesh metrics``: the Prometheus exposition, for processes without the gateway.

Without ``--serve`` it prints the exposition once: this process's metrics, or every process's in
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``: Celery prefork workers on this host), after setting
the saga-log gauges from the CP tier.  With ``--serve`` it answers ``GET /metrics`` on
``DATAMESH_METRICS_PORT`` (or ``--port``), refreshing the saga-log gauges every ``--interval-s``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from datamesh.core.config import DataMeshConfig
from datamesh.core.result import Err
from datamesh.observability import metrics
from datamesh.pipeline.saga import observe_saga_log
from datamesh.storage.cp.database import CpDatabase

DEFAULT_INTERVAL_S = 15.0


def register(sub: Any) -> None:
    parser = sub.add_parser("metrics", help="print the Prometheus metrics, or serve /metrics (--serve)")
    parser.add_argument("--serve", action="store_true", help="serve GET /metrics until interrupted")
    parser.add_argument("--port", type=int, default=None, help="port for --serve (default DATAMESH_METRICS_PORT)")
    parser.add_argument("--no-saga-log", action="store_true", help="do not read the saga-log gauges from CP")
    parser.add_argument("--interval-s", type=float, default=DEFAULT_INTERVAL_S, help="--serve: saga-log refresh")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, config: DataMeshConfig) -> int:
    cp: CpDatabase | None = None
    if not args.no_saga_log:
        opened = CpDatabase.open(config.resolved_cp_url)
        if isinstance(opened, Err):
            print(f"error: {opened.error}", file=sys.stderr)
            return 2
        cp = opened.value
    try:
        if cp is not None:
            observe_saga_log(cp)
        if not args.serve:
            sys.stdout.write(metrics.render().decode())
            return 0
        port = config.metrics_port if args.port is None else args.port
        server, _thread = metrics.serve(port)
        print(f"serving /metrics on port {server.server_port}", flush=True)
        try:
            while True:
                time.sleep(args.interval_s)
                if cp is not None:
                    observe_saga_log(cp)
        except KeyboardInterrupt:
            server.shutdown()
            return 0
    finally:
        if cp is not None:
            cp.dispose()
