"""Turn validated requests into saga items: hashes, keys, where each payload will live."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from datamesh.core.types import ContentHash, uuid7_text
from datamesh.pipeline.dedup import idempotency_key, request_digest
from datamesh.pipeline.plan import LOCATION_AP, LOCATION_OBJECTS, BlobPlan, ItemPlan
from datamesh.pipeline.request import ValidRequest
from datamesh.storage.ap.store import shard_for


@dataclass(slots=True)
class Prepared:
    """A validated request with its hashes and idempotency key, before the saga decides on it."""

    index: int
    request: ValidRequest
    prompt_hash: ContentHash
    response_hash: ContentHash
    digest: str
    key: str
    entity_id: str
    """``str(request.entity_id)``, made once (the digest and the plan item both need it)"""

    @property
    def new_ids(self) -> int:
        """How many fresh ids :meth:`to_item` takes: the turn's, and the conversation's if it starts one."""
        return 2 if self.request.conversation_id is None else 1

    def to_item(self, *, inline_max_bytes: int, shard_count: int, ids: Iterator[str] | None = None) -> ItemPlan:
        """The saga item; its new ids come from ``ids`` (e.g. :func:`uuid7_texts` made for a batch,
        the conversation's before the turn's), or are made here."""
        r = self.request
        new = r.conversation_id is None
        next_id = uuid7_text if ids is None else ids.__next__
        return ItemPlan(
            index=self.index,
            idempotency_key=self.key,
            request_sha256=self.digest,
            conversation_id=next_id() if r.conversation_id is None else str(r.conversation_id),
            new_conversation=new,
            turn_id=next_id(),
            entity_id=self.entity_id,
            region=r.region.value,
            shard=shard_for(r.entity_id.value.bytes, shard_count),
            prompt_sha256=self.prompt_hash.hex,
            prompt_size=len(r.prompt),
            prompt_location=LOCATION_AP if len(r.prompt) <= inline_max_bytes else LOCATION_OBJECTS,
            response_sha256=self.response_hash.hex,
            response_size=len(r.response),
            response_location=LOCATION_AP if len(r.response) <= inline_max_bytes else LOCATION_OBJECTS,
            has_embedding=r.embedding is not None,
            metadata=dict(r.metadata),
        )


def prepare(index: int, request: ValidRequest) -> Prepared:
    prompt_hash = ContentHash.of(request.prompt)
    response_hash = ContentHash.of(request.response)
    entity = str(request.entity_id)
    digest = request_digest(request, prompt_hash.hex, response_hash.hex, entity_id=entity)
    return Prepared(index, request, prompt_hash, response_hash, digest, idempotency_key(request, digest), entity)


def blobs_of(items: list[ItemPlan]) -> list[BlobPlan]:
    """The distinct blobs the items put in object stores (per region: content stays in its region)."""
    seen: dict[tuple[str, str], BlobPlan] = {}
    for item in items:
        if item.prompt_location == LOCATION_OBJECTS:
            seen.setdefault(
                (item.region, item.prompt_sha256), BlobPlan(item.region, item.prompt_sha256, item.prompt_size)
            )
        if item.response_location == LOCATION_OBJECTS:
            seen.setdefault(
                (item.region, item.response_sha256), BlobPlan(item.region, item.response_sha256, item.response_size)
            )
    return list(seen.values())
