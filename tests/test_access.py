"""Access control in the CP tier, on SQLite and on PostgreSQL: keys, grants, tenants.

Given keys issued to principals of two tenants, when they authenticate and call the pipeline,
then no principal reads or writes across tenants, revoked and expired keys are refused, and a
reader cannot write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import AccessDenied, NotFound
from datamesh.core.principal import Principal, Role
from datamesh.core.result import Err
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.storage.cp import migrate
from datamesh.storage.cp.access import KEYS, AccessControl, hash_secret, parse_key
from datamesh.storage.cp.database import CpDatabase


@pytest.fixture
def access(cp_url: str) -> Iterator[AccessControl]:
    db = CpDatabase.open(cp_url).unwrap()
    migrate.upgrade(db).unwrap()
    yield AccessControl(db)
    db.dispose()


@pytest.fixture
async def pipeline(config: DataMeshConfig) -> AsyncIterator[IngestionPipeline]:
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        yield p


def principal_of(access: AccessControl, raw: str) -> Principal:
    return access.authenticate(raw).unwrap()


def turn(entity: EntityId | None = None) -> IngestionRequest:
    return IngestionRequest(
        entity_id=entity or EntityId.generate(), prompt=b"2+2?", response=b"4", geo_region=GeoRegion.US_EAST
    )


def test_only_a_hash_is_stored_and_the_key_authenticates(access: AccessControl) -> None:
    issued = access.issue_key("acme", "alice").unwrap()
    access.grant("acme", "alice", Role.WRITER).unwrap()
    key_id, secret = parse_key(issued.raw) or ("", "")
    with access.db.engine.connect() as conn:
        row = conn.execute(select(KEYS).where(KEYS.c.id == key_id)).one()
    assert row.secret_sha256 == hash_secret(secret) and secret not in str(tuple(row))
    who = principal_of(access, issued.raw)
    assert who.tenant == "acme" and who.name == "alice" and who.roles == {Role.WRITER} and who.entities is None
    listed = access.list_keys("acme").unwrap()
    assert [k.key_id for k in listed] == [key_id] and listed[0].state(datetime.now(UTC)) == "active"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda raw: raw[:-1] + ("A" if raw[-1] != "A" else "B"),
        lambda raw: "nonsense",
        lambda raw: raw + "x",
        lambda _: "",
    ],
    ids=["wrong-secret", "malformed", "too-long", "empty"],
)
def test_bad_keys_are_refused(access: AccessControl, mangle: object) -> None:
    issued = access.issue_key("acme", "alice").unwrap()
    refused = access.authenticate(mangle(issued.raw))  # type: ignore[operator]
    assert isinstance(refused, Err) and isinstance(refused.error, AccessDenied)


def test_revoked_and_expired_keys_are_refused(access: AccessControl) -> None:
    revoked = access.issue_key("acme", "alice").unwrap()
    access.revoke_key(revoked.key_id).unwrap()
    expired = access.issue_key("acme", "alice", expires_in=timedelta(seconds=-1)).unwrap()
    later = access.issue_key("acme", "alice", expires_in=timedelta(hours=1)).unwrap()
    for raw, why in ((revoked.raw, "revoked"), (expired.raw, "expired")):
        refused = access.authenticate(raw)
        assert isinstance(refused, Err) and isinstance(refused.error, AccessDenied) and why in refused.error.reason
    assert access.authenticate(later.raw).is_ok()
    after = access.authenticate(later.raw, now=datetime.now(UTC) + timedelta(hours=2))
    assert isinstance(after, Err) and "expired" in after.error.reason
    other_tenant = access.revoke_key(later.key_id, tenant="other")
    assert isinstance(other_tenant, Err) and isinstance(other_tenant.error, NotFound)


async def test_no_cross_tenant_read_or_write_and_readers_cannot_write(
    access: AccessControl, pipeline: IngestionPipeline
) -> None:
    for tenant, name, role in (
        ("acme", "alice", Role.WRITER),
        ("acme", "rita", Role.READER),
        ("umbrella", "eve", Role.ADMIN),
    ):
        access.grant(tenant, name, role).unwrap()
    alice = principal_of(access, access.issue_key("acme", "alice").unwrap().raw)
    rita = principal_of(access, access.issue_key("acme", "rita").unwrap().raw)
    eve = principal_of(access, access.issue_key("umbrella", "eve").unwrap().raw)
    written = (await pipeline.ingest(turn(), principal=alice)).unwrap()
    assert (await pipeline.get(written.conversation_id, principal=rita)).is_ok()
    cross_read = await pipeline.get(written.conversation_id, principal=eve)
    assert isinstance(cross_read, Err) and isinstance(cross_read.error, NotFound)
    # eve's write naming acme's conversation lands nowhere near it
    append = IngestionRequest(
        entity_id=EntityId.generate(),
        prompt=b"x",
        response=b"y",
        geo_region=GeoRegion.US_EAST,
        conversation_id=written.conversation_id,
    )
    cross_write = await pipeline.ingest(append, principal=eve)
    assert isinstance(cross_write, Err)
    assert len((await pipeline.get(written.conversation_id, principal=alice)).unwrap().turns) == 1
    refused = await pipeline.ingest(turn(), principal=rita)
    assert isinstance(refused, Err) and isinstance(refused.error, AccessDenied)


async def test_grants_narrowed_to_entities(access: AccessControl, pipeline: IngestionPipeline) -> None:
    mine, theirs = EntityId.generate(), EntityId.generate()
    access.grant("acme", "bot", Role.WRITER, entity_id=str(mine)).unwrap()
    bot = principal_of(access, access.issue_key("acme", "bot").unwrap().raw)
    assert bot.entities == {str(mine)}
    assert (await pipeline.ingest(turn(mine), principal=bot)).is_ok()
    refused = await pipeline.ingest(turn(theirs), principal=bot)
    assert isinstance(refused, Err) and isinstance(refused.error, AccessDenied)
