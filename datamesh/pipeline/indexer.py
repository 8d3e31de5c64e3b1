"""Feeding the index tier from the index outbox: plain functions, run in-process or by a task.

The saga's pivot (``commit_cp``) and erasure write outbox rows in their CP transactions, so index
work is owed exactly when the data it concerns is committed, and is never part of a saga.
:func:`drain_once` claims due rows (a lease: a crashed indexer's rows come due again), does each
row's work and deletes the row, or records the error and pushes the row back with exponential
backoff and jitter — retried until done.  Every piece of work is idempotent (``add_many`` replaces
by turn id; removals and AP deletes of missing keys are no-ops), so redelivery is harmless.

* ``add``: the turns saga ``key`` committed in ``region`` are read back from the AP tier / object
  store, verified against the CP hashes, and indexed with tenant, entity, region and creation time
  from the CP tier and the embedding from the AP record (or the configured embedder).  Turns of
  conversations no longer active are skipped, and after indexing the CP status is checked again,
  so an erasure that commits while a batch is being indexed cannot leave its turns searchable.
* ``erase_conversation`` / ``erase_entity``: remove the index entries, then delete the AP content,
  here or, where other processes write the AP shards (Celery), by handing the deletes to the
  shard's owner (``IndexerSettings.hand_off_ap``), which settles the row.

Rows are handled in outbox order; consecutive ``add`` rows are indexed with one ``add_many``.
In local mode :class:`~datamesh.pipeline.ingestion.IngestionPipeline` runs :func:`drain_once`
in a background task; a Celery task calls the same function (see the README).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from uuid import UUID

from sqlalchemy.engine import Connection

from datamesh.core.errors import Error, StorageError, ValidationError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ConversationId, EntityId, GeoRegion, TurnId
from datamesh.observability import logs, metrics
from datamesh.pipeline.reads import verified_content
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.ap.record import turn_key_of
from datamesh.storage.cp import conversations, index_outbox
from datamesh.storage.cp.index_outbox import OutboxRow
from datamesh.storage.cp.sql import utcnow
from datamesh.storage.index import Embedder, IndexDocument, RegionalIndexes, with_embeddings

DEFAULT_BATCH = 200
DEFAULT_LEASE_S = 300.0
DEFAULT_BACKOFF_BASE_S = 1.0
DEFAULT_BACKOFF_CAP_S = 300.0
#: Characters of a prompt or response that are indexed (the rest is stored, not searchable).
MAX_INDEXED_CHARS = 1_000_000

log = logs.logger(__name__)


@dataclass(slots=True)
class DrainReport:
    """What one :func:`drain_once` pass did."""

    claimed: int = 0
    done: int = 0
    failed: int = 0
    indexed_turns: int = 0
    removed_turns: int = 0
    #: erase rows whose AP deletes went to the shard's owner (see ``IndexerSettings.hand_off_ap``)
    handed_off: int = 0
    errors: list[Error] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexerSettings:
    """How the indexer claims and retries: ``batch`` rows per pass, leased for ``lease_s``.

    ``hand_off_ap``: where the AP shards are written by other processes (Celery workers), an erase
    row's AP deletes are handed to the shard's owner with ``hand_off_ap(row, shard)`` instead of
    being run here; the row stays leased and the owner completes it (:func:`settle_handed_off`).
    If the hand-off is lost, the lease lapses and the next drain hands the row off again.
    """

    batch: int = DEFAULT_BATCH
    lease_s: float = DEFAULT_LEASE_S
    backoff_base_s: float = DEFAULT_BACKOFF_BASE_S
    backoff_cap_s: float = DEFAULT_BACKOFF_CAP_S
    embedder: Embedder | None = None
    hand_off_ap: Callable[[OutboxRow, int], Result[None, Error]] | None = None


def drain_once(
    tiers: Tiers,
    indexes: RegionalIndexes,
    settings: IndexerSettings = IndexerSettings(),
    *,
    regions: Sequence[GeoRegion] | None = None,
    due_only: bool = True,
) -> Result[DrainReport, StorageError]:
    """Claim up to ``settings.batch`` outbox rows, do their work, and settle each row.

    ``regions`` restricts the pass to the regions this process indexes.  ``due_only=False`` also
    takes rows waiting out a backoff or leased elsewhere (``flush``: tests, demo, CLI).  ``Err``
    only when the outbox itself cannot be read; a row's failure is recorded on the row and in
    the report.
    """
    now = utcnow()
    wanted = None if regions is None else [r.value for r in regions]
    if due_only:
        due = tiers.cp.run(lambda conn: index_outbox.any_due(conn, now, wanted), operation="index.poll", write=False)
        if isinstance(due, Err):
            return due
        if not due.value:
            _observe_depth(tiers)
            return Ok(DrainReport())
    claimed = tiers.cp.run(
        lambda conn: index_outbox.claim(
            conn, now, limit=settings.batch, lease_s=settings.lease_s, regions=wanted, due_only=due_only
        ),
        operation="index.claim",
    )
    if isinstance(claimed, Err):
        return claimed
    report = DrainReport(claimed=len(claimed.value))
    pending_adds: list[OutboxRow] = []
    for row in claimed.value:
        if row.op == index_outbox.ADD:
            pending_adds.append(row)
            continue
        _add_group(tiers, indexes, settings, pending_adds, report)
        pending_adds = []
        erased = _erase(tiers, indexes, settings, row, report)
        if isinstance(erased, Err):
            _settle(tiers, settings, erased, [row], report)
        elif erased.value:  # done here (not handed off: the shard's owner settles that row)
            _settle(tiers, settings, Ok(None), [row], report)
    _add_group(tiers, indexes, settings, pending_adds, report)
    _observe_depth(tiers)
    return Ok(report)


def _add_group(
    tiers: Tiers, indexes: RegionalIndexes, settings: IndexerSettings, rows: list[OutboxRow], report: DrainReport
) -> None:
    """Index consecutive ``add`` rows together; if that fails, row by row, so one bad row holds back no other."""
    outcome = _add(tiers, indexes, settings, rows, report)
    if isinstance(outcome, Ok) or len(rows) < 2:
        _settle(tiers, settings, outcome, rows, report)
        return
    for row in rows:
        _settle(tiers, settings, _add(tiers, indexes, settings, [row], report), [row], report)


def _settle(
    tiers: Tiers,
    settings: IndexerSettings,
    outcome: Result[None, Error],
    rows: Sequence[OutboxRow],
    report: DrainReport,
) -> None:
    """Delete finished rows (observing their lag) or push failed ones back with backoff."""
    if not rows:
        return
    ids = [r.id for r in rows]
    now = utcnow()
    if isinstance(outcome, Ok):
        settled = tiers.cp.run(lambda conn: index_outbox.complete(conn, ids), operation="index.complete")
        if isinstance(settled, Ok):
            report.done += len(rows)
            if metrics.enabled():
                for r in rows:
                    metrics.INDEX_FEED_SECONDS.labels(r.region, r.op).observe((now - r.enqueued_at).total_seconds())
            return
        error: Error = settled.error  # the work is done and idempotent: the row will be redone
    else:
        error = outcome.error
    attempts = max(r.attempts for r in rows)
    delay = backoff_s(settings, attempts)
    retry_at = now + timedelta(seconds=random.uniform(delay / 2, delay))
    report.failed += len(rows)
    report.errors.append(error)
    log.warning("index outbox rows %s failed (attempt %d): %s", ids, attempts + 1, error)
    tiers.cp.run(lambda conn: index_outbox.fail(conn, ids, str(error), retry_at), operation="index.fail")


def backoff_s(settings: IndexerSettings, attempts: int) -> float:
    """The longest wait before a row that failed ``attempts`` times is due again (it waits a random
    time between half of this and this)."""
    return min(settings.backoff_cap_s, settings.backoff_base_s * 2.0 ** min(attempts, 30))


def settle_handed_off(
    tiers: Tiers, settings: IndexerSettings, row_id: int, outcome: Result[int, Error]
) -> Result[DrainReport, StorageError]:
    """Settle an erase row whose AP deletes the shard's owner ran: delete it when they succeeded,
    or record the failure and push it back with backoff (the next drain hands it off again).

    The report says what happened: ``done``/``failed``, or neither when the row was gone already
    (a duplicate hand-off).  Should settling itself fail, the row's lease lapses and it is redone.
    """
    found = tiers.cp.run(lambda conn: index_outbox.get(conn, row_id), operation="index.handed_off", write=False)
    if isinstance(found, Err):
        return found
    report = DrainReport(claimed=0 if found.value is None else 1)
    if found.value is not None:
        _settle(tiers, settings, Ok(None) if isinstance(outcome, Ok) else outcome, [found.value], report)
    return Ok(report)


# ---- add ---------------------------------------------------------------------------------------


def _add(
    tiers: Tiers, indexes: RegionalIndexes, settings: IndexerSettings, rows: Sequence[OutboxRow], report: DrainReport
) -> Result[None, Error]:
    if not rows:
        return Ok(None)
    docs: list[IndexDocument] = []
    for row in rows:
        built = documents_of_saga(tiers, row.key, GeoRegion(row.region))
        if isinstance(built, Err):
            return built
        docs.extend(built.value)
    indexed = index_documents(tiers, indexes, docs, settings.embedder)
    if isinstance(indexed, Err):
        return indexed
    report.indexed_turns += indexed.value
    return Ok(None)


def index_documents(
    tiers: Tiers, indexes: RegionalIndexes, docs: Sequence[IndexDocument], embedder: Embedder | None
) -> Result[int, Error]:
    """Embed (when configured), index, then un-index turns whose conversation stopped being active."""
    if not docs:
        return Ok(0)
    dim = indexes.config.dim
    docs = [d if d.embedding is None or len(d.embedding) == dim else _without_embedding(d) for d in docs]
    if embedder is not None:
        docs = with_embeddings(docs, embedder)
    added = indexes.add_many(docs)
    if isinstance(added, Err):
        return added
    ids = sorted({str(d.conversation_id) for d in docs})
    found = tiers.cp.run(lambda conn: conversations.not_active(conn, ids), operation="index.recheck", write=False)
    if isinstance(found, Err):
        return found
    gone = sorted(found.value)
    for region in sorted({d.region for d in docs if str(d.conversation_id) in found.value}):
        index = indexes.region(region)
        if isinstance(index, Err):
            return index
        removed = index.value.remove_conversations(ConversationId.parse(c).unwrap() for c in gone)
        if isinstance(removed, Err):
            return removed
    return Ok(added.value)


def _without_embedding(doc: IndexDocument) -> IndexDocument:
    log.warning("turn %s: embedding of %d dimensions ignored by the index", doc.turn_id, len(doc.embedding or ()))
    return IndexDocument(
        doc.conversation_id,
        doc.turn_id,
        doc.tenant,
        doc.entity_id,
        doc.region,
        doc.created_at,
        doc.prompt,
        doc.response,
        None,
    )


def documents_of_saga(tiers: Tiers, saga_id: str, region: GeoRegion) -> Result[list[IndexDocument], Error]:
    """The index documents of the turns saga ``saga_id`` committed in ``region`` (active ones)."""
    found = tiers.cp.run(
        lambda conn: conversations.index_sources_of_saga(conn, saga_id), operation="index.saga_turns", write=False
    )
    if isinstance(found, Err):
        return found
    return documents_of(tiers, region, found.value)


def documents_of(
    tiers: Tiers, region: GeoRegion, sources: Sequence[conversations.IndexSource]
) -> Result[list[IndexDocument], Error]:
    """Read these turns' content from the AP tier and object store, verified; build documents."""
    live = [s for s in sources if s.status == conversations.ACTIVE and s.region == region]
    if not live:
        return Ok([])
    keys = [turn_key_of(s.entity_id, s.conversation_id, s.turn_id) for s in live]
    content = tiers.ap.get_many(region, keys)
    if isinstance(content, Err):
        return content
    docs: list[IndexDocument] = []
    # One id object per entity and per conversation of the batch (their turns share it): fewer
    # UUIDs parsed, and fewer long-lived objects for the garbage collector to trace.
    entities: dict[str, EntityId] = {}
    conversation_ids: dict[str, ConversationId] = {}
    for s, key in zip(live, keys, strict=True):
        raw = content.value.get(key)
        if raw is None:
            return Err(StorageError("ap", "index", f"content of turn {s.turn_id} is missing", retryable=True))
        verified = verified_content(tiers, region, s, raw)
        if isinstance(verified, Err):
            return verified
        prompt_bytes, response_bytes, embedding = verified.value
        # ids as the CP tier stores them (canonical): no pattern check per id
        entity = entities.get(s.entity_id)
        if entity is None:
            entity = entities[s.entity_id] = EntityId(UUID(s.entity_id))
        conversation = conversation_ids.get(s.conversation_id)
        if conversation is None:
            conversation = conversation_ids[s.conversation_id] = ConversationId(UUID(s.conversation_id))
        docs.append(
            IndexDocument(
                conversation,
                TurnId(UUID(s.turn_id)),
                s.tenant,
                entity,
                region,
                s.created_at,
                _text(prompt_bytes),
                _text(response_bytes),
                embedding,
            )
        )
    return Ok(docs)


def _key(entity_id: str, turn: conversations.TurnRow) -> bytes:
    return turn_key_of(entity_id, turn.conversation_id, turn.turn_id)


def _text(data: bytes) -> str:
    return data[: MAX_INDEXED_CHARS * 4].decode("utf-8", errors="replace")[:MAX_INDEXED_CHARS]


# ---- erase -------------------------------------------------------------------------------------


def _erase(
    tiers: Tiers, indexes: RegionalIndexes, settings: IndexerSettings, row: OutboxRow, report: DrainReport
) -> Result[bool, Error]:
    """Remove the row's index entries, then delete its AP content here or hand the deletes to the
    shard's owner; ``Ok(False)`` when handed off (the row stays leased; the owner completes it)."""
    if row.op not in (index_outbox.ERASE_CONVERSATION, index_outbox.ERASE_ENTITY):
        return Err(ValidationError("op", f"unknown index outbox op {row.op!r}"))
    region = GeoRegion(row.region)
    removed = erase_index_entries(indexes, region, row.op, row.key)
    if isinstance(removed, Err):
        return removed
    report.removed_turns += removed.value
    if settings.hand_off_ap is None:
        deleted = erase_ap_content(tiers, region, row.op, row.key)
        return deleted if isinstance(deleted, Err) else Ok(True)
    shard = ap_shard_of(tiers, row.op, row.key)
    if isinstance(shard, Err):
        return shard
    if shard.value is None:  # the conversation is not in the CP tier: no AP content to delete
        return Ok(True)
    handed = settings.hand_off_ap(row, shard.value)
    if isinstance(handed, Err):
        return handed
    report.handed_off += 1
    return Ok(False)


def erase_index_entries(indexes: RegionalIndexes, region: GeoRegion, op: str, key: str) -> Result[int, Error]:
    """Remove the index entries of conversation or entity ``key`` in ``region``; returns entries removed.

    They go before the AP content: they are what a search could still show, and they need only the
    index writer, while the AP deletes need the shard's writer (retried on the row if they fail).
    """
    index = indexes.region(region)
    if isinstance(index, Err):
        return index
    if op == index_outbox.ERASE_CONVERSATION:
        removed = index.value.remove_conversations([ConversationId.parse(key).unwrap()])
    else:
        removed = index.value.remove_entity(EntityId.parse(key).unwrap())
    return Err(removed.error) if isinstance(removed, Err) else Ok(removed.value)


def ap_shard_of(tiers: Tiers, op: str, key: str) -> Result[int | None, Error]:
    """The AP shard holding the content of conversation or entity ``key`` (an entity's records all
    live in one shard); ``None`` for a conversation the CP tier does not know."""
    if op == index_outbox.ERASE_ENTITY:
        return Ok(tiers.ap.shard_of(EntityId.parse(key).unwrap()))
    found = tiers.cp.run(
        lambda conn: conversations.get_many(conn, [key]).get(key), operation="index.erase_shard", write=False
    )
    if isinstance(found, Err):
        return found
    if found.value is None:
        return Ok(None)
    return Ok(tiers.ap.shard_of(EntityId.parse(found.value.entity_id).unwrap()))


def erase_ap_content(tiers: Tiers, region: GeoRegion, op: str, key: str) -> Result[int, Error]:
    """Delete every AP record of conversation or entity ``key`` in ``region``; returns keys deleted.

    Runs where the shard is written (``tiers.ap`` is its writer): that writer sees every acknowledged
    record, unflushed ones included, so nothing written before the erasure is missed.
    """
    if op == index_outbox.ERASE_CONVERSATION:

        def tx(conn: Connection) -> tuple[conversations.ConversationRow | None, list[conversations.TurnRow]]:
            return conversations.get_many(conn, [key]).get(key), conversations.turns_of(conn, key)

        found = tiers.cp.run(tx, operation="index.erase_lookup", write=False)
        if isinstance(found, Err):
            return found
        row, turns = found.value
        if row is None or not turns:
            return Ok(0)
        return _deleted(tiers.ap.delete_many(region, [_key(row.entity_id, t) for t in turns]))
    entity = EntityId.parse(key).unwrap()
    total = 0
    while True:  # a scan sees a snapshot; repeat until the entity's prefix is empty
        scanned = tiers.ap.scan_entity(region, entity, limit=1000)
        if isinstance(scanned, Err):
            return scanned
        if not scanned.value:
            return Ok(total)
        deleted = tiers.ap.delete_many(region, [k for k, _ in scanned.value])
        if isinstance(deleted, Err):
            return deleted
        total += len(scanned.value)


def _deleted(outcome: Result[int, StorageError]) -> Result[int, Error]:
    return Err(outcome.error) if isinstance(outcome, Err) else Ok(outcome.value)


# ---- status and rebuild ------------------------------------------------------------------------


def _observe_depth(tiers: Tiers) -> None:
    """Set the outbox gauges: rows owed and the age of the oldest, per region."""
    if not metrics.enabled():
        return
    depth = tiers.cp.run(index_outbox.depth, operation="index.depth", write=False)
    if isinstance(depth, Err):
        return
    now = utcnow()
    for region in GeoRegion:
        d = depth.value.get(region.value)
        metrics.INDEX_OUTBOX_DEPTH.labels(region.value).set(0 if d is None else d.rows)
        age = 0.0 if d is None or d.oldest is None else max(0.0, (now - d.oldest).total_seconds())
        metrics.INDEX_LAG.labels(region.value).set(age)


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """Index work owed, per region: rows, the oldest row's age in seconds, rows that failed."""

    regions: dict[str, index_outbox.RegionDepth]
    worst: list[tuple[str, str, int, str]]
    at: datetime

    def lag_s(self, region: str) -> float:
        d = self.regions.get(region)
        return 0.0 if d is None or d.oldest is None else max(0.0, (self.at - d.oldest).total_seconds())


def outbox_status(tiers: Tiers) -> Result[OutboxStatus, StorageError]:
    """The outbox depth and lag per region, and the most retried rows with their last errors."""

    def tx(conn: Connection) -> OutboxStatus:
        return OutboxStatus(index_outbox.depth(conn), index_outbox.last_errors(conn), utcnow())

    return tiers.cp.run(tx, operation="index.status", write=False)


def rebuild_region(
    tiers: Tiers, indexes: RegionalIndexes, region: GeoRegion, *, embedder: Embedder | None = None, page: int = 200
) -> Result[int, Error]:
    """Re-index every active conversation of ``region`` from the AP tier and CP; returns turns indexed.

    Documents are replaced by turn id, so a rebuild over a live index is harmless; entries of
    erased conversations still in the index are removed too.
    """
    removed = _remove_erased(tiers, indexes, region, page)
    if isinstance(removed, Err):
        return removed
    after = ""
    total = 0
    while True:

        def tx(conn: Connection, after: str = after) -> tuple[dict[str, Row], list[conversations.TurnRow]]:
            rows = conversations.page_in_region(conn, region.value, after=after, limit=page)
            return {r.id: r for r in rows}, conversations.turns_of_many(conn, [r.id for r in rows])

        found = tiers.cp.run(tx, operation="index.rebuild_page", write=False)
        if isinstance(found, Err):
            return found
        rows, turns = found.value
        if not rows:
            return Ok(total)
        docs = documents_of(tiers, region, [conversations.IndexSource.of(t, rows[t.conversation_id]) for t in turns])
        if isinstance(docs, Err):
            return docs
        indexed = index_documents(tiers, indexes, docs.value, embedder)
        if isinstance(indexed, Err):
            return indexed
        total += indexed.value
        after = max(rows)


Row = conversations.ConversationRow


def _remove_erased(tiers: Tiers, indexes: RegionalIndexes, region: GeoRegion, page: int) -> Result[int, Error]:
    index = indexes.region(region)
    if isinstance(index, Err):
        return index
    after = ""
    total = 0
    while True:

        def tx(conn: Connection, after: str = after) -> list[Row]:
            return conversations.page_in_region(
                conn, region.value, after=after, limit=page, status=conversations.ERASED
            )

        found = tiers.cp.run(tx, operation="index.rebuild_erased", write=False)
        if isinstance(found, Err):
            return found
        if not found.value:
            return Ok(total)
        removed = index.value.remove_conversations(ConversationId.parse(r.id).unwrap() for r in found.value)
        if isinstance(removed, Err):
            return removed
        total += removed.value
        after = found.value[-1].id


__all__ = [
    "DrainReport",
    "IndexerSettings",
    "OutboxStatus",
    "documents_of_saga",
    "drain_once",
    "ap_shard_of",
    "erase_ap_content",
    "erase_index_entries",
    "index_documents",
    "outbox_status",
    "rebuild_region",
    "settle_handed_off",
]
