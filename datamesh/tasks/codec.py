"""Task messages: JSON-safe payloads (base64 bytes) and the chain that runs one saga.

Content never goes into the saga log.  It is parked beside the messages, in the broker's Redis: one
hash per saga (:data:`STASH_KEY`) with a field per part — the ``write_ap`` part of a shard holds its
sub-plan and the content of that shard's turns, the ``store_blobs`` part of a region the region's
blobs — and each task message names its field.  Carrying the content in the messages themselves cost
far more, because a Celery chain's message carries every later step's arguments: with four shards
the first message held all four parts, the next three, and so on (a batch of 5,000 turns sent ~36 MB
of JSON, ~2.5 times its content, encoded and decoded again at every step).

The stash is as durable as the messages (the same Redis).  A worker that dies mid-step gets the same
message again (acks_late) and reads the same field.  The hash is deleted when the saga reaches a
final state, by the task or the reaper that settles it (:func:`~datamesh.workers.runtime.announce`),
and expires after :data:`STASH_TTL_S` otherwise; a step whose field is gone fails, and its saga is
compensated.
"""

from __future__ import annotations

import base64
import json
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
STASH_KEY = "dm:saga-parts:{}"
STASH_TTL_S = 7 * 24 * 3600  # longer than any message waits in a queue; deleted at the saga's end


def stash_key(saga_id: str) -> str:
    return STASH_KEY.format(saga_id)


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


def saga_chain(
    app: Celery, plan: SagaPlan, content: Content, blobs: Mapping[tuple[str, str], bytes]
) -> tuple[chain, dict[str, bytes]]:
    """``store_blobs`` per region → ``write_ap`` per shard → ``commit_cp``, as immutable signatures,
    and the stash their messages name: ``{field: JSON payload}`` for the saga's hash at :func:`stash_key`.

    Steps run one after another.  ``write_ap`` is recorded done by its last part only, so the reaper
    never drives forward a saga with a part missing; ``store_blobs`` by each region's part (harmless:
    every blob part runs before the first ``write_ap`` part).  Each part records itself done too.
    """
    sigs: list[Signature] = []
    stash: dict[str, bytes] = {}
    blob_regions = sorted({b.region for b in plan.blobs})
    for region in blob_regions:
        region_blobs = [
            [b.content_hash, b.size, b64(blobs[(b.region, b.content_hash)])] for b in plan.blobs if b.region == region
        ]
        field = f"{Step.STORE_BLOBS}.{region}"
        stash[field] = json.dumps(region_blobs).encode()
        sigs.append(
            app.signature(
                queues.STORE_BLOBS,
                kwargs={"saga_id": plan.saga_id, "tenant": plan.tenant, "region": region, "part": field},
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
        field = part_name(region, shard)
        stash[field] = json.dumps({"plan": sub.to_json(), "content": encode_content(sub, content)}).encode()
        sigs.append(
            app.signature(
                queues.WRITE_AP,
                kwargs={"saga_id": plan.saga_id, "region": region, "shard": shard, "part": field, "marks": marks},
                immutable=True,
            )
        )
    sigs.append(app.signature(queues.COMMIT_CP, kwargs={"saga_id": plan.saga_id}, immutable=True))
    return chain(*sigs, app=app), stash


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
