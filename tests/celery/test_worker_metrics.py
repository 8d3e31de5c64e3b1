"""A worker pool serves its processes' Prometheus metrics, merged, on ``--metrics-port``."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from pathlib import Path

from datamesh.core.config import DataMeshConfig
from datamesh.pipeline.ingestion import IngestionPipeline
from tests.celery.conftest import Workers, pool_children
from tests.helpers import real_requests
from tests.objects.conftest import free_port


def scrape(port: int, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
                return str(reply.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_pool_metrics_are_served_merged(workers: Workers, celery_config: DataMeshConfig) -> None:
    # Given a two-process pool started with --metrics-port,
    port = free_port()
    workers.start("--role", "all", "--processes", "2", "--metrics-port", str(port))
    workers.wait_ready(count=3)  # two shard owners and the index process

    # when a batch is ingested through it,
    async def ingest() -> None:
        async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
            results = (await p.ingest_many(real_requests(6))).unwrap()
            assert all(r.is_ok() for r in results)

    asyncio.run(ingest())
    # then the pool's endpoint shows the steps its worker processes ran.
    text = scrape(port)
    persisted = [
        line for line in text.splitlines() if line.startswith("datamesh_ingest_persisted_turns_total") and "} " in line
    ]
    assert persisted and sum(float(line.rsplit(" ", 1)[1]) for line in persisted) == 6, text[:2000]


def test_a_pool_whose_worker_dies_exits_whole_so_its_supervisor_restarts_it(
    workers: Workers, celery_config: DataMeshConfig
) -> None:
    # Given a two-process AP pool under the wrapper (as every docker-compose worker runs),
    pool = workers.start("--role", "ap", "--region", "eu-west", "--processes", "2", "--metrics-port", str(free_port()))
    workers.wait_ready(count=2)
    mains = pool_children(pool.pid)
    assert len(mains) == 2
    # when one worker's main process is killed (its shard queues now have no consumer),
    os.kill(mains[0], signal.SIGKILL)
    # then the wrapper stops the other one and exits with a failure, for its supervisor to restart it
    code = pool.wait(timeout=60)
    assert code != 0
    assert not Path(f"/proc/{mains[1]}").exists()  # waited for: stopped, not left running
    assert "exited; stopping the pool" in workers.logs()
