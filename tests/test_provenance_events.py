"""Provenance events after ingest (derived artifacts, access changes, redactions) and the encodings
the chain and the set-based writes rely on."""

from __future__ import annotations

import hashlib
import json

import pytest

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import AccessDenied, NotFound, ValidationError
from datamesh.core.principal import Principal, Role
from datamesh.core.result import Err
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.storage.cp import provenance
from datamesh.storage.cp.provenance import ProvenanceKind


async def test_derived_access_and_redaction_events_extend_the_chain(config: DataMeshConfig) -> None:
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        # Given a conversation with one turn (two links: ingested, stored)
        metadata = {"note": "tab\there\nnew line \\ backslash \u2028 é"}
        request = IngestionRequest(
            entity_id=EntityId.generate(), prompt=b"p", response=b"r", geo_region=GeoRegion.EU_WEST, metadata=metadata
        )
        cid = (await p.ingest(request)).unwrap().conversation_id
        # When an embedding, an access grant and revocation, a redaction and an erasure are recorded
        derived = (await p.record_derived(cid, kind="embedding", model="text-embedding-3-small", turn_seq=0)).unwrap()
        granted = (await p.record_access_change(cid, granted=True, subject="alice", role="reader")).unwrap()
        revoked = (await p.record_access_change(cid, granted=False, subject="alice", role="reader")).unwrap()
        redacted = (await p.record_redaction(cid, erased=False, turn_seqs=[0], reason="PII")).unwrap()
        erased = (await p.record_redaction(cid, erased=True, reason="user request")).unwrap()
        # Then each lands at the next link, with its content, and the chain verifies
        assert [e.seq for e in (derived, granted, revoked, redacted, erased)] == [2, 3, 4, 5, 6]
        assert [e.kind for e in (derived, granted, revoked, redacted, erased)] == [
            ProvenanceKind.DERIVED_ARTIFACT,
            ProvenanceKind.ACCESS_GRANTED,
            ProvenanceKind.ACCESS_REVOKED,
            ProvenanceKind.REDACTED,
            ProvenanceKind.ERASED,
        ]
        records = p.tiers.cp.run(lambda c: provenance.records(c, str(cid)), operation="t").unwrap()
        assert records[2]["body"] == {
            "artifact": "embedding",
            "model": "text-embedding-3-small",
            "turn_seq": 0,
            "by": "default/local",
        }
        assert records[3]["body"]["subject"] == "alice" and records[6]["body"]["turns"] == "all"
        checked, broken = p.tiers.cp.run(lambda c: provenance.verify(c, str(cid)), operation="t").unwrap()
        assert checked == 7 and broken is None
        # ... and metadata with tabs, newlines and backslashes survives the set-based insert
        assert (await p.get(cid)).unwrap().turns[0].metadata == metadata


async def test_provenance_events_are_checked_against_the_principal(config: DataMeshConfig) -> None:
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        request = IngestionRequest(
            entity_id=EntityId.generate(), prompt=b"p", response=b"r", geo_region=GeoRegion.EU_WEST
        )
        cid = (await p.ingest(request)).unwrap().conversation_id
        reader = Principal(tenant=config.tenant, name="r", roles=frozenset({Role.READER}))
        writer = Principal(tenant=config.tenant, name="w", roles=frozenset({Role.WRITER}))
        stranger = Principal(tenant="other", name="x", roles=frozenset({Role.ADMIN}))
        # a reader may not record a derived artifact, a writer may not change access,
        denied = await p.record_derived(cid, kind="embedding", model="m", principal=reader)
        assert isinstance(denied, Err) and isinstance(denied.error, AccessDenied)
        assert (await p.record_derived(cid, kind="embedding", model="m", principal=writer)).is_ok()
        denied = await p.record_access_change(cid, granted=True, subject="s", role="reader", principal=writer)
        assert isinstance(denied, Err) and isinstance(denied.error, AccessDenied)
        # another tenant does not see the conversation at all, and nonsense is refused
        hidden = await p.record_redaction(cid, erased=True, reason="x", principal=stranger)
        assert isinstance(hidden, Err) and isinstance(hidden.error, NotFound)
        bad = await p.record_derived(cid, kind="", model="m")
        assert isinstance(bad, Err) and isinstance(bad.error, ValidationError)
        bad = await p.record_derived("not-a-uuid", kind="embedding", model="m")
        assert isinstance(bad, Err) and isinstance(bad.error, ValidationError)
        checked, broken = p.tiers.cp.run(lambda c: provenance.verify(c, str(cid)), operation="t").unwrap()
        assert checked == 3 and broken is None


def test_chain_hash_is_the_canonical_encoding() -> None:
    body = provenance.canonical({"z": 'é"\\\n\t\u2028 😀', "a": [1, "x"], "n": None})
    assert body == json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for seq in (0, 7, 123456):
        reference = json.dumps(
            {"c": "cid-1", "s": seq, "k": "turn_ingested", "b": body, "p": "f" * 64},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        expected = hashlib.sha256(reference.encode()).hexdigest()
        assert provenance.chain_hash("cid-1", seq, "turn_ingested", body, "f" * 64) == expected


@pytest.mark.parametrize("embedding", [True, False])
@pytest.mark.parametrize("location", ["eu-west/shard-003", "us-east/" + "c" * 64, 'odd "place" \\ é\n'])
def test_ingest_bodies_are_the_canonical_encoding(embedding: bool, location: str) -> None:
    # Given the fields of a turn's two ingest events
    ids = {"turn_id": "01a21901-35a3-7091-a38c-e75f2978211f", "saga_id": "01a21901-35a3-7091-a38c-e75f29782120"}
    sizes = {"prompt_sha256": "a" * 64, "prompt_size": 12, "response_sha256": "b" * 64, "response_size": 10**10}
    # When their bodies are spelled out by hand
    ingested = provenance.turn_ingested(turn_seq=7, **ids, **sizes)  # type: ignore[arg-type]
    stored = provenance.content_stored(
        turn_id=ids["turn_id"], prompt=("ap", location), response=("objects", location), embedding=embedding
    )
    # Then they are the canonical JSON of the same bodies
    assert ingested == provenance.canonical({"turn_seq": 7, **ids, **sizes})
    assert stored == provenance.canonical(
        {
            "turn_id": ids["turn_id"],
            "prompt": {"tier": "ap", "location": location},
            "response": {"tier": "objects", "location": location},
            "embedding": embedding,
        }
    )
