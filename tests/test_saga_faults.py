"""A failure at every saga step leaves no conversation, no AP row and no blob: only a compensated saga."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update
from sqlalchemy.engine import Connection

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import SagaFailed
from datamesh.core.result import Err
from datamesh.core.retry import RetryPolicy
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.pipeline.saga import InjectedFault, reap
from datamesh.pipeline.steps import Step
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import sagas
from datamesh.storage.cp.database import CpDatabase
from datamesh.storage.cp.sagas import SagaStatus
from datamesh.storage.cp.sql import utcnow
from tests.helpers import counts_after_gc, real_requests, tier_counts

FAULT_POINTS = [
    (Step.RESERVE, "after"),
    (Step.STORE_BLOBS, "before"),
    (Step.STORE_BLOBS, "after"),
    (Step.WRITE_AP, "before"),
    (Step.WRITE_AP, "after"),
    (Step.COMMIT_CP, "before"),
]


@dataclass
class FailAt:
    step: str
    phase: str
    armed: bool = True
    seen: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, step: str, phase: str) -> None:
        self.seen.append((step, phase))
        if self.armed and (step, phase) == (self.step, self.phase):
            raise InjectedFault(f"injected at {phase} {step}")


def batch_with_blobs(config: DataMeshConfig) -> list[IngestionRequest]:
    entity = EntityId.generate()
    requests = real_requests(6)
    big = b"B" * (config.inline_max_bytes + 10)
    requests.append(IngestionRequest(entity_id=entity, prompt=b"large one", response=big, geo_region=GeoRegion.EU_WEST))
    requests.append(IngestionRequest(entity_id=entity, prompt=big + b"!", response=b"ok", geo_region=GeoRegion.US_EAST))
    return requests


@pytest.mark.parametrize(("step", "phase"), FAULT_POINTS, ids=[f"{p}-{s}" for s, p in FAULT_POINTS])
async def test_failure_at_each_step_is_fully_compensated(config: DataMeshConfig, step: str, phase: str) -> None:
    fault = FailAt(step, phase)
    async with (await IngestionPipeline.create(config, faults=fault)).unwrap() as p:
        requests = batch_with_blobs(config)
        # Given a batch with inline and object-store payloads in two regions,
        # when the saga fails at one step
        results = (await p.ingest_many(requests)).unwrap()
        # then every item reports the failed saga and step,
        assert all(isinstance(r, Err) and isinstance(r.error, SagaFailed) for r in results)
        failure = results[0].error
        assert isinstance(failure, SagaFailed) and failure.step == step and not failure.dead_lettered
        # no reference is left (blobs already written stay for garbage collection to delete),
        assert tier_counts(p.tiers).rows["object_refs"] == 0
        # and once it has, every tier is empty but for the compensated saga record,
        counts = counts_after_gc(p.tiers)
        assert counts.stored() == 0 and counts.ap_rows == 0 and counts.blobs == 0
        assert counts.rows["object_refs"] == 0 and counts.rows["blobs"] == 0
        assert counts.rows["idempotency_keys"] == 0 and counts.rows["provenance_records"] == 0
        statuses = p.tiers.cp.run(sagas.count_by_status, operation="t").unwrap()
        assert statuses == {SagaStatus.COMPENSATED.value: 1}
        record = p.tiers.cp.run(lambda c: sagas.load(c, failure.saga_id), operation="t").unwrap()
        assert record is not None and record.failed_step == step
        assert set(record.steps.values()) == {sagas.StepState.COMPENSATED}
        # and the released keys let the same requests succeed afterwards.
        fault.armed = False
        retried = (await p.ingest_many(requests)).unwrap()
        assert all(r.is_ok() and not r.unwrap().deduplicated for r in retried)
        for original, result in zip(requests, retried, strict=True):
            stored = (await p.get(result.unwrap().conversation_id)).unwrap()
            assert stored.turns[0].prompt == original.prompt and stored.turns[0].response == original.response


async def test_failure_before_reserve_writes_nothing(config: DataMeshConfig) -> None:
    async with (await IngestionPipeline.create(config, faults=FailAt(Step.RESERVE, "before"))).unwrap() as p:
        before = tier_counts(p.tiers)
        result = await p.ingest(real_requests(1)[0])
        assert isinstance(result, Err) and isinstance(result.error, SagaFailed)
        assert tier_counts(p.tiers) == before and before.stored() == 0


async def test_compensation_keeps_blobs_other_sagas_reference(config: DataMeshConfig) -> None:
    shared = b"S" * (config.inline_max_bytes + 1)
    entity = EntityId.generate()
    first = IngestionRequest(entity_id=entity, prompt=b"one", response=shared, geo_region=GeoRegion.EU_WEST)
    second = IngestionRequest(entity_id=entity, prompt=b"two", response=shared, geo_region=GeoRegion.EU_WEST)
    fault = FailAt(Step.WRITE_AP, "before", armed=False)
    async with (await IngestionPipeline.create(config, faults=fault)).unwrap() as p:
        kept = (await p.ingest(first)).unwrap()
        fault.armed = True
        assert (await p.ingest(second)).is_err()
        # the failed saga dropped only its own reference: the committed turn still reads its blob
        assert (await p.get(kept.conversation_id)).unwrap().turns[0].response == shared
        assert tier_counts(p.tiers).blobs == 1


async def test_reaper_drives_forward_or_compensates_expired_sagas(config: DataMeshConfig) -> None:
    class Crash(BaseException):
        """Stands for the process dying: not caught by the saga's failure handling."""

    crash_at: dict[str, str] = {}

    def crash(step: str, phase: str) -> None:
        if crash_at.get("step") == step and crash_at.get("phase") == phase:
            raise Crash()

    async with (await IngestionPipeline.create(config, faults=crash)).unwrap() as p:
        # A saga whose driver died after writing AP content is driven forward to commit,
        crash_at.update(step=Step.COMMIT_CP, phase="before")
        forward = real_requests(3)
        with pytest.raises(Crash):
            await p.ingest_many(forward)
        # one that died before writing its content is compensated.
        crash_at.update(step=Step.WRITE_AP, phase="before")
        backward = IngestionRequest(
            entity_id=EntityId.generate(),
            prompt=b"p",
            response=b"R" * (config.inline_max_bytes + 5),
            geo_region=GeoRegion.EU_WEST,
        )
        with pytest.raises(Crash):
            await p.ingest(backward)
        assert tier_counts(p.tiers).blobs == 1
        crash_at.clear()
        assert reap(p.tiers) == []  # their leases have not expired yet: a live driver is left alone

        def expire_leases(conn: Connection) -> None:
            conn.execute(update(sagas.SAGAS).values(lease_expires_at=utcnow() - timedelta(seconds=1)))

        p.tiers.cp.run(expire_leases, operation="t").unwrap()
        assert sorted(o.action for o in reap(p.tiers)) == ["committed", "compensated"]
        statuses = p.tiers.cp.run(sagas.count_by_status, operation="t").unwrap()
        assert statuses == {SagaStatus.COMMITTED.value: 1, SagaStatus.COMPENSATED.value: 1}
        counts = counts_after_gc(p.tiers)
        assert counts.rows["conversations"] == 3 and counts.blobs == 0 and counts.rows["object_refs"] == 0
        replay = (await p.ingest_many(forward)).unwrap()
        assert all(r.unwrap().deduplicated for r in replay)  # the forward-driven saga is the first result
        assert reap(p.tiers) == []


async def test_compensating_a_compensated_saga_again_changes_nothing(config: DataMeshConfig) -> None:
    from prometheus_client import REGISTRY

    from datamesh.core.result import Ok
    from datamesh.observability import ledger
    from datamesh.pipeline import compensation

    fault = FailAt(Step.COMMIT_CP, "before")
    async with (await IngestionPipeline.create(config, faults=fault)).unwrap() as p:
        # Given a saga compensated after every step before its pivot ran,
        requests = batch_with_blobs(config)
        failure = (await p.ingest_many(requests)).unwrap()[0].error
        assert isinstance(failure, SagaFailed)
        # and the same requests sent again and committed by a new saga (same keys, same blobs),
        fault.armed = False
        retried = (await p.ingest_many(requests)).unwrap()
        assert all(r.is_ok() for r in retried)
        before, counted = tier_counts(p.tiers), ledger.snapshot(REGISTRY)
        # when the first saga's compensation runs again, twice (a late duplicate),
        for _ in range(2):
            again = compensation.compensate(p.tiers, failure.saga_id, failed_step=failure.step, error="again")
            assert again == Ok(SagaStatus.COMPENSATED)
        # then every tier and the ledger are as they were: the new saga's keys, references and
        # content are untouched, and the same requests are still answered with its turns.
        assert tier_counts(p.tiers) == before and ledger.snapshot(REGISTRY) == counted
        assert counts_after_gc(p.tiers).blobs == 2
        replay = (await p.ingest_many(requests)).unwrap()
        assert [r.unwrap().conversation_id for r in replay] == [r.unwrap().conversation_id for r in retried]
        assert all(r.unwrap().deduplicated for r in replay)


#: PL/pgSQL bodies of a trigger that makes the pivot's own transaction fail, in real PostgreSQL.
PIVOT_FAILURES = {
    # transient: the CP tier re-runs it up to its bound, then reports a retryable error
    "serialization-failure": "RAISE EXCEPTION 'pivot conflicted' USING ERRCODE = 'serialization_failure';",
    # transient: the server drops the pivot's connection under it
    "connection-dropped": "PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NEW;",
    # permanent: an error no retry changes
    "check-violation": "RAISE EXCEPTION 'pivot refused' USING ERRCODE = 'check_violation';",
}


def fail_pivots(tiers: Tiers, body: str) -> None:
    """Every transaction that moves a saga to ``committed`` (the pivot) runs ``body`` first."""

    def install(conn: Connection) -> None:
        conn.execute(text(f"CREATE FUNCTION fail_pivot() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} END $$"))
        conn.execute(
            text(
                "CREATE TRIGGER fail_pivot BEFORE UPDATE ON sagas FOR EACH ROW"
                " WHEN (NEW.status = 'committed') EXECUTE FUNCTION fail_pivot()"
            )
        )

    tiers.cp.run(install, operation="t").unwrap()


def heal_pivots(tiers: Tiers) -> None:
    tiers.cp.run(lambda c: c.execute(text("DROP TRIGGER fail_pivot ON sagas")), operation="t").unwrap()


class StopBeforePivot(BaseException):
    """Stands for the saga's driver dying just before ``commit_cp``: not caught by its failure handling."""


def stop_before_pivot(step: str, phase: str) -> None:
    if (step, phase) == (Step.COMMIT_CP, "before"):
        raise StopBeforePivot()


async def stranded_before_the_pivot(p: IngestionPipeline, requests: list[IngestionRequest]) -> str:
    """Ingest ``requests`` with a driver that dies just before the pivot (``stop_before_pivot``), and
    expire its lease: the reaper's to commit.  Returns the saga's id."""
    with pytest.raises(StopBeforePivot):
        await p.ingest_many(requests)
    far = utcnow() + timedelta(days=1)
    (saga_id,) = p.tiers.cp.run(lambda c: sagas.expired(c, now=far), operation="t", write=False).unwrap()
    p.tiers.cp.run(
        lambda c: c.execute(update(sagas.SAGAS).values(lease_expires_at=utcnow() - timedelta(seconds=1))), operation="t"
    ).unwrap()
    return str(saga_id)


def short_retries(tiers: Tiers) -> Tiers:
    """The tiers with the CP tier's own re-runs kept short: it gives up on the first conflict it
    cannot get past."""
    return dataclasses.replace(
        tiers, cp=CpDatabase(tiers.cp.engine, policy=RetryPolicy(attempts=2, base_s=0.001, cap_s=0.001))
    )


@asynccontextmanager
async def failing_pivot(
    pg_cp_url: str, tmp_path: Path, failure: str, requests: list[IngestionRequest]
) -> AsyncIterator[tuple[IngestionPipeline, str]]:
    """A pipeline (its own reaper idle) with a saga of ``requests`` stranded just before the pivot,
    its lease expired, on a PostgreSQL where that pivot fails with ``PIVOT_FAILURES[failure]``."""
    config = DataMeshConfig(data_dir=tmp_path / "data", cp_url=pg_cp_url, reap_interval_s=3600.0)
    async with (await IngestionPipeline.create(config, faults=stop_before_pivot)).unwrap() as p:
        saga_id = await stranded_before_the_pivot(p, requests)
        fail_pivots(p.tiers, PIVOT_FAILURES[failure])
        yield p, saga_id


def status_of(tiers: Tiers, saga_id: str) -> SagaStatus | None:
    return tiers.cp.run(lambda c: sagas.status_of(c, saga_id), operation="t", write=False).unwrap()


@pytest.mark.parametrize("failure", ["serialization-failure", "connection-dropped"])
async def test_reaper_leaves_a_saga_whose_pivot_failed_transiently_for_its_next_pass(
    pg_cp_url: str, tmp_path: Path, failure: str
) -> None:
    # Given a saga whose driver died with every step before the pivot done, its lease expired,
    # and a PostgreSQL where the pivot's transaction fails transiently (the CP tier's retry bound
    # kept short, so it gives up on the first conflict it cannot get past)
    requests = real_requests(3)
    async with failing_pivot(pg_cp_url, tmp_path, failure, requests) as (p, saga_id):
        impatient = short_retries(p.tiers)
        # When the reaper runs
        (outcome,) = reap(impatient)
        # Then it reports the error and leaves the saga running, nothing undone, for its next pass
        assert outcome.saga_id == saga_id and outcome.action.startswith("error: commit_cp"), outcome
        assert status_of(p.tiers, saga_id) == SagaStatus.RUNNING
        assert tier_counts(p.tiers).ap_rows == 3
        # And once PostgreSQL lets the pivot through, the next pass commits the saga: the requests'
        # first result, which a replay gets
        heal_pivots(p.tiers)
        assert [(o.saga_id, o.action) for o in reap(p.tiers)] == [(saga_id, SagaStatus.COMMITTED.value)]
        replay = (await p.ingest_many(requests)).unwrap()
        assert all(r.unwrap().deduplicated for r in replay)
        assert reap(p.tiers) == []


async def test_reaper_compensates_a_saga_whose_pivot_failed_for_good(pg_cp_url: str, tmp_path: Path) -> None:
    # Given a saga stranded just before the pivot, and a PostgreSQL that refuses its pivot with an
    # error no retry changes
    async with failing_pivot(pg_cp_url, tmp_path, "check-violation", real_requests(3)) as (p, saga_id):
        # When the reaper runs, then it compensates the saga, as it did before
        assert [(o.saga_id, o.action) for o in reap(p.tiers)] == [(saga_id, SagaStatus.COMPENSATED.value)]
        counts = counts_after_gc(p.tiers)
        assert counts.stored() == 0 and counts.ap_rows == 0 and counts.rows["idempotency_keys"] == 0


@pytest.mark.parametrize("failure", ["serialization-failure", "connection-dropped"])
async def test_reaper_dead_letters_a_pivot_that_keeps_failing_transiently_and_sagas_retry_commits_it(
    pg_cp_url: str, tmp_path: Path, failure: str
) -> None:
    from prometheus_client import REGISTRY

    from datamesh.observability import ledger
    from tests.test_cli import run

    # Given a saga stranded just before the pivot, and a PostgreSQL where its pivot fails
    # transiently every time (the CP tier's own re-runs kept short)
    requests = real_requests(3)
    async with failing_pivot(pg_cp_url, tmp_path, failure, requests) as (p, saga_id):
        impatient = short_retries(p.tiers)
        counted = ledger.snapshot(REGISTRY)
        # When three reaper passes, bound to three pivot attempts, re-run it
        passes = [[(o.saga_id, o.action) for o in reap(impatient, pivot_attempts=3)] for _ in range(3)]
        # Then the first two leave it running for the next pass, counting,
        for attempt, outcomes in enumerate(passes[:2], start=1):
            ((seen, action),) = outcomes
            assert seen == saga_id and action.startswith(f"error: commit_cp (reaper attempt {attempt} of 3)"), action
        # and the third dead-letters it, with the reason naming the error,
        assert passes[2] == [(saga_id, SagaStatus.DEAD.value)]
        record = p.tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="t", write=False).unwrap()
        assert record is not None and record.status == SagaStatus.DEAD and record.failed_step == Step.COMMIT_CP
        assert record.error is not None and "retryable error on 3 reaper passes" in record.error
        assert (
            "pivot conflicted" if failure == "serialization-failure" else "server closed the connection"
        ) in record.error, record.error
        assert f"sagas retry {saga_id}" in record.error
        # nothing undone (its content and keys stay), counted dead-lettered, and left alone after
        held = tier_counts(p.tiers)
        assert held.ap_rows == 3 and held.rows["idempotency_keys"] == 3 and held.rows["turns"] == 0
        moved = ledger.snapshot(REGISTRY) - counted
        assert (moved.dead_letter, moved.in_flight, moved.compensated) == (3, -3, 0)
        assert reap(impatient, pivot_attempts=3) == []
        # Once PostgreSQL lets the pivot through,
        heal_pivots(p.tiers)
        config = p.config
    # when the operator re-drives it,
    env = {"DATAMESH_CP_URL": pg_cp_url, "DATAMESH_DATA_DIR": str(tmp_path / "data")}
    retried = run(["-m", "datamesh", "sagas", "retry", saga_id], tmp_path, **env)
    # then it commits, exactly once, and every tier holds its turns and nothing else:
    assert retried.returncode == 0 and f"{saga_id}: committed" in retried.stdout, retried.stdout + retried.stderr
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        assert status_of(p.tiers, saga_id) == SagaStatus.COMMITTED
        counts = counts_after_gc(p.tiers)
        assert counts.rows["turns"] == 3 and counts.rows["conversations"] == 3 and counts.ap_rows == 3
        assert counts.rows["idempotency_keys"] == 3 and counts.rows["object_refs"] == 0 and counts.blobs == 0
        assert p.tiers.cp.run(sagas.count_by_status, operation="t").unwrap() == {SagaStatus.COMMITTED.value: 1}
        replay = (await p.ingest_many(requests)).unwrap()
        assert all(r.unwrap().deduplicated for r in replay)
        for original, result in zip(requests, replay, strict=True):
            stored = (await p.get(result.unwrap().conversation_id)).unwrap()
            assert [(t.prompt, t.response) for t in stored.turns] == [(original.prompt, original.response)]
        assert reap(p.tiers) == []
    # and a second re-drive is refused: nothing is left to do
    again = run(["-m", "datamesh", "sagas", "retry", saga_id], tmp_path, **env)
    assert again.returncode == 1 and "committed: nothing to re-drive" in again.stdout, again.stdout
