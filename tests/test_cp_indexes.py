"""Every query the CP tier makes is served by an index: EXPLAIN on PostgreSQL proves it.

Given a workload that exercises every CP code path (ingest, append, read, derived provenance, a
failing saga and its compensation, the reaper, saga listings, provenance verification, index
feeding, search and erasure), each statement it sent is EXPLAINed with sequential scans disabled:
a plan that still scans a table sequentially has no index to use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import event

from datamesh.core.config import DataMeshConfig
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline import indexer
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.pipeline.saga import InjectedFault, reap
from datamesh.pipeline.steps import Step
from datamesh.storage.cp import provenance, sagas
from datamesh.storage.cp.sagas import SagaStatus
from tests.helpers import real_requests

#: The main lookups and the index each must use.
EXPECTED_INDEXES = {
    "pk_conversations",  # conversation by id
    "pk_turns",  # turns of a conversation, in seq order
    "pk_idempotency_keys",  # idempotency key by (tenant, key)
    "ix_sagas_status_created_at",  # sagas listed by status; expired sagas (in flight, lease filtered)
    "ix_object_refs_saga_id",  # a saga's blob references
    "pk_object_refs",  # references of a blob (region, hash)
    "uq_provenance_records_conversation_id_seq",  # provenance head and chain
    "ix_index_outbox_next_attempt_at",  # due index outbox rows
    "ix_conversations_tenant_entity",  # an entity's conversations (erasure)
}


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(_plan_nodes(child))
    return nodes


async def test_every_cp_query_uses_an_index(pg_cp_url: str, tmp_path: Path) -> None:
    config = DataMeshConfig(data_dir=tmp_path, cp_url=pg_cp_url)
    fail_write_ap = {"armed": False}

    def faults(step: str, phase: str) -> None:
        if fail_write_ap["armed"] and step == Step.WRITE_AP and phase == "before":
            raise InjectedFault("fail write_ap")

    statements: list[tuple[str, Any]] = []
    async with (await IngestionPipeline.create(config, faults=faults)).unwrap() as p:

        def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
            statements.append((statement, parameters[0] if many and parameters else parameters))

        event.listen(p.tiers.cp.engine, "before_cursor_execute", capture)
        # Given a workload over every CP code path
        batch = (await p.ingest_many(real_requests(4))).unwrap()
        first = batch[0].unwrap()
        entity = (await p.get(first.conversation_id)).unwrap().entity_id
        big = b"B" * (config.inline_max_bytes + 1)
        follow = IngestionRequest(
            entity_id=entity,
            prompt=b"follow",
            response=big,
            geo_region=GeoRegion.EU_WEST,
            conversation_id=first.conversation_id,
        )
        (await p.ingest(follow)).unwrap()
        (await p.ingest(follow)).unwrap()  # a replay: idempotency lookup
        (await p.record_derived(first.conversation_id, kind="embedding", model="m")).unwrap()
        fail_write_ap["armed"] = True
        failing = IngestionRequest(
            entity_id=EntityId.generate(), prompt=b"x", response=big + b"!", geo_region=GeoRegion.EU_WEST
        )
        assert (await p.ingest(failing)).is_err()
        fail_write_ap["armed"] = False
        reap(p.tiers)
        cid = str(first.conversation_id)
        p.tiers.cp.run(lambda c: sagas.list_by_status(c, SagaStatus.COMPENSATED), operation="t", write=False).unwrap()
        p.tiers.cp.run(lambda c: provenance.verify(c, cid), operation="t", write=False).unwrap()
        # the index tier's CP paths: outbox drain, search, status, rebuild, erasure
        (await p.flush_index()).unwrap()
        (await p.search("the", limit=5)).unwrap()
        indexer.outbox_status(p.tiers).unwrap()
        indexer.rebuild_region(p.tiers, p.indexes, GeoRegion.EU_WEST).unwrap()
        (await p.erase_conversation(batch[1].unwrap().conversation_id)).unwrap()
        (await p.erase_entity(entity)).unwrap()
        event.remove(p.tiers.cp.engine, "before_cursor_execute", capture)

        # When each statement is EXPLAINed with sequential scans off
        raw: Any = p.tiers.cp.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("SET enable_seqscan = off")
            used: set[str] = set()
            seq_scans: list[str] = []
            explained = 0
            for statement, parameters in statements:
                head = statement.lstrip().split(None, 1)[0].upper()
                if head not in ("SELECT", "UPDATE", "DELETE", "INSERT") or "pg_catalog" in statement:
                    continue
                if head == "INSERT" and "ON CONFLICT" not in statement and "SELECT" not in statement:
                    continue
                if statement.strip() == "SELECT 1":
                    continue
                sql = cursor.mogrify(statement, parameters).decode()
                cursor.execute("EXPLAIN (FORMAT JSON) " + sql)
                explained += 1
                (plan,) = cursor.fetchone()[0]
                plan = plan if isinstance(plan, dict) else json.loads(plan)
                for node in _plan_nodes(plan["Plan"]):
                    if node["Node Type"] == "Seq Scan":
                        seq_scans.append(f"{node.get('Relation Name')}: {sql[:200]}")
                    if "Index Name" in node:
                        used.add(node["Index Name"])
            raw.rollback()
        finally:
            raw.close()

    # Then no statement needs a sequential scan, and the main lookups use their indexes.
    print(f"{explained} statements explained; indexes used: {sorted(used)}")
    assert explained > 20
    assert not seq_scans, "statements without an index:\n" + "\n".join(seq_scans)
    assert used >= EXPECTED_INDEXES, f"unused: {EXPECTED_INDEXES - used}"
