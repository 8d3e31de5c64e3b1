"""Redis restarted during a run, losing its last second of writes: no acknowledged ingest is lost.

The test runs its own ``redis-server`` on a spare port (never the shared one) with the settings
docker-compose.yml gives the broker (read from it: AOF with ``appendfsync everysec``, ``noeviction``),
and kills and restarts it while clients ingest.  ``everysec`` fsyncs the AOF once a second, so a host
failure can lose up to the last second of writes; a SIGKILL alone loses none (they are in the page
cache), so after the kill the test also cuts the AOF back to its size one second earlier.

Why losing those writes loses no acknowledged ingest: an ingest is acknowledged only once its saga is
committed in the saga log, in the CP tier (PostgreSQL), never on the broker's word.  What the broker
loses is a message (the saga waits in the log; once its lease expires the reaper drives it forward or
compensates it), a payload stash (the step fails, the saga is compensated and its
client told to retry), an acknowledgement (the message is delivered again; every step is idempotent),
a shard lease or fencing counter (tokens restart above the fence the shard keeps on disk) or a
waiter's wake-up (the caller polls the saga log).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import redis
import yaml

from datamesh.core.config import DataMeshConfig
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import SagaStatus
from tests.celery.conftest import ROOT, Workers
from tests.celery.test_kills import assert_consistent, settle
from tests.helpers import real_requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compose_redis_args() -> list[str]:
    """The arguments docker-compose.yml starts the broker's ``redis-server`` with."""
    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["redis"]["command"]
    assert command[0] == "redis-server", command
    return [str(arg) for arg in command[1:]]


#: (when, AOF file Redis appends to, its size): sampled while clients ingest.
AofSample = tuple[float, Path, int]


class OwnRedis:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # compose's settings, then where this one listens and keeps its files
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(
            ["redis-server", *compose_redis_args(), *where],
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

    def aof_tail(self) -> Path:
        """The AOF file Redis appends to now: the last ``incr`` file its manifest lists (Redis 7)."""
        folder = self.workdir / "appendonlydir"
        (manifest,) = folder.glob("*.manifest")
        entries = [
            dict(zip(line.split()[::2], line.split()[1::2], strict=True)) for line in manifest.read_text().splitlines()
        ]
        return folder / [e["file"] for e in entries if e.get("type") == "i"][-1]

    def kill_losing_last_second(self, samples: list[AofSample]) -> int:
        """SIGKILL, then cut the AOF back to its size one second before the kill, as a host failure
        under ``appendfsync everysec`` may leave it; returns how many bytes of writes were lost."""
        killed_at = time.monotonic()
        self.kill()
        tail = self.aof_tail()
        kept = max((size for at, path, size in samples if at <= killed_at - 1.0 and path == tail), default=0)
        lost = tail.stat().st_size - kept
        os.truncate(tail, kept)  # Redis loads a cut AOF up to its last whole command (aof-load-truncated)
        return lost

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


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
            lost_bytes: list[int] = []

            async def restart() -> None:
                samples: list[AofSample] = []
                started = time.monotonic()
                while time.monotonic() - started < 1.5:
                    tail = own_redis.aof_tail()
                    samples.append((time.monotonic(), tail, tail.stat().st_size))
                    await asyncio.sleep(0.02)
                running = p.tiers.cp.run(
                    lambda c: sagas.count_by_status(c).get(SagaStatus.RUNNING.value, 0), operation="t", write=False
                )
                in_flight_at_kill.append(running.unwrap())
                # SIGKILL (no shutdown save) and the last second of AOF writes gone, as on a host failure
                lost_bytes.append(own_redis.kill_losing_last_second(samples))
                await asyncio.sleep(1.0)
                own_redis.start()

            # Given clients ingesting while the broker is killed, loses its last second of writes and restarts,
            await asyncio.gather(client(), client(), client(), restart())
            assert in_flight_at_kill[0] > 0, "no saga was in flight when the broker went down"
            assert lost_bytes[0] > 0, "the broker lost no writes"
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
            print(
                f"{len(ok)} acknowledged, {len(failed)} failed during the restart; sagas {statuses};"
                f" {lost_bytes[0]} bytes of AOF lost"
            )
    finally:
        workers.stop()
