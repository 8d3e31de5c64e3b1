"""Redis restarted during a run: no acknowledged ingest is lost.

The test runs its own ``redis-server`` on a spare port (never the shared one), with AOF on as in
docker-compose.yml, and kills and restarts it while clients ingest.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from datamesh.core.config import DataMeshConfig
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import SagaStatus
from tests.celery.conftest import Workers
from tests.celery.test_kills import assert_consistent, settle
from tests.conftest import service_missing
from tests.helpers import real_requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnRedis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.RedisError:
                assert time.monotonic() < deadline, "own redis-server did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        service_missing("redis-server binary", FileNotFoundError("redis-server"))
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()


async def test_broker_restart_loses_no_acknowledged_ingest(
    celery_config: DataMeshConfig, own_redis: OwnRedis, tmp_path: Path
) -> None:
    config = celery_config.with_changes(broker_url=own_redis.url, saga_wait_s=90.0)
    workers = Workers(config, tmp_path)
    try:
        workers.start("--role", "all", hooks_redis=own_redis.url)
        workers.start_beat()
        workers.wait_ready()
        redis.Redis.from_url(own_redis.url).set("dm:test:delay", "0.03")
        pool = real_requests(240, entities=8)
        batches = [pool[i : i + 8] for i in range(0, len(pool), 8)]
        async with (await IngestionPipeline.create(config)).unwrap() as p:
            outcomes: list[tuple[IngestionRequest, object]] = []
            todo = list(batches)

            async def client() -> None:
                while todo:
                    batch = todo.pop()
                    result = await p.ingest_many(batch)
                    outcomes.extend(zip(batch, result.unwrap(), strict=True))

            in_flight_at_kill: list[int] = []

            async def restart() -> None:
                await asyncio.sleep(1.5)
                running = p.tiers.cp.run(
                    lambda c: sagas.count_by_status(c).get(SagaStatus.RUNNING.value, 0), operation="t", write=False
                )
                in_flight_at_kill.append(running.unwrap())
                own_redis.kill()  # SIGKILL: no shutdown save, only what AOF already has
                await asyncio.sleep(1.0)
                own_redis.start()

            # Given clients ingesting while the broker is killed and restarted,
            await asyncio.gather(client(), client(), client(), restart())
            assert in_flight_at_kill[0] > 0, "no saga was in flight when the broker went down"
            # when everything in flight has been finished or compensated,
            statuses = await settle(p.tiers)
            assert set(statuses) <= {SagaStatus.COMMITTED.value, SagaStatus.COMPENSATED.value}, statuses
            # then every acknowledged turn is stored and reads back,
            ok = [(req, r) for req, r in outcomes if r.is_ok()]  # type: ignore[attr-defined]
            assert len(ok) > 0
            for req, r in ok:
                stored = (await p.get(r.unwrap().conversation_id)).unwrap()  # type: ignore[attr-defined]
                assert stored.turns[0].prompt == req.prompt
            assert_consistent(p.tiers)
            # and a client retrying the ones that were not acknowledged gets them stored exactly once.
            failed = [req for req, r in outcomes if r.is_err()]  # type: ignore[attr-defined]
            if failed:
                again = (await p.ingest_many(failed)).unwrap()
                assert all(r.is_ok() for r in again)
            everything = (await p.ingest_many(pool)).unwrap()
            assert all(r.is_ok() and r.unwrap().deduplicated for r in everything)
            assert_consistent(p.tiers)
            print(f"{len(ok)} acknowledged, {len(failed)} failed during the restart; sagas {statuses}")
    finally:
        workers.stop()
