"""Task messages: JSON-safe payloads (base64 bytes) and the chain that runs one saga.

Content travels in the task messages, never in the saga log: the ``write_ap`` task of a shard carries
the content of that shard's turns, the ``store_blobs`` task of a region the region's blobs.  A worker
that dies mid-step gets the same message again (acks_late), so nothing else needs to hold the bytes.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery.canvas import Signature, chain

from datamesh.pipeline.plan import LOCATION_AP, SagaPlan
from datamesh.pipeline.steps import Step
from datamesh.workers import queues

Content = Mapping[int, tuple[bytes, bytes, tuple[float, ...] | None]]
WireContent = dict[str, list[Any]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def encode_content(plan: SagaPlan, content: Content) -> WireContent:
    """The AP content of ``plan``'s items; payloads kept in the object store are not sent again."""
    out: WireContent = {}
    for item in plan.items:
        prompt, response, embedding = content[item.index]
        out[str(item.index)] = [
            b64(prompt) if item.prompt_location == LOCATION_AP else "",
            b64(response) if item.response_location == LOCATION_AP else "",
            list(embedding) if embedding is not None else None,
        ]
    return out


def decode_content(wire: Mapping[str, list[Any]]) -> dict[int, tuple[bytes, bytes, tuple[float, ...] | None]]:
    return {
        int(index): (unb64(p), unb64(r), tuple(float(x) for x in e) if e is not None else None)
        for index, (p, r, e) in wire.items()
    }


def part_name(region: str, shard: int) -> str:
    return f"{Step.WRITE_AP}.{region}.{shard}"


def saga_chain(app: Celery, plan: SagaPlan, content: Content, blobs: Mapping[tuple[str, str], bytes]) -> chain:
    """``store_blobs`` per region → ``write_ap`` per shard → ``commit_cp``, as immutable signatures.

    Steps run one after another; ``store_blobs`` and ``write_ap`` are recorded done by their last
    part only, so the reaper never drives forward a saga with a part missing.
    """
    sigs: list[Signature] = []
    blob_regions = sorted({b.region for b in plan.blobs})
    for region in blob_regions:
        region_blobs = [
            [b.content_hash, b.size, b64(blobs[(b.region, b.content_hash)])] for b in plan.blobs if b.region == region
        ]
        sigs.append(
            app.signature(
                queues.STORE_BLOBS,
                kwargs={"saga_id": plan.saga_id, "tenant": plan.tenant, "region": region, "blobs": region_blobs},
                immutable=True,
            )
        )
    parts: dict[tuple[str, int], list[int]] = defaultdict(list)
    for position, item in enumerate(plan.items):
        parts[(item.region, item.shard)].append(position)
    ordered = sorted(parts)
    for n, (region, shard) in enumerate(ordered):
        sub = SagaPlan(plan.saga_id, plan.tenant, [plan.items[i] for i in parts[(region, shard)]], [])
        marks = []
        if n == 0 and not blob_regions:
            marks.append(Step.STORE_BLOBS.value)  # nothing to store: the step is trivially done
        if n == len(ordered) - 1:
            marks.append(Step.WRITE_AP.value)
        sigs.append(
            app.signature(
                queues.WRITE_AP,
                kwargs={
                    "saga_id": plan.saga_id,
                    "region": region,
                    "shard": shard,
                    "plan": sub.to_json(),
                    "content": encode_content(sub, content),
                    "marks": marks,
                },
                immutable=True,
            )
        )
    sigs.append(app.signature(queues.COMMIT_CP, kwargs={"saga_id": plan.saga_id}, immutable=True))
    return chain(*sigs, app=app)


def compensation_chain(app: Celery, plan: SagaPlan) -> chain:
    """Undo in reverse: every shard's content, then each region's blob references, then the reservation."""
    sigs: list[Signature] = []
    for region, shard in sorted({(i.region, i.shard) for i in plan.items}):
        sigs.append(
            app.signature(
                queues.UNDO_WRITE_AP, kwargs={"saga_id": plan.saga_id, "region": region, "shard": shard}, immutable=True
            )
        )
    for region in sorted({b.region for b in plan.blobs}):
        sigs.append(
            app.signature(queues.UNDO_STORE_BLOBS, kwargs={"saga_id": plan.saga_id, "region": region}, immutable=True)
        )
    sigs.append(app.signature(queues.UNDO_RESERVE, kwargs={"saga_id": plan.saga_id}, immutable=True))
    return chain(*sigs, app=app)
