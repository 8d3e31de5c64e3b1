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
import struct
from array import array
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


#: A ``write_ap`` part in the stash: ``MAGIC``, the sub-plan's JSON (``u32`` length first), then per
#: turn ``u32`` index, prompt length, response length, embedding length (``NO_EMBEDDING`` for none),
#: the prompt and response bytes and the embedding as float64, little-endian throughout.  Raw bytes:
#: the JSON-with-base64 form it replaces cost ~13 µs a turn to encode and ~11 to decode for AlpacaEval
#: texts, against ~2.8 each this way, and 30% more bytes in Redis (``bench/bench_codecs.py``).  A
#: part in that JSON form (``{`` first: stashed by a caller of an earlier version during a rolling
#: deploy) is still read.
PART_MAGIC = b"DMP1"
_PART_LEN = struct.Struct("<I")
_TURN_HEAD = struct.Struct("<IIII")
NO_EMBEDDING = 0xFFFFFFFF


class PartFormatError(ValueError):
    """A stashed ``write_ap`` part that is neither form (truncated, or another writer's data)."""


def encode_part(plan: SagaPlan, content: Content) -> bytes:
    """A ``write_ap`` part: ``plan`` (one shard's sub-plan) and its turns' AP content; payloads kept in
    the object store are not sent again (empty here, as in :func:`encode_content`)."""
    plan_json = plan.to_json().encode()
    out = [PART_MAGIC, _PART_LEN.pack(len(plan_json)), plan_json]
    for item in plan.items:
        prompt, response, embedding = content[item.index]
        prompt = prompt if item.prompt_location == LOCATION_AP else b""
        response = response if item.response_location == LOCATION_AP else b""
        vector = array("d", embedding).tobytes() if embedding is not None else b""
        count = NO_EMBEDDING if embedding is None else len(embedding)
        out += [_TURN_HEAD.pack(item.index, len(prompt), len(response), count), prompt, response, vector]
    return b"".join(out)


def decode_part(raw: bytes) -> tuple[SagaPlan, dict[int, tuple[bytes, bytes, tuple[float, ...] | None]]]:
    """The sub-plan and content of a stashed ``write_ap`` part, in either form; raises
    :class:`PartFormatError` naming what is wrong."""
    if raw[:1] == b"{":
        wire = json.loads(raw)
        return SagaPlan.from_json(wire["plan"]), decode_content(wire["content"])
    if raw[: len(PART_MAGIC)] != PART_MAGIC:
        raise PartFormatError(f"a write_ap part starts with {raw[:4]!r}, not {PART_MAGIC!r} or JSON")
    try:
        pos = len(PART_MAGIC)
        (plan_len,) = _PART_LEN.unpack_from(raw, pos)
        pos += _PART_LEN.size
        plan = SagaPlan.from_json(raw[pos : pos + plan_len].decode())
        pos += plan_len
        content: dict[int, tuple[bytes, bytes, tuple[float, ...] | None]] = {}
        while pos < len(raw):
            index, prompt_len, response_len, count = _TURN_HEAD.unpack_from(raw, pos)
            pos += _TURN_HEAD.size
            prompt, pos = raw[pos : pos + prompt_len], pos + prompt_len
            response, pos = raw[pos : pos + response_len], pos + response_len
            embedding = None
            if count != NO_EMBEDDING:
                embedding, pos = tuple(array("d", raw[pos : pos + 8 * count])), pos + 8 * count
            if pos > len(raw):
                raise PartFormatError(f"a write_ap part ends inside turn {index} ({len(raw)} bytes)")
            content[index] = (prompt, response, embedding)
    except (struct.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, PartFormatError):
            raise
        raise PartFormatError(f"a write_ap part cannot be read: {exc}") from exc
    missing = sorted({item.index for item in plan.items} - content.keys())
    if missing:  # cut at a turn's boundary
        raise PartFormatError(f"a write_ap part lacks the content of turns {missing[:5]} of its plan")
    return plan, content


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
        stash[field] = encode_part(sub, content)
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
