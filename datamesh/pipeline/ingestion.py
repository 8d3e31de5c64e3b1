"""The public ingestion API: :class:`IngestionPipeline` and :class:`IngestionRequest`.

::

    config = DataMeshConfig.from_env().unwrap()
    pipeline = await IngestionPipeline.create(config)
    async with pipeline.unwrap() as p:
        result = await p.ingest(IngestionRequest(entity_id=..., prompt=b"...", response=b"...",
                                                 geo_region=GeoRegion.EU_WEST))

Every call returns a ``Result``.  An accepted turn is persisted (or its saga compensated and the
error returned); a replayed request returns the first response; backpressure waits or answers
``Err(Backpressure)``, it never drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from uuid import UUID

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import (
    AccessDenied,
    ConfigError,
    Error,
    NotFound,
    SagaFailed,
    StorageError,
    ValidationError,
)
from datamesh.core.principal import Action, Principal
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ConversationId, EntityId, GeoRegion, TurnId
from datamesh.observability import ledger, logs, metrics, tracing
from datamesh.pipeline import erasure, indexer
from datamesh.pipeline import search as search_path
from datamesh.pipeline.backpressure import Admission
from datamesh.pipeline.erasure import ErasureReport
from datamesh.pipeline.lineage import ProvenanceEntry, record_event
from datamesh.pipeline.plan import ItemPlan, SagaPlan
from datamesh.pipeline.prepare import Prepared, prepare
from datamesh.pipeline.reads import StoredConversation, get_conversation
from datamesh.pipeline.request import IngestionRequest, IngestionResponse, ValidRequest, validate
from datamesh.pipeline.saga import FaultHook, LocalSagaExecutor, ReapOutcome, reap
from datamesh.pipeline.search import SearchResult
from datamesh.pipeline.steps import Committed, Existing
from datamesh.pipeline.tiers import Tiers, reader_engine_for, reader_indexes_for
from datamesh.storage.ap.store import EngineFactory
from datamesh.storage.cp import provenance, sagas
from datamesh.storage.cp.sagas import SagaStatus
from datamesh.storage.index import Embedder, IndexReader, MiniLMEmbedder, RegionalIndexes

if TYPE_CHECKING:
    from datamesh.workers.executor import CeleryExecutor

__all__ = ["IngestionPipeline", "IngestionRequest", "IngestionResponse"]

MAX_BATCH_ITEMS = 100_000
_MAX_LABEL_CHARS = 200
_WAIT_POLL_S = 0.005
_REAP_INTERVAL_FRACTION = 0.5
_FLUSH_MAX_FAILED_PASSES = 3

ItemResult = Result[IngestionResponse, Error]
log = logs.logger(__name__)


class IngestionPipeline:
    """Ingests conversations into every tier through a saga; create with :meth:`create`."""

    def __init__(
        self,
        config: DataMeshConfig,
        tiers: Tiers,
        executor: LocalSagaExecutor | CeleryExecutor,
        *,
        embedder: Embedder | None = None,
    ) -> None:
        self.config = config
        self.tiers = tiers
        # Under Celery the index workers write the regional indexes; this process only searches them,
        # from the files or through the search workers (``DATAMESH_INDEX_READS``).
        self._writer_indexes: RegionalIndexes | None = None
        self.indexes: IndexReader
        if isinstance(executor, LocalSagaExecutor):
            self.indexes = self._writer_indexes = RegionalIndexes(config.resolved_index_dir)
        else:
            self.indexes = reader_indexes_for(config)
        self._index_settings = indexer.IndexerSettings(batch=config.index_batch, embedder=embedder)
        self._index_lock = asyncio.Lock()
        self._index_wakeup = asyncio.Event()
        self._indexer: asyncio.Task[None] | None = None
        self._draining: asyncio.Future[Result[indexer.DrainReport, StorageError]] | None = None
        self._executor = executor
        self._admission = Admission(
            rate=config.ingest_rate,
            burst=config.ingest_burst,
            max_in_flight=config.max_in_flight,
            wait=config.backpressure == "wait",
        )
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def create(
        cls,
        config: DataMeshConfig,
        *,
        faults: FaultHook | None = None,
        engine_factory: EngineFactory | None = None,
    ) -> Result[IngestionPipeline, Error]:
        """Open the tiers (migrating a local SQLite CP database) and recover expired sagas.

        With ``DATAMESH_EXECUTOR=celery`` the sagas run on the Celery workers: this process only reads
        the AP shards (their writers are the workers; ``DATAMESH_AP_READS`` says how) and ``faults``
        applies to ``reserve`` only (the one step run here).  The index workers (``worker --role
        index``) feed the indexes then: this process runs no background indexer and searches the
        indexes without writing them (``DATAMESH_INDEX_READS`` says how).
        """
        distributed = config.executor == "celery"
        if distributed and engine_factory is None:
            engine_factory = reader_engine_for(config)
        tiers = await asyncio.to_thread(Tiers.open, config, engine_factory=engine_factory)
        if isinstance(tiers, Err):
            return tiers
        embedder: Embedder | None = None
        if config.embedder == "minilm":
            loaded = await asyncio.to_thread(MiniLMEmbedder.load)
            if isinstance(loaded, Err):
                tiers.value.close()
                return Err(ConfigError("DATAMESH_EMBEDDER", loaded.error.message))
            embedder = loaded.value
        executor: LocalSagaExecutor | CeleryExecutor
        if distributed:
            from datamesh.workers.executor import CeleryExecutor

            try:
                executor = CeleryExecutor(tiers.value, config)
            except ValueError as exc:  # reliability_settings refuses an unsafe visibility timeout
                tiers.value.close()
                return Err(ConfigError("DATAMESH_VISIBILITY_TIMEOUT_S", str(exc)))
            if faults is not None:
                executor.faults = faults
        else:
            executor = LocalSagaExecutor(tiers.value, config.ap_shards)
            if faults is not None:
                executor.faults = faults
        pipeline = cls(config, tiers.value, executor, embedder=embedder)
        await pipeline.reap()
        loop = asyncio.get_running_loop()
        pipeline._reaper = loop.create_task(pipeline._reap_periodically())
        if config.indexer and not distributed:
            pipeline._indexer = loop.create_task(pipeline._index_periodically())
        return Ok(pipeline)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._reaper, self._indexer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._draining is not None:  # a pass runs on in its thread even when its awaiter is cancelled
            await asyncio.wait([self._draining])
        async with self._index_lock:
            await asyncio.to_thread(self.indexes.close)
        if not isinstance(self._executor, LocalSagaExecutor):
            self._executor.close()
        await asyncio.to_thread(self.tiers.close)

    # ---- writes -------------------------------------------------------------------------------

    async def ingest(
        self, request: IngestionRequest, *, principal: Principal | None = None, wait: bool = True
    ) -> Result[IngestionResponse, Error]:
        """Store one turn; the response carries its conversation id and the latency.

        With ``wait=False`` (Celery executor) it returns once the saga is enqueued: the response is
        ``pending`` and :meth:`saga_status` reports the saga's progress.
        """
        batch = await self.ingest_many([request], principal=principal, wait=wait)
        if isinstance(batch, Err):
            return batch
        return batch.value[0]

    async def ingest_many(
        self, requests: Sequence[IngestionRequest], *, principal: Principal | None = None, wait: bool = True
    ) -> Result[list[ItemResult], Error]:
        """Store many turns as one saga; returns one result per request, in order.

        With ``wait=False`` (Celery executor) new turns come back ``pending`` with their saga id
        as soon as the saga is enqueued; replays of finished requests come back as usual.

        A bad item gets its own ``Err`` and does not fail the others.  The outer ``Err`` is for the
        batch as a whole (backpressure, a batch that is not a list or is too large).
        """
        started = time.perf_counter_ns()
        size = len(requests) if isinstance(requests, Sequence) else 0
        with tracing.span("pipeline.ingest_many", **{"datamesh.items": size}) as current:
            outcome = await self._ingest_many(requests, principal, started, wait)
            _observe_ingest(outcome, requests, started, current)
        return outcome

    async def _ingest_many(
        self, requests: Sequence[IngestionRequest], principal: Principal | None, started: int, wait: bool
    ) -> Result[list[ItemResult], Error]:
        if isinstance(requests, str | bytes) or not isinstance(requests, Sequence):
            return Err(ValidationError("requests", "expected a list of IngestionRequest"))
        if len(requests) > MAX_BATCH_ITEMS:
            return Err(
                ValidationError("requests", f"{len(requests)} items exceed the batch maximum of {MAX_BATCH_ITEMS}")
            )
        if self._closed:
            return Err(StorageError("pipeline", "ingest", "the pipeline is closed"))
        caller = self._caller(principal)
        if not caller.can(Action.WRITE):
            return Err(AccessDenied("write", f"principal {caller.name!r} may not write"))
        results: list[ItemResult | None] = [None] * len(requests)
        valid = []
        for index, request in enumerate(requests):
            checked = validate(request, max_payload_bytes=self.config.max_payload_bytes)
            if isinstance(checked, Err):
                results[index] = checked
            elif caller.entities is not None and not caller.sees_entity(str(checked.value.entity_id)):
                results[index] = Err(AccessDenied("write", f"principal {caller.name!r} has no grant on this entity"))
            else:
                valid.append((index, checked.value))
        if valid:
            async with self._admission.admit(len(valid)) as admitted:
                if isinstance(admitted, Err):
                    return admitted
                done = await asyncio.to_thread(self._run_batch, caller.tenant, valid, started, wait)
            for index, outcome in done.items():
                results[index] = outcome
            if any(isinstance(r, Ok) and not r.value.deduplicated for r in done.values()):
                self._index_wakeup.set()  # index outbox rows were committed: feed them soon
        return Ok([r if r is not None else Err(StorageError("pipeline", "ingest", "no outcome")) for r in results])

    def _run_batch(
        self, tenant: str, valid: list[tuple[int, ValidRequest]], started: int, wait: bool = True
    ) -> dict[int, ItemResult]:
        prepared = {index: prepare(index, request) for index, request in valid}
        out: dict[int, ItemResult] = {}
        pending = list(prepared.values())
        deadline = time.monotonic() + self.config.idempotency_wait_s
        while pending:
            outcome = self._executor.reserve(tenant, pending)
            if isinstance(outcome, Err):
                for p in pending:
                    out[p.index] = outcome
                break
            decided = outcome.value
            for index, error in decided.rejected.items():
                out[index] = Err(error)
            for index, existing in decided.existing.items():
                out[index] = Ok(_response(existing, started, deduplicated=True))
            if decided.plan.items:
                self._execute(decided.plan, prepared, out, started, wait)
            pending = [prepared[i] for i in decided.waiting]
            if pending and time.monotonic() > deadline:
                for p in pending:
                    out[p.index] = Err(
                        StorageError("cp", "ingest", f"a request with key {p.key!r} is still in flight", retryable=True)
                    )
                break
            if pending:
                time.sleep(_WAIT_POLL_S)
        return out

    def _execute(
        self, plan: SagaPlan, prepared: dict[int, Prepared], out: dict[int, ItemResult], started: int, wait: bool
    ) -> None:
        content = {}
        blobs: dict[tuple[str, str], bytes] = {}
        for item in plan.items:
            r = prepared[item.index].request
            content[item.index] = (r.prompt, r.response, r.embedding)
            if item.prompt_location == "objects":
                blobs[(item.region, item.prompt_sha256)] = r.prompt
            if item.response_location == "objects":
                blobs[(item.region, item.response_sha256)] = r.response
        if not wait and not isinstance(self._executor, LocalSagaExecutor):
            submitted = self._executor.submit(plan, content, blobs)
            for item in plan.items:
                out[item.index] = (
                    Err(submitted.error) if isinstance(submitted, Err) else Ok(_pending(item, plan, started))
                )
            return
        result = self._executor.execute(plan, content, blobs)
        if isinstance(result, Err):
            failure: SagaFailed | StorageError = result.error
            for item in plan.items:
                out[item.index] = Err(failure)
            return
        for committed in result.value:
            out[committed.index] = Ok(_response(committed, started, deduplicated=False, saga_id=plan.saga_id))

    # ---- reads and maintenance ------------------------------------------------------------------

    async def get(
        self, conversation_id: ConversationId | str, *, principal: Principal | None = None
    ) -> Result[StoredConversation, Error]:
        """A conversation with every turn's content, verified against the CP tier's hashes.

        A conversation the principal may not see is ``NotFound``, as if it did not exist.
        """
        with tracing.span("pipeline.get") as current, logs.bind(conversation_id=str(conversation_id)):
            found = await self._get(conversation_id, principal)
            if isinstance(found, Err) and not isinstance(found.error, NotFound | AccessDenied | ValidationError):
                tracing.set_error(type(found.error).__name__, current)
            return found

    async def _get(
        self, conversation_id: ConversationId | str, principal: Principal | None
    ) -> Result[StoredConversation, Error]:
        parsed = ConversationId.parse(conversation_id, "conversation_id")
        if isinstance(parsed, Err):
            return parsed
        caller = self._caller(principal)
        if not caller.can(Action.READ):
            return Err(AccessDenied("read", f"principal {caller.name!r} may not read"))
        found = await asyncio.to_thread(get_conversation, self.tiers, caller.tenant, parsed.value)
        if isinstance(found, Ok) and not caller.sees_entity(str(found.value.entity_id)):
            return Err(NotFound("conversation", str(parsed.value)))
        return found

    # ---- search and erasure ---------------------------------------------------------------------

    async def search(
        self,
        text: str | None = None,
        vector: Sequence[float] | None = None,
        *,
        entity_id: EntityId | str | None = None,
        region: GeoRegion | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 10,
        principal: Principal | None = None,
    ) -> Result[list[SearchResult], Error]:
        """The best ``limit`` turns the principal may see, by words, by vector, or both.

        Needs the reader role.  The principal's tenant and entity grants are applied inside each
        index query.  ``region=None`` searches every indexed region and merges hits by score.
        ``since`` is inclusive, ``until`` exclusive (timezone-aware).  The index is fed after the
        CP commit, so a turn is searchable a moment after ``ingest`` returns (``flush_index``).
        """
        with tracing.span("pipeline.search") as current:
            found = await self._search(text, vector, entity_id, region, since, until, limit, principal)
            if isinstance(found, Err) and not isinstance(found.error, AccessDenied | ValidationError):
                tracing.set_error(type(found.error).__name__, current)
            return found

    async def _search(
        self,
        text: object,
        vector: object,
        entity_id: object,
        region: object,
        since: object,
        until: object,
        limit: object,
        principal: Principal | None,
    ) -> Result[list[SearchResult], Error]:
        if self._closed:
            return Err(StorageError("pipeline", "search", "the pipeline is closed"))
        caller = self._caller(principal)
        if not caller.can(Action.READ):
            return Err(AccessDenied("read", f"principal {caller.name!r} may not read"))
        query = search_path.validate_query(
            text=text, vector=vector, entity_id=entity_id, region=region, since=since, until=until, limit=limit
        )
        if isinstance(query, Err):
            return query
        return await asyncio.to_thread(search_path.search, self.tiers, self.indexes, caller, query.value)

    async def erase_conversation(
        self, conversation_id: ConversationId | str, *, principal: Principal | None = None
    ) -> Result[ErasureReport, Error]:
        """Erase a conversation from every tier (admins, or writers granted its entity).

        Once this returns ``Ok``, ``get`` answers ``NotFound`` and search no longer finds it; its AP
        content and index entries are deleted before returning when possible, else by the indexer.
        """
        parsed = ConversationId.parse(conversation_id, "conversation_id")
        if isinstance(parsed, Err):
            return parsed
        if self._closed:
            return Err(StorageError("pipeline", "erase", "the pipeline is closed"))
        caller = self._caller(principal)
        with tracing.span("pipeline.erase_conversation"):
            erased = await asyncio.to_thread(erasure.erase_conversation, self.tiers, caller, parsed.value)
            if isinstance(erased, Ok) and erased.value.conversations:
                await self._index_erasure()
            return erased

    async def erase_entity(
        self, entity_id: EntityId | str, *, principal: Principal | None = None
    ) -> Result[ErasureReport, Error]:
        """Erase every conversation of an entity from every tier (admins, or writers granted it)."""
        parsed = EntityId.parse(entity_id, "entity_id")
        if isinstance(parsed, Err):
            return parsed
        if self._closed:
            return Err(StorageError("pipeline", "erase", "the pipeline is closed"))
        caller = self._caller(principal)
        with tracing.span("pipeline.erase_entity"):
            erased = await asyncio.to_thread(erasure.erase_entity, self.tiers, caller, parsed.value)
            if isinstance(erased, Ok) and erased.value.conversations:
                await self._index_erasure()
            return erased

    async def flush_index(self) -> Result[int, Error]:
        """Do all index outbox work now, backoffs ignored; returns rows done (tests, demo, CLI).

        ``Err`` with the last failure when rows are still owed after a few failing passes.  Under
        Celery the index workers do the work: this publishes a drain per region and waits (up to
        ``DATAMESH_SAGA_WAIT_S``) for the outbox to be empty; it returns 0 then.
        """
        if not isinstance(self._executor, LocalSagaExecutor):
            return await asyncio.to_thread(self._flush_distributed)
        done = 0
        failed_passes = 0
        while True:
            report = await self._drain(due_only=False)
            if isinstance(report, Err):
                return report
            done += report.value.done
            if report.value.failed:
                failed_passes += 1
                if failed_passes >= _FLUSH_MAX_FAILED_PASSES:
                    return Err(report.value.errors[-1])
            elif report.value.claimed == 0:
                return Ok(done)

    async def _index_erasure(self) -> None:
        """Local: do the erasure's index work now.  Celery: hand it to the index workers (no wait)."""
        if isinstance(self._executor, LocalSagaExecutor):
            await self.flush_index()
            return
        published = await asyncio.to_thread(self._executor.enqueue_index_drains)
        if isinstance(published, Err):
            log.warning("erasure: index drains not published (beat's drains will do it): %s", published.error)

    def _flush_distributed(self) -> Result[int, Error]:
        assert not isinstance(self._executor, LocalSagaExecutor)
        published = self._executor.enqueue_index_drains()
        if isinstance(published, Err):
            return published
        deadline = time.monotonic() + self.config.saga_wait_s
        while True:
            status = indexer.outbox_status(self.tiers)
            if isinstance(status, Err):
                return status
            if not status.value.regions:
                return Ok(0)
            if time.monotonic() > deadline:
                owed = sum(d.rows for d in status.value.regions.values())
                return Err(StorageError("pipeline", "index", f"{owed} index outbox rows still owed", retryable=True))
            time.sleep(0.2)

    async def _drain(self, *, due_only: bool) -> Result[indexer.DrainReport, StorageError]:
        """One indexer pass in a thread, one at a time; ``close`` waits for a pass in flight."""
        async with self._index_lock:
            if self._closed:
                return Err(StorageError("pipeline", "index", "the pipeline is closed"))
            indexes = self._writer_indexes
            if indexes is None:  # unreachable: only a local pipeline drains (the index workers do under Celery)
                return Err(StorageError("pipeline", "index", "this process does not write the indexes"))
            work = asyncio.ensure_future(
                asyncio.to_thread(indexer.drain_once, self.tiers, indexes, self._index_settings, due_only=due_only)
            )
            self._draining = work
            return await asyncio.shield(work)

    async def _index_periodically(self) -> None:
        """The local indexer: drain the outbox when woken by a commit, or every interval."""
        while True:
            # a timer sets the event rather than wait_for(), whose cancellation 3.11 can swallow
            timer = asyncio.get_running_loop().call_later(self.config.index_interval_s, self._index_wakeup.set)
            try:
                await self._index_wakeup.wait()
            finally:
                timer.cancel()
            self._index_wakeup.clear()
            try:
                while True:
                    report = await self._drain(due_only=True)
                    if isinstance(report, Err):
                        log.warning("index outbox unavailable: %s", report.error)
                        break
                    if report.value.claimed < self._index_settings.batch:
                        break
            except Exception:
                log.exception("index pass failed")

    # ---- provenance after ingest ----------------------------------------------------------------

    async def record_derived(
        self,
        conversation_id: ConversationId | str,
        *,
        kind: str,
        model: str,
        turn_seq: int | None = None,
        artifact_sha256: str | None = None,
        principal: Principal | None = None,
    ) -> Result[ProvenanceEntry, Error]:
        """Record that an artifact ``kind`` (e.g. ``"embedding"``) was derived by ``model``."""
        for name, value in (("kind", kind), ("model", model)):
            if not isinstance(value, str) or not 0 < len(value) <= _MAX_LABEL_CHARS:
                return Err(ValidationError(name, f"expected 1-{_MAX_LABEL_CHARS} characters"))
        event = provenance.derived_artifact(
            kind,
            model=model,
            turn_seq=turn_seq,
            artifact_sha256=artifact_sha256,
            principal=self._caller(principal),
        )
        return await self._record(conversation_id, event, principal)

    async def record_access_change(
        self,
        conversation_id: ConversationId | str,
        *,
        granted: bool,
        subject: str,
        role: str,
        principal: Principal | None = None,
    ) -> Result[ProvenanceEntry, Error]:
        """Record that ``subject`` was granted (or lost) ``role`` on the conversation (admins only)."""
        event = provenance.access_change(granted=granted, subject=subject, role=role, principal=self._caller(principal))
        return await self._record(conversation_id, event, principal)

    async def record_redaction(
        self,
        conversation_id: ConversationId | str,
        *,
        erased: bool,
        reason: str,
        turn_seqs: Sequence[int] | None = None,
        principal: Principal | None = None,
    ) -> Result[ProvenanceEntry, Error]:
        """Record a redaction (or an erasure) of some turns, or of all of them (admins only)."""
        event = provenance.redaction(
            erased=erased, turn_seqs=turn_seqs, reason=reason, principal=self._caller(principal)
        )
        return await self._record(conversation_id, event, principal)

    async def _record(
        self,
        conversation_id: ConversationId | str,
        event: tuple[provenance.ProvenanceKind, dict[str, Any]],
        principal: Principal | None,
    ) -> Result[ProvenanceEntry, Error]:
        if self._closed:
            return Err(StorageError("pipeline", "provenance", "the pipeline is closed"))
        caller = self._caller(principal)
        recorded = await asyncio.to_thread(record_event, self.tiers, caller, conversation_id, event)
        return recorded

    async def saga_status(self, saga_id: str) -> Result[SagaStatus, Error]:
        """Where a saga is: ``running``, ``committed``, ``compensating``, ``compensated`` or ``dead``."""
        found = await asyncio.to_thread(
            lambda: self.tiers.cp.run(lambda c: sagas.status_of(c, saga_id), operation="saga.status", write=False)
        )
        if isinstance(found, Err):
            return found
        if found.value is None:
            return Err(NotFound("saga", saga_id))
        return Ok(found.value)

    def _caller(self, principal: Principal | None) -> Principal:
        return principal if principal is not None else Principal.local_default(self.config.tenant)

    async def reap(self) -> list[ReapOutcome]:
        """Finish or compensate sagas whose lease expired (e.g. after a crash)."""
        with tracing.span("pipeline.reap"):
            if not isinstance(self._executor, LocalSagaExecutor):
                return await asyncio.to_thread(self._executor.reap)
            return await asyncio.to_thread(lambda: reap(self.tiers, pivot_attempts=self.config.reaper_pivot_attempts))

    async def _reap_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.saga_lease_s * _REAP_INTERVAL_FRACTION)
            await self.reap()


_REFUSALS = {
    "ValidationError": "invalid",
    "AccessDenied": "denied",
    "Backpressure": "backpressure",
    "IdempotencyConflict": "conflict",
    "NotFound": "not_found",
}


def _observe_ingest(
    outcome: Result[list[ItemResult], Error], requests: Sequence[IngestionRequest], started: int, current: object
) -> None:
    """Metrics, trace status and logs of one ingest call; never raises."""
    try:
        failed = _count_refusals(outcome, requests)
        if failed:
            tracing.set_error(failed)
        if metrics.enabled():
            metrics.INGEST_CALLS.labels("error" if failed else "ok").inc()
            metrics.INGEST_CALL_SECONDS.observe((time.perf_counter_ns() - started) / 1e9)
        # a single turn's log line carries its conversation (a batch's has many: see the saga id)
        single = outcome.value if isinstance(outcome, Ok) and len(outcome.value) == 1 else []
        ids = {"conversation_id": str(single[0].value.conversation_id)} if single and isinstance(single[0], Ok) else {}
        if failed:
            log.warning("ingest of %d items: %s", len(requests), failed, extra=ids)
        else:
            elapsed_ms = (time.perf_counter_ns() - started) / 1e6
            log.info("ingest of %d items done in %.2f ms", len(requests), elapsed_ms, extra=ids)
    except Exception:  # noqa: BLE001 - observability never raises into the data path
        return


def _count_refusals(outcome: Result[list[ItemResult], Error], requests: Sequence[IngestionRequest]) -> str:
    """Count turns refused before a saga accepted them; returns a failure description or ``""``."""
    listed = requests if isinstance(requests, Sequence) and not isinstance(requests, str | bytes) else []
    regions = [_region_label(r) for r in listed]
    if isinstance(outcome, Err):
        name = type(outcome.error).__name__
        ledger.rejected(regions, _REFUSALS.get(name, "error"))
        return "" if name in ("ValidationError", "AccessDenied", "Backpressure") else name
    failure = ""
    for region, item in zip(regions, outcome.value, strict=False):
        if isinstance(item, Ok):
            continue
        error = item.error
        if isinstance(error, SagaFailed) and error.saga_id != "-":
            failure = failure or "saga failed"  # accepted, then compensated or dead: counted by the saga
            continue
        name = type(error).__name__
        ledger.rejected([region], _REFUSALS.get(name, "error"))
        if name in ("StorageError", "SagaFailed"):
            failure = failure or name
    return failure


def _region_label(request: object) -> str:
    parsed = GeoRegion.parse(getattr(request, "geo_region", None))
    return parsed.value.value if isinstance(parsed, Ok) else "unknown"  # a closed set: never the raw value


def _pending(item: ItemPlan, plan: SagaPlan, started: int) -> IngestionResponse:
    return IngestionResponse(
        conversation_id=ConversationId(UUID(item.conversation_id)),
        turn_id=TurnId(UUID(item.turn_id)),
        turn_seq=0 if item.new_conversation else -1,
        saga_id=plan.saga_id,
        latency_ms=(time.perf_counter_ns() - started) / 1e6,
        pending=True,
    )


def _response(
    outcome: Committed | Existing, started: int, *, deduplicated: bool, saga_id: str | None = None
) -> IngestionResponse:
    return IngestionResponse(
        conversation_id=ConversationId(UUID(outcome.conversation_id)),
        turn_id=TurnId(UUID(outcome.turn_id)),
        turn_seq=outcome.turn_seq,
        saga_id=saga_id if saga_id is not None else getattr(outcome, "saga_id", ""),
        latency_ms=(time.perf_counter_ns() - started) / 1e6,
        deduplicated=deduplicated,
    )
