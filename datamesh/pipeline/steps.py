"""The saga's steps and their compensations, as plain functions over the tiers.

These run unchanged under the in-process executor and inside Celery tasks.  Every function is
idempotent: keyed by the saga id, it may be re-run after a crash or a redelivered message.

    reserve      → idempotency keys, the saga row, blob references      (undo: release keys)
    store_blobs  → large payloads into the region's object store        (undo: drop references, collect)
    write_ap     → turn content into the region's AP shards             (undo: delete the saga's keys)
    commit_cp    → conversations, turns, provenance, index outbox rows: the pivot; visibility starts here
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy.engine import Connection

from datamesh.core.errors import IdempotencyConflict, NotFound, StorageError, ValidationError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ContentHash, GeoRegion, SagaId, uuid7_texts
from datamesh.observability import ledger
from datamesh.observability.instrument import saga_step
from datamesh.pipeline.plan import LOCATION_AP, ItemPlan, SagaPlan
from datamesh.pipeline.prepare import Prepared, blobs_of
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.ap.record import Payload, encode_turn, turn_head, turn_key_of
from datamesh.storage.cp import conversations, idempotency, index_outbox, object_refs, provenance, sagas
from datamesh.storage.cp.provenance import ProvenanceKind
from datamesh.storage.cp.sagas import SagaStatus, StepState
from datamesh.storage.cp.sql import utcnow


class Step(StrEnum):
    RESERVE = "reserve"
    STORE_BLOBS = "store_blobs"
    WRITE_AP = "write_ap"
    COMMIT_CP = "commit_cp"


PRE_PIVOT = (Step.RESERVE, Step.STORE_BLOBS, Step.WRITE_AP)


@dataclass(frozen=True, slots=True)
class Existing:
    """The first result of a replayed request."""

    conversation_id: str
    turn_id: str
    turn_seq: int
    saga_id: str


ItemError = IdempotencyConflict | NotFound | ValidationError


@dataclass(slots=True)
class ReserveOutcome:
    """What ``reserve`` decided for each prepared request (by index)."""

    plan: SagaPlan
    existing: dict[int, Existing]
    waiting: list[int]
    rejected: dict[int, ItemError]


@dataclass(frozen=True, slots=True)
class Committed:
    index: int
    conversation_id: str
    turn_id: str
    turn_seq: int


class _NotRunning(Exception):
    def __init__(self, status: SagaStatus | None) -> None:
        super().__init__(f"saga is {status}")
        self.status = status


# ---- reserve ----------------------------------------------------------------------------------


@saga_step("reserve")
def reserve(
    tiers: Tiers, tenant: str, prepared: Sequence[Prepared], *, shard_count: int
) -> Result[ReserveOutcome, StorageError]:
    """Decide per request: new work, a replay of a finished one, one in flight, or an error."""
    saga_id = str(SagaId.generate())

    def tx(conn: Connection) -> ReserveOutcome:
        idempotency.serialize_reservations(conn)  # first: the snapshot must come after the lock
        now = utcnow()
        states = idempotency.lookup_many(conn, tenant, [p.key for p in prepared])
        targets = conversations.get_many(
            conn, [str(p.request.conversation_id) for p in prepared if p.request.conversation_id]
        )
        outcome = ReserveOutcome(SagaPlan(saga_id, tenant, [], []), {}, [], {})
        seen: dict[str, Prepared] = {}
        accepted: list[Prepared] = []
        for p in prepared:
            state = states.get(p.key)
            earlier = seen.get(p.key)
            if (state and state.request_sha256 != p.digest) or (earlier and earlier.digest != p.digest):
                outcome.rejected[p.index] = IdempotencyConflict(p.key)
            elif state and state.status == idempotency.COMPLETED:
                assert state.conversation_id and state.turn_id and state.turn_seq is not None
                outcome.existing[p.index] = Existing(
                    state.conversation_id, state.turn_id, state.turn_seq, state.saga_id
                )
            elif state or earlier:
                outcome.waiting.append(p.index)  # the first request with this key is in flight
            elif (problem := _target_problem(p, targets, tenant)) is not None:
                outcome.rejected[p.index] = problem
            else:
                seen[p.key] = p
                accepted.append(p)
        ids = iter(uuid7_texts(sum(p.new_ids for p in accepted)))  # in item order, as one by one
        outcome.plan.items.extend(
            p.to_item(inline_max_bytes=tiers.inline_max_bytes, shard_count=shard_count, ids=ids) for p in accepted
        )
        plan = outcome.plan
        if plan.items:
            plan.blobs = blobs_of(plan.items)
            # handed to a queue (Celery) or run at once (in-process): see Tiers.queue_lease_s
            sagas.create(conn, saga_id, tenant, plan.to_json(), now=now, lease_s=tiers.queue_lease_s)
            idempotency.reserve_many(
                conn,
                tenant,
                saga_id,
                [(i.idempotency_key, i.request_sha256, i.conversation_id, i.turn_id) for i in plan.items],
                now,
            )
            object_refs.add_refs(conn, saga_id, [(b.region, b.content_hash, b.size) for b in plan.blobs], now)
            sagas.record_step(conn, saga_id, Step.RESERVE, StepState.DONE, now=now, lease_s=tiers.queue_lease_s)
            if not plan.blobs:  # nothing to store: the step is done with the reservation, saving a commit
                sagas.record_step(conn, saga_id, Step.STORE_BLOBS, StepState.DONE, now=now, lease_s=tiers.queue_lease_s)
        return outcome

    decided = tiers.cp.run(tx, operation="saga.reserve", retry_unique_violation=True)
    if isinstance(decided, Ok):
        _count_reserved(decided.value, prepared)
    return decided


def _count_reserved(outcome: ReserveOutcome, prepared: Sequence[Prepared]) -> None:
    """The ledger's entries for a committed reserve: accepted and replayed turns (refusals: the pipeline)."""
    ledger.accepted(item.region for item in outcome.plan.items)
    if outcome.existing:
        region_of = {p.index: p.request.region.value for p in prepared}
        ledger.deduplicated(region_of[i] for i in outcome.existing)


def _target_problem(p: Prepared, targets: Mapping[str, conversations.ConversationRow], tenant: str) -> ItemError | None:
    wanted = p.request.conversation_id
    if wanted is None:
        return None
    row = targets.get(str(wanted))
    if row is None or row.tenant != tenant or row.status != conversations.ACTIVE:
        return NotFound("conversation", str(wanted))
    if row.entity_id != str(p.request.entity_id):
        return ValidationError("conversation_id", "the conversation belongs to another entity")
    if row.region != p.request.region.value:
        return ValidationError("geo_region", f"the conversation is stored in region {row.region}")
    return None


# ---- store_blobs / write_ap -----------------------------------------------------------------


@saga_step("store_blobs")
def store_blobs(
    tiers: Tiers, plan: SagaPlan, blobs: Mapping[tuple[str, str], bytes], *, part: str | None = None
) -> Result[int, StorageError | NotFound]:
    """Put every planned blob into its region's store (a blob already present is not rewritten).

    With ``part`` (the distributed executor stores each region's blobs in a task of its own), that
    part is recorded done with the step, so a late duplicate of it is recognised and skipped.
    """
    if not plan.blobs:
        return Ok(0)  # recorded done by reserve
    written = 0
    for blob in plan.blobs:
        store = tiers.objects.for_region(GeoRegion(blob.region))
        if isinstance(store, Err):
            return store
        data = blobs.get((blob.region, blob.content_hash))
        if data is None:
            return Err(StorageError("objects", "store_blobs", f"content of blob {blob.content_hash} is not available"))
        put = store.value.put(data)
        if isinstance(put, Err):
            return put
        if put.value.content_hash.hex != blob.content_hash:
            return Err(
                StorageError(
                    "objects", "store_blobs", f"blob hashed to {put.value.content_hash} not {blob.content_hash}"
                )
            )
        written += int(put.value.written)
    if part is None:
        return _record(tiers, plan.saga_id, Step.STORE_BLOBS, StepState.DONE).map(lambda _: written)
    return _record_done(tiers, plan.saga_id, [part, Step.STORE_BLOBS], "store_blobs").map(lambda _: written)


def ap_records(
    plan: SagaPlan, content: Mapping[int, tuple[bytes, bytes, tuple[float, ...] | None]]
) -> dict[str, list[tuple[bytes, bytes]]]:
    """The AP key/value pairs of a plan, grouped by region."""
    head = turn_head(SagaId.parse(plan.saga_id).unwrap())
    by_region: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
    for item in plan.items:
        prompt, response, embedding = content[item.index]
        record = encode_turn(  # TurnContent(...).encode(), inline payloads passed as they are
            head,
            prompt if item.prompt_location == LOCATION_AP else Payload(ref=ContentHash(item.prompt_sha256)),
            response if item.response_location == LOCATION_AP else Payload(ref=ContentHash(item.response_sha256)),
            embedding,
        )
        by_region[item.region].append((_key(item), record))
    return by_region


@saga_step("write_ap")
def write_ap(
    tiers: Tiers, plan: SagaPlan, content: Mapping[int, tuple[bytes, bytes, tuple[float, ...] | None]]
) -> Result[int, StorageError]:
    """Write each turn's content (inline payloads, references to blobs, embedding) to its shard."""
    written = 0
    for region, items in ap_records(plan, content).items():
        put = tiers.ap.put_many(GeoRegion(region), items)
        if isinstance(put, Err):
            return put
        written += put.value
    return _record(tiers, plan.saga_id, Step.WRITE_AP, StepState.DONE).map(lambda _: written)


def write_ap_part(
    tiers: Tiers,
    plan: SagaPlan,
    content: Mapping[int, tuple[bytes, bytes, tuple[float, ...] | None]],
    *,
    part: str,
    marks: Sequence[Step] = (),
) -> Result[int, StorageError]:
    """Write the content of one part of a plan (one region's shard) and record ``part`` done.

    The distributed executor splits ``write_ap`` by shard, one task on each shard's queue.  Only the
    last part also records ``write_ap`` itself (``marks``): the reaper drives a saga forward only when
    ``write_ap`` is done, which must mean every shard holds its content.
    """
    written = 0
    for region, items in ap_records(plan, content).items():
        put = tiers.ap.put_many(GeoRegion(region), items)
        if isinstance(put, Err):
            return put
        written += put.value

    return _record_done(tiers, plan.saga_id, [part, *marks], "write_ap_part").map(lambda _: written)


def _record_done(tiers: Tiers, saga_id: str, steps: Sequence[str], name: str) -> Result[None, StorageError]:
    """Record a part and the steps it completes done, in one transaction.  The next part (or the
    pivot) is published now: the saga waits in its queue, under the queue timeout."""

    def tx(conn: Connection) -> None:
        now = utcnow()
        for step in steps:
            sagas.record_step(conn, saga_id, step, StepState.DONE, now=now, lease_s=tiers.queue_lease_s)

    return tiers.cp.run(tx, operation=f"saga.{name}.record")


def mark_done(tiers: Tiers, saga_id: str, step: Step) -> Result[None, StorageError]:
    """Record a step done that had nothing to do (``store_blobs`` of a plan without blobs)."""
    return _record(tiers, saga_id, step, StepState.DONE)


def _key(item: ItemPlan) -> bytes:
    """The AP key of an item (see :func:`datamesh.storage.ap.record.turn_key` for the layout)."""
    return turn_key_of(item.entity_id, item.conversation_id, item.turn_id)


# ---- commit_cp: the pivot -------------------------------------------------------------------


@saga_step("commit_cp")
def commit_cp(tiers: Tiers, plan: SagaPlan) -> Result[list[Committed], StorageError | _NotRunning]:
    """Make the saga's turns visible in one serializable transaction; only a running saga commits."""

    appended_to = sorted({i.conversation_id for i in plan.items if not i.new_conversation})

    def tx(conn: Connection) -> list[Committed] | _NotRunning:
        now = utcnow()
        # pivots appending to the same conversation queue on its row here, before any work
        provenance.lock_chains(conn, appended_to, now=now)
        if not sagas.transition(
            conn, plan.saga_id, from_status=(SagaStatus.RUNNING,), to_status=SagaStatus.COMMITTED, now=now
        ):
            return _NotRunning(sagas.status_of(conn, plan.saga_id))
        existing = conversations.get_many(conn, [i.conversation_id for i in plan.items if not i.new_conversation])
        counts = {cid: row.turn_count for cid, row in existing.items()}
        new_rows: list[dict[str, Any]] = []
        turn_rows: list[dict[str, Any]] = []
        events: list[tuple[str, ProvenanceKind, str]] = []
        done: list[Committed] = []
        for item in plan.items:
            if item.new_conversation and item.conversation_id not in counts:
                counts[item.conversation_id] = 0
                new_rows.append(_conversation_row(plan.tenant, item, now))
            seq = counts[item.conversation_id]
            counts[item.conversation_id] = seq + 1
            turn_rows.append(_turn_row(plan.saga_id, item, seq, now))
            events.extend(_events(plan.saga_id, item, seq, tiers.ap.shard_path))
            done.append(Committed(item.index, item.conversation_id, item.turn_id, seq))
        for row in new_rows:  # a new conversation is inserted with its final count: no update
            row["turn_count"] = counts[row["id"]]
        conversations.insert_conversations(conn, new_rows)
        conversations.set_turn_counts(conn, {c: n for c, n in counts.items() if c in existing}, now)
        conversations.insert_turns(conn, turn_rows)
        provenance.append_many(conn, events, now=now, known_new=frozenset(r["id"] for r in new_rows))
        # the keys read completed from the saga's status from this commit on (storage/cp/idempotency.py)
        regions = sorted({i.region for i in plan.items})  # index work is owed from this commit on
        index_outbox.enqueue(conn, [(index_outbox.ADD, plan.saga_id, r, plan.tenant) for r in regions], now)
        sagas.record_step(conn, plan.saga_id, Step.COMMIT_CP, StepState.DONE, now=now, lease_s=tiers.lease_s)
        return done

    result = tiers.cp.run(tx, operation="saga.commit_cp")
    if isinstance(result, Ok) and isinstance(result.value, _NotRunning):
        return Err(result.value)
    if isinstance(result, Ok):
        ledger.persisted(item.region for item in plan.items)  # this call made the transition
    return result  # type: ignore[return-value]


def _conversation_row(tenant: str, item: ItemPlan, now: Any) -> dict[str, Any]:
    return {
        "id": item.conversation_id,
        "tenant": tenant,
        "entity_id": item.entity_id,
        "region": item.region,
        "status": conversations.ACTIVE,
        "turn_count": 0,
        "created_at": now,
        "updated_at": now,
    }


def _turn_row(saga_id: str, item: ItemPlan, seq: int, now: Any) -> dict[str, Any]:
    return {
        "conversation_id": item.conversation_id,
        "seq": seq,
        "turn_id": item.turn_id,
        "saga_id": saga_id,
        "prompt_sha256": item.prompt_sha256,
        "prompt_size": item.prompt_size,
        "prompt_location": item.prompt_location,
        "response_sha256": item.response_sha256,
        "response_size": item.response_size,
        "response_location": item.response_location,
        "ap_shard": item.shard,
        "has_embedding": item.has_embedding,
        "metadata_json": json.dumps(item.metadata, sort_keys=True) if item.metadata else None,
        "created_at": now,
    }


def _events(saga_id: str, item: ItemPlan, seq: int, shard_path: Any) -> list[tuple[str, ProvenanceKind, str]]:
    def where(location: str, sha256: str) -> tuple[str, str]:
        if location == LOCATION_AP:
            return ("ap", f"{item.region}/shard-{item.shard:03d}")
        return ("objects", f"{item.region}/{sha256}")

    ingested = provenance.turn_ingested(
        turn_id=item.turn_id,
        turn_seq=seq,
        saga_id=saga_id,
        prompt_sha256=item.prompt_sha256,
        prompt_size=item.prompt_size,
        response_sha256=item.response_sha256,
        response_size=item.response_size,
    )
    stored = provenance.content_stored(
        turn_id=item.turn_id,
        prompt=where(item.prompt_location, item.prompt_sha256),
        response=where(item.response_location, item.response_sha256),
        embedding=item.has_embedding,
    )
    return [
        (item.conversation_id, ProvenanceKind.TURN_INGESTED, ingested),
        (item.conversation_id, ProvenanceKind.CONTENT_STORED, stored),
    ]


def _record(tiers: Tiers, saga_id: str, step: Step, state: StepState) -> Result[None, StorageError]:
    """Record a step done: its successor runs next, from a queue under the Celery executor (whose
    wait the queue timeout bounds), at once in-process."""
    return tiers.cp.run(
        lambda conn: sagas.record_step(conn, saga_id, step, state, now=utcnow(), lease_s=tiers.queue_lease_s),
        operation=f"saga.{step}.record",
    )
