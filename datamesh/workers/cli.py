"""``python -m datamesh worker | beat | flower``: start Celery pools, the beat scheduler, Flower.

``worker --role ap --region eu-west --shards 0-3`` consumes ``ap.eu-west.0`` … ``ap.eu-west.3`` and the
reads routed to those shards' owner, ``ap-read.eu-west.0`` … ``ap-read.eu-west.3``;
``--role cp`` the ``cp`` queue; ``--role blobs`` the regions' ``blobs.<region>`` queues; ``--role index``
the regions' ``index.<region>`` queues (index outbox drains: this process is the regions' index writer);
``--role search`` the regions' ``search.<region>`` queues (searches routed to the index's host,
``DATAMESH_INDEX_READS=workers``: it opens the index files read-only, next to the writer);
``--role all`` everything of its regions (one box).  With ``--processes N`` an AP (or all) pool is N Celery
workers of one process each, the shards dealt round-robin between them, so each shard queue has one
consumer, plus one process for the index queues and one for the search queues; a ``cp``, ``blobs`` or
``search`` pool is one Celery worker with N processes; an ``index`` pool is always one process (a region's
index has one writer).  Each run is ``celery -A datamesh.workers.app worker`` with the queues and
``DATAMESH_WORKER_*`` set for it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType
from typing import Any

from datamesh.core.config import DataMeshConfig, parse_shards
from datamesh.core.types import GeoRegion
from datamesh.workers import queues

CELERY = [sys.executable, "-m", "celery", "-A", "datamesh.workers.app"]


def register(sub: Any) -> None:
    w = sub.add_parser("worker", help="start a Celery worker pool for a role, region and shards")
    w.add_argument("--role", choices=queues.ROLES, default="all")
    w.add_argument("--region", action="append", choices=[r.value for r in GeoRegion], help="repeatable; default all")
    w.add_argument("--shards", help="AP shards owned, e.g. 0-3 or 0,2 (default: every shard)")
    w.add_argument("--processes", type=int, default=1, help="worker processes in the pool")
    w.add_argument("--beat", action="store_true", help="also run the beat scheduler (single process only)")
    w.add_argument("--name", help="node name prefix (default: role.pid)")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("--include", action="append", default=[], help="extra module each worker imports")
    w.add_argument(
        "--metrics-port",
        type=int,
        help="serve the pool's Prometheus metrics on this port (every process merged, multiprocess mode)",
    )
    w.set_defaults(handler=run_worker)

    b = sub.add_parser("beat", help="start Celery beat (schedules the saga reaper)")
    b.add_argument("--loglevel", default="INFO")
    b.set_defaults(handler=run_beat)

    f = sub.add_parser("flower", help="start Flower, the Celery monitor, on the datamesh broker")
    f.add_argument("--port", type=int, default=5555)
    f.add_argument("--address", default="127.0.0.1")
    f.add_argument("--basic-auth", help="user:password (or FLOWER_BASIC_AUTH)")
    f.add_argument("--unauthenticated-api", action="store_true", help="serve the HTTP API without auth")
    f.set_defaults(handler=run_flower)


def worker_commands(args: argparse.Namespace, config: DataMeshConfig) -> list[tuple[list[str], dict[str, str]]]:
    """The Celery worker command lines (and their extra environment) for the requested pool."""
    regions = args.region or list(config.worker_regions) or [r.value for r in GeoRegion]
    shards = (
        list(parse_shards(args.shards)) if args.shards else list(config.worker_shards) or list(range(config.ap_shards))
    )
    processes = max(1, args.processes)
    prefix = args.name or f"{args.role}.{os.getpid()}"
    sharded = args.role in ("all", "ap") and processes > 1
    if sharded and processes > len(shards):
        # each process of an AP pool owns shards of its own: a process with none would consume nothing
        raise ValueError(f"--processes {processes} is more than the {len(shards)} AP shards this pool owns")
    groups = [shards[i::processes] for i in range(processes)] if sharded else [shards]
    # (role, shards) per Celery worker.  A sharded all-roles pool gives the index queues a process of
    # its own: an index drain runs for seconds, and behind it, in a process that also owns shards,
    # those shards' saga steps would wait (a region's index has one writer, so one process).  The
    # search queues get one more, for the same reason: a search must not wait behind a drain either.
    specs = [(args.role, owned) for owned in groups]
    if sharded and args.role == "all":
        specs += [("index", []), ("search", [])]
    commands = []
    for n, (role, owned) in enumerate(specs):
        names = queues.queues_for(role, regions, owned, index=not sharded)
        argv = [
            *CELERY,
            "worker",
            "-Q",
            ",".join(names),
            "-c",
            "1" if sharded or role == "index" else str(processes),
            "-n",
            f"{prefix}.{n}@%h",
            "--loglevel",
            args.loglevel,
            "-E",
        ]
        for module in args.include:
            argv += ["--include", module]
        if args.beat and n == 0:
            argv += ["-B", "-s", str(config.data_dir / f"celerybeat-schedule-{os.getpid()}")]
        env = {
            "DATAMESH_WORKER_ROLE": role,
            "DATAMESH_WORKER_REGIONS": ",".join(regions),
            "DATAMESH_WORKER_SHARDS": ",".join(map(str, owned)),
        }
        commands.append((argv, env))
    return commands


_POOL_POLL_S = 0.5


def run_worker(args: argparse.Namespace, config: DataMeshConfig) -> int:
    try:
        commands = worker_commands(args, config)
        if args.beat:  # its schedule file goes there: beat dies at start in a folder that is not there
            config.data_dir.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.metrics_port is not None:
        # The pool's processes write their metrics to one directory; this process serves them merged.
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="datamesh-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        from datamesh.observability import metrics

        metrics.serve(args.metrics_port)
    elif len(commands) == 1:
        argv, extra = commands[0]
        os.execvpe(argv[0], argv, {**os.environ, **extra})
    children = [subprocess.Popen(argv, env={**os.environ, **extra}) for argv, extra in commands]
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(_POOL_POLL_S)
    lost = not stopping  # a worker of the pool exited by itself (crashed, killed, OOM)
    if lost:
        # Stop the rest, so the whole pool exits and its supervisor (a container's restart policy,
        # systemd) starts it again: a pool left half-alive would leave the dead worker's shard
        # queues without a consumer for as long as it runs.
        dead = [
            f"{argv[argv.index('-n') + 1]} ({child.returncode})"
            for child, (argv, _) in zip(children, commands, strict=True)
            if child.poll() is not None
        ]
        print(f"datamesh worker: {', '.join(dead)} exited; stopping the pool", file=sys.stderr, flush=True)
        forward(signal.SIGTERM, None)
    codes = [child.wait() for child in children]
    return max(max(codes, default=0), 1 if lost else 0)


def run_beat(args: argparse.Namespace, config: DataMeshConfig) -> int:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    argv = [*CELERY, "beat", "--loglevel", args.loglevel, "-s", str(config.data_dir / "celerybeat-schedule")]
    os.execvp(argv[0], argv)


def run_flower(args: argparse.Namespace, config: DataMeshConfig) -> int:
    argv = [*CELERY, "flower", f"--port={args.port}", f"--address={args.address}"]
    if args.basic_auth:
        argv.append(f"--basic-auth={args.basic_auth}")
    env = dict(os.environ)
    if args.unauthenticated_api:
        env["FLOWER_UNAUTHENTICATED_API"] = "true"
    os.execvpe(argv[0], argv, env)
