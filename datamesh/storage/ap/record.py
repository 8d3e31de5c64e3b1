"""The AP tier's value format for one turn's content, and its key layout.

Key: ``entity_id (16 bytes) | conversation_id (16) | turn_id (16)`` — a prefix scan on the entity
yields all its turns, and the shard is chosen from the entity bytes.

Value (version 1)::

    u8 version | 16 bytes saga id | prompt part | response part | u32 embedding dim | f32 * dim
    part = u8 kind (0 inline, 1 object-store reference) | u32 length | bytes (data or 32-byte hash)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from uuid import UUID

from datamesh.core.types import ContentHash, ConversationId, EntityId, SagaId, TurnId

VERSION = 1
_INLINE = 0
_REF = 1
_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<B16s")
_PART = struct.Struct("<BI")
_NO_EMBEDDING = _U32.pack(0)


class RecordFormatError(ValueError):
    """The stored bytes are not a turn record this version understands."""


@dataclass(frozen=True, slots=True)
class Payload:
    """Either the bytes themselves (``inline``) or the object-store hash that holds them."""

    inline: bytes | None = None
    ref: ContentHash | None = None

    def __post_init__(self) -> None:
        if (self.inline is None) == (self.ref is None):
            raise ValueError("a Payload is either inline bytes or a reference, not both or neither")


@dataclass(frozen=True, slots=True)
class TurnContent:
    """What the AP tier stores for one turn."""

    saga_id: SagaId
    prompt: Payload
    response: Payload
    embedding: tuple[float, ...] | None = None

    def encode(self) -> bytes:
        return encode_turn(turn_head(self.saga_id), self.prompt, self.response, self.embedding)

    @classmethod
    def decode(cls, data: bytes) -> TurnContent:
        try:
            version, saga = _HEAD.unpack_from(data, 0)
            if version != VERSION:
                raise RecordFormatError(f"unknown turn record version {version}")
            offset = _HEAD.size
            prompt, offset = _decode_part(data, offset)
            response, offset = _decode_part(data, offset)
            (dim,) = _U32.unpack_from(data, offset)
            offset += _U32.size
            embedding = struct.unpack_from(f"<{dim}f", data, offset) if dim else None
            if offset + 4 * dim != len(data):
                raise RecordFormatError("trailing or missing bytes in turn record")
        except struct.error as exc:
            raise RecordFormatError(f"truncated turn record: {exc}") from None
        return cls(
            SagaId(UUID(bytes=saga)),
            prompt,
            response,
            tuple(embedding) if embedding else None,
        )


def turn_head(saga_id: SagaId) -> bytes:
    """The leading bytes of every record of ``saga_id`` (version and saga id), for :func:`encode_turn`."""
    return _HEAD.pack(VERSION, saga_id.value.bytes)


def encode_turn(
    head: bytes,
    prompt: Payload | bytes,
    response: Payload | bytes,
    embedding: tuple[float, ...] | None,
) -> bytes:
    """``TurnContent(saga_id, prompt, response, embedding).encode()`` with ``head = turn_head(saga_id)``,
    where a payload given as bytes is inline: a saga step encodes its batch without a
    :class:`Payload` and a :class:`TurnContent` per turn (and the saga's head once)."""
    pieces = [head]
    for part in (prompt, response):
        if isinstance(part, Payload):
            pieces.append(_encode_part(part))
        else:
            pieces.append(_PART.pack(_INLINE, len(part)))
            pieces.append(part)
    if embedding:
        pieces.append(_U32.pack(len(embedding)))
        pieces.append(struct.pack(f"<{len(embedding)}f", *embedding))
    else:
        pieces.append(_NO_EMBEDDING)
    return b"".join(pieces)


def turn_key(entity: EntityId, conversation: ConversationId, turn: TurnId) -> bytes:
    return entity.value.bytes + conversation.value.bytes + turn.value.bytes


def turn_key_of(entity_id: str, conversation_id: str, turn_id: str) -> bytes:
    """:func:`turn_key` from the ids' text form (as the CP tier stores them), without building UUIDs."""
    key = bytes.fromhex(entity_id.replace("-", "") + conversation_id.replace("-", "") + turn_id.replace("-", ""))
    if len(key) != 48:
        raise ValueError(f"not three UUIDs: {entity_id!r}, {conversation_id!r}, {turn_id!r}")
    return key


def entity_prefix(entity: EntityId) -> bytes:
    return entity.value.bytes


def _encode_part(part: Payload) -> bytes:
    if part.inline is not None:
        return _PART.pack(_INLINE, len(part.inline)) + part.inline
    assert part.ref is not None
    raw = bytes.fromhex(part.ref.hex)
    return _PART.pack(_REF, len(raw)) + raw


def _decode_part(data: bytes, offset: int) -> tuple[Payload, int]:
    kind, length = _PART.unpack_from(data, offset)
    offset += _PART.size
    body = data[offset : offset + length]
    if len(body) != length:
        raise RecordFormatError("truncated payload in turn record")
    offset += length
    if kind == _INLINE:
        return Payload(inline=bytes(body)), offset
    if kind == _REF and length == 32:
        return Payload(ref=ContentHash(body.hex())), offset
    raise RecordFormatError(f"unknown payload kind {kind}")
