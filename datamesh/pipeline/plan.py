"""The saga plan: everything the steps and compensations need, except the content itself.

The plan is written to the saga log when the saga starts, so a reaper (or another worker) can
finish or undo the saga from the CP tier alone.  Content bytes never enter the saga log.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field, fields
from typing import Any

from datamesh.core.types import ContentHash, GeoRegion

LOCATION_AP = "ap"
LOCATION_OBJECTS = "objects"


@dataclass(slots=True)
class ItemPlan:
    """One turn of the saga."""

    index: int
    idempotency_key: str
    request_sha256: str
    conversation_id: str
    new_conversation: bool
    turn_id: str
    entity_id: str
    region: str
    shard: int
    prompt_sha256: str
    prompt_size: int
    prompt_location: str
    response_sha256: str
    response_size: int
    response_location: str
    has_embedding: bool
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def geo_region(self) -> GeoRegion:
        return GeoRegion(self.region)


@dataclass(slots=True)
class BlobPlan:
    """A blob the saga stores in a region's object store."""

    region: str
    content_hash: str
    size: int


@dataclass(slots=True)
class SagaPlan:
    saga_id: str
    tenant: str
    items: list[ItemPlan]
    blobs: list[BlobPlan]

    def to_json(self) -> str:
        """Compact JSON: items and blobs as rows under a column list (plans of large batches are big)."""
        return json.dumps(
            {
                "saga_id": self.saga_id,
                "tenant": self.tenant,
                "item_fields": _ITEM_FIELDS,
                "items": [_ITEM_ROW(item) for item in self.items],  # tuples: JSON arrays
                "blobs": [[b.region, b.content_hash, b.size] for b in self.blobs],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str) -> SagaPlan:
        data: dict[str, Any] = json.loads(raw)
        names = data["item_fields"]
        if names == _ITEM_FIELDS:  # written by this version: rows are in constructor order
            items = [ItemPlan(*row) for row in data["items"]]
        else:  # an older field list: by name (a field it lacks must have a default)
            items = [ItemPlan(**dict(zip(names, row, strict=True))) for row in data["items"]]
        return cls(
            saga_id=data["saga_id"],
            tenant=data["tenant"],
            items=items,
            blobs=[BlobPlan(*blob) for blob in data["blobs"]],
        )

    def blob_keys(self) -> list[tuple[str, ContentHash]]:
        return [(b.region, ContentHash(b.content_hash)) for b in self.blobs]


_ITEM_FIELDS = [f.name for f in fields(ItemPlan)]
_ITEM_ROW = operator.attrgetter(*_ITEM_FIELDS)  # an item's fields in constructor order, one C call
