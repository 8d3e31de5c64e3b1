"""Observability across real Celery worker processes: one trace per ingest, tail sampling, the ledger.

The test process and the workers export to one JSON-lines file (``DATAMESH_TRACE_FILE``); the test
process sets its tracer up in-process (service ``caller``), the workers after fork (service
``worker``).  Workers flush at the end of each task and at shutdown, so stopping them (SIGTERM, a warm
shutdown) is the point after which their file contents are complete.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from sqlalchemy import select

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import SagaFailed
from datamesh.core.result import Err
from datamesh.models.tables import Saga
from datamesh.observability import ledger, tracing
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.pipeline.plan import SagaPlan
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp.sagas import SagaStatus
from tests.celery.conftest import Workers, pool_children
from tests.celery.test_kills import settle
from tests.helpers import real_requests


def read_spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def hex_trace(current: Any) -> str:
    return format(current.get_span_context().trace_id, "032x")


def wait_for_spans(path: Path, trace_id: str, name: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The trace's spans once one named ``name`` is in the file (workers flush at the end of each task)."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for r in read_spans(path) if r["trace_id"] == trace_id]
        if any(r["name"] == name for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


@pytest.fixture
def trace_file(tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "spans.jsonl"
    yield out
    tracing.shutdown()


def start_traced_workers(workers: Workers, trace_file: Path, rate: str, redis_url: str) -> None:
    workers.start(
        "--role",
        "all",
        hooks_redis=redis_url,
        DATAMESH_TRACE_FILE=str(trace_file),
        DATAMESH_TRACE_SAMPLE_RATE=rate,
        DATAMESH_LOG_LEVEL="WARNING",
    )
    workers.wait_ready()


async def test_one_ingest_is_one_trace_across_the_caller_and_the_workers(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str, trace_file: Path
) -> None:
    # Given workers and this process exporting every trace to one file,
    start_traced_workers(workers, trace_file, "1", redis_url)
    tracing.setup(service_name="caller", sample_rate=1.0, trace_file=trace_file)
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        # when one ingest (a blob too, so every step task runs) is made inside the caller's span,
        big = b"B" * (celery_config.inline_max_bytes + 3)
        request = real_requests(1)[0]
        request = IngestionRequest(
            entity_id=request.entity_id, prompt=request.prompt, response=big, geo_region=request.geo_region
        )
        with tracing.span("caller.request") as caller:
            result = await p.ingest(request)
        assert result.is_ok(), result
    tracing.force_flush()
    trace_id = hex_trace(caller)
    records = wait_for_spans(trace_file, trace_id, "task.commit_cp")
    # then the spans come from both processes, all in the caller's trace (but for the caller's
    # periodic reaper pass, a trace of its own),
    everything = read_spans(trace_file)
    reaps = {r["trace_id"] for r in everything if r["name"] == "pipeline.reap"}
    assert {r["trace_id"] for r in everything} - reaps == {trace_id}
    assert {r["service"] for r in records} == {"caller", "worker"}
    names = {r["name"] for r in records}
    assert {"caller.request", "pipeline.ingest_many", "task.store_blobs", "task.write_ap", "task.commit_cp"} <= names
    assert {"saga.store_blobs", "saga.commit_cp", "ap.put_many"} <= names  # steps and tier calls, in the tasks
    # and every worker task continues a remote parent: the caller's span, or the task before it.
    span_ids = {r["span_id"] for r in records}
    tasks = [r for r in records if r["name"].startswith("task.")]
    assert all(t["parent_remote"] and t["parent_span_id"] in span_ids for t in tasks), tasks
    assert all(r["status"] != "ERROR" for r in records)


async def test_a_failed_saga_and_its_compensation_are_in_the_callers_trace(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str, trace_file: Path
) -> None:
    # Given workers and this process exporting every trace, and a fault armed before commit_cp,
    control = redis.Redis.from_url(redis_url)
    start_traced_workers(workers, trace_file, "1", redis_url)
    tracing.setup(service_name="caller", sample_rate=1.0, trace_file=trace_file)
    control.set("dm:test:fault", "commit_cp:before")
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        # when an ingest fails there and is compensated,
        with tracing.span("caller.request") as caller:
            failed = await p.ingest(real_requests(1)[0])
        assert isinstance(failed, Err) and isinstance(failed.error, SagaFailed), failed
    control.close()
    tracing.force_flush()
    records = wait_for_spans(trace_file, hex_trace(caller), "task.undo_reserve")
    # then the failed step and the compensation tasks its errback enqueued continue the caller's trace.
    by_name = {r["name"]: r for r in records}
    assert by_name["task.commit_cp"]["status"] == "ERROR"
    assert {"task.compensate", "task.undo_write_ap", "task.undo_reserve"} <= set(by_name), sorted(by_name)
    assert by_name["task.compensate"]["parent_span_id"] == by_name["task.commit_cp"]["span_id"]


async def test_sampling_drops_successes_and_keeps_failures_on_both_sides(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str, trace_file: Path
) -> None:
    # Given workers and this process keeping no successful trace (rate 0),
    control = redis.Redis.from_url(redis_url)
    start_traced_workers(workers, trace_file, "0", redis_url)
    tracing.setup(service_name="caller", sample_rate=0.0, trace_file=trace_file)
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        # when one ingest succeeds
        with tracing.span("caller.request") as ok_span:
            assert (await p.ingest(real_requests(1)[0])).is_ok()
        # and one fails on purpose at write_ap in a worker (and is compensated),
        control.set("dm:test:fault", "write_ap:before")
        with tracing.span("caller.request") as failed_span:
            failed = await p.ingest(real_requests(1)[0])
        control.delete("dm:test:fault")
        assert isinstance(failed, Err) and isinstance(failed.error, SagaFailed), failed
    tracing.force_flush()
    workers.stop()  # a warm shutdown: every worker process has flushed what it kept
    records = read_spans(trace_file)
    ok_id, failed_id = hex_trace(ok_span), hex_trace(failed_span)
    # then nothing of the successful trace was exported by either side,
    assert not [r for r in records if r["trace_id"] == ok_id]
    # the failed trace is kept by both: the caller's whole part and the worker's failed task,
    kept = [r for r in records if r["trace_id"] == failed_id]
    assert {r["service"] for r in kept} == {"caller", "worker"}, kept
    by_name = {r["name"]: r for r in kept}
    assert by_name["pipeline.ingest_many"]["status"] == "ERROR" and "caller.request" in by_name
    assert by_name["task.write_ap"]["status"] == "ERROR" and by_name["task.write_ap"]["service"] == "worker"
    # and no other trace was exported (successful compensation tasks are their own local roots: dropped).
    assert {r["trace_id"] for r in records} == {failed_id}
    control.close()


KILLS = 6
BATCHES = 12
BATCH = 6


def turns_by_status(tiers: Tiers) -> dict[str, int]:
    """Turns per saga status, from the CP saga log (the record the ledger must agree with)."""

    def q(conn: Any) -> list[tuple[str, str]]:
        return [(row[0], row[1]) for row in conn.execute(select(Saga.status, Saga.plan))]

    totals: dict[str, int] = {}
    for status, plan in tiers.cp.run(q, operation="t", write=False).unwrap():
        totals[status] = totals.get(status, 0) + len(SagaPlan.from_json(plan).items)
    return totals


async def test_no_loss_ledger_holds_after_workers_are_killed(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str, tmp_path: Path
) -> None:
    # The ledger is split between processes: this process accepts turns (reserve runs in the caller)
    # and counts them in its own registry; the workers persist, compensate and dead-letter them and
    # count in a multiprocess directory shared by every pool process (including SIGKILLed ones: the
    # values are in mmapped files).  Sound sum: this process's delta over the run + the directory.
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    before = ledger.snapshot(REGISTRY)
    control = redis.Redis.from_url(redis_url)
    control.set("dm:test:delay", "0.12")
    main = workers.start("--role", "all", hooks_redis=redis_url, PROMETHEUS_MULTIPROC_DIR=str(multiproc))
    workers.start_beat()
    workers.wait_ready()
    rng = random.Random(11)
    pool = real_requests(BATCHES * BATCH, entities=8)
    batches = [pool[i * BATCH : (i + 1) * BATCH] for i in range(BATCHES)]
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        queue: asyncio.Queue[list[IngestionRequest]] = asyncio.Queue()
        for batch in batches:
            queue.put_nowait(batch)

        finished: list[int] = []

        async def client() -> None:
            while not queue.empty():
                (await p.ingest_many(queue.get_nowait())).unwrap()
                finished.append(1)

        async def killer() -> int:
            while not finished:  # a child killed while the pool starts fails the whole worker, not a step
                await asyncio.sleep(0.05)
            kills = 0
            while kills < KILLS:
                await asyncio.sleep(rng.uniform(0.15, 0.6))
                children = pool_children(main.pid)
                if children:
                    os.kill(rng.choice(children), signal.SIGKILL)
                    kills += 1
            return kills

        # Given ingests in two clients while a worker's pool process is SIGKILLed mid-step,
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(client(), client())
        assert await kill_task == KILLS
        control.delete("dm:test:delay")
        # when the reaper has settled what the kills left behind,
        await settle(p.tiers)
        cp_truth = turns_by_status(p.tiers)
    workers.stop()
    here = ledger.snapshot(REGISTRY) - before
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=str(multiproc))  # type: ignore[no-untyped-call]
    there = ledger.snapshot(merged)
    accepted = here.accepted + there.accepted
    persisted = here.persisted + there.persisted
    compensated = here.compensated + there.compensated
    dead = here.dead_letter + there.dead_letter
    in_flight = here.in_flight + there.in_flight
    # then accepted = persisted + compensated + dead-lettered + in flight, with nothing in flight,
    assert accepted == BATCHES * BATCH, (here, there)
    assert accepted == persisted + compensated + dead + in_flight, (here, there)
    assert in_flight == 0 and dead == 0, (here, there)
    # and the metrics agree with the CP saga log, turn for turn.
    assert persisted == cp_truth.get(SagaStatus.COMMITTED.value, 0), (cp_truth, here, there)
    assert compensated == cp_truth.get(SagaStatus.COMPENSATED.value, 0), (cp_truth, here, there)
    print(f"ledger: accepted {accepted}, persisted {persisted}, compensated {compensated}; saga log {cp_truth}")
    control.close()


def test_queue_depth_gauge_reads_the_broker_lists(redis_url: str) -> None:
    from datamesh.observability import metrics
    from datamesh.tasks.reaper import observe_queue_depths

    # Given messages waiting in the cp queue and in two shards' queues of one region,
    client = redis.Redis.from_url(redis_url)
    client.lpush("cp", "m1", "m2")
    client.lpush("ap.eu-west.0", "m")
    client.lpush("ap.eu-west.3", "m", "m", "m")
    # when the reaper observes the queues,
    depths = observe_queue_depths(client, shard_count=4)
    client.close()
    # then the gauge has them by region and queue kind, the shards summed.
    assert depths[("global", "cp")] == 2 and depths[("eu-west", "ap")] == 4 and depths[("us-east", "blobs")] == 0
    assert metrics.QUEUE_DEPTH.labels("eu-west", "ap")._value.get() == 4  # type: ignore[attr-defined]
