"""Identifiers and value types shared by every tier.

* :class:`EntityId` — who or what a conversation belongs to (a user, an agent); a UUID.
* :class:`ConversationId`, :class:`TurnId`, :class:`SagaId` — time-ordered UUIDv7 values, so ids
  sort by creation time and B-tree inserts stay append-mostly.
* :class:`GeoRegion` — where content must stay (data residency).
* :class:`ContentHash` — SHA-256 of stored bytes, the key of the object store and the check made
  on every read.

Parsing never raises: ``parse`` returns ``Err(ValidationError)`` naming the field.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Self

from datamesh.core.errors import ValidationError
from datamesh.core.result import Err, Ok, Result

_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")

_uuid7_lock = threading.Lock()
_uuid7_last = [0, 0]  # last millisecond, last 12-bit counter


def uuid7() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then a counter and random bits.

    Monotonic within a process: ids made in the same millisecond increase via the counter.
    """
    return uuid.UUID(int=_uuid7_int())


def uuid7_text() -> str:
    """:func:`uuid7` in its canonical text form, without building a ``uuid.UUID``."""
    return _uuid7_canonical(_uuid7_int())


#: Ids made per hold of the id lock by :func:`uuid7_texts` (~1 ms), so other threads wait little.
_UUID7_CHUNK = 512


def uuid7_texts(count: int) -> list[str]:
    """``count`` ids as from ``count`` calls of :func:`uuid7_text`, in increasing order, made with
    one random read and one hold of the lock per :data:`_UUID7_CHUNK` (the ids of a batch: two per
    turn)."""
    made: list[str] = []
    for start in range(0, count, _UUID7_CHUNK):
        made += map(_uuid7_canonical, _uuid7_ints(min(_UUID7_CHUNK, count - start)))
    return made


def _uuid7_canonical(value: int) -> str:
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _uuid7_int() -> int:
    return _uuid7_ints(1)[0]


def _uuid7_ints(count: int) -> list[int]:
    # one read: 80 bits an id, 62 random bits and a counter seed
    blob = os.urandom(10 * count)
    made: list[int] = []
    with _uuid7_lock:
        last_ms, counter = _uuid7_last
        for start in range(0, 10 * count, 10):
            entropy = int.from_bytes(blob[start : start + 10], "big")
            ms = time.time_ns() // 1_000_000
            if ms <= last_ms:
                ms = last_ms
                counter += 1
                if counter > 0xFFF:
                    ms += 1
                    counter = 0
            else:
                counter = (entropy >> 64) & 0x3FF  # leave headroom to count up
            last_ms = ms
            rand = entropy & ((1 << 62) - 1)
            made.append((ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand)
        _uuid7_last[0], _uuid7_last[1] = last_ms, counter
    return made


def _parse_uuid(raw: object, field: str) -> Result[uuid.UUID, ValidationError]:
    if isinstance(raw, uuid.UUID):
        return Ok(raw)
    if not isinstance(raw, str) or not _UUID_RE.match(raw):
        return Err(ValidationError(field, f"expected a UUID string, got {_preview(raw)}"))
    return Ok(uuid.UUID(raw))


def _preview(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True, slots=True, order=True)
class _UuidId:
    value: uuid.UUID

    def __post_init__(self) -> None:
        if not isinstance(self.value, uuid.UUID):
            raise TypeError(f"{type(self).__name__} wraps a uuid.UUID, got {type(self.value).__name__}")

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls, raw: object, field: str | None = None) -> Result[Self, ValidationError]:
        """Parse a UUID string (or accept an instance); ``Err`` names ``field``."""
        if isinstance(raw, cls):
            return Ok(raw)
        parsed = _parse_uuid(raw, field or _field_name(cls.__name__))
        if isinstance(parsed, Err):
            return parsed
        return Ok(cls(parsed.value))


@functools.cache
def _field_name(class_name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", class_name).lower()


@dataclass(frozen=True, slots=True, order=True)
class EntityId(_UuidId):
    """The owner of conversations (a user, an agent, a device)."""

    @classmethod
    def generate(cls) -> EntityId:
        return cls(uuid.uuid4())


@dataclass(frozen=True, slots=True, order=True)
class ConversationId(_UuidId):
    """A conversation; UUIDv7, so ids sort by creation time."""

    @classmethod
    def generate(cls) -> ConversationId:
        return cls(uuid7())


@dataclass(frozen=True, slots=True, order=True)
class TurnId(_UuidId):
    """One prompt/response turn of a conversation; UUIDv7."""

    @classmethod
    def generate(cls) -> TurnId:
        return cls(uuid7())


@dataclass(frozen=True, slots=True, order=True)
class SagaId(_UuidId):
    """One ingest saga (a request or a batch); UUIDv7."""

    @classmethod
    def generate(cls) -> SagaId:
        return cls(uuid7())


class GeoRegion(StrEnum):
    """Where a conversation's content is stored; content never leaves its region's stores."""

    US_EAST = "us-east"
    US_WEST = "us-west"
    EU_WEST = "eu-west"
    EU_CENTRAL = "eu-central"
    AP_SOUTHEAST = "ap-southeast"

    @classmethod
    def parse(cls, raw: object, field: str = "geo_region") -> Result[GeoRegion, ValidationError]:
        """Accept a member, its value (``eu-west``) or its name (``EU_WEST``)."""
        if isinstance(raw, GeoRegion):
            return Ok(raw)
        if isinstance(raw, str):
            for member in cls:
                if raw in (member.value, member.name):
                    return Ok(member)
        known = ", ".join(m.value for m in cls)
        return Err(ValidationError(field, f"unknown region {_preview(raw)}; known: {known}"))


@dataclass(frozen=True, slots=True, order=True)
class ContentHash:
    """SHA-256 of a byte string, as 64 lowercase hex digits."""

    hex: str

    def __post_init__(self) -> None:
        if not isinstance(self.hex, str) or not _HEX64_RE.match(self.hex):
            raise ValueError(f"ContentHash needs 64 lowercase hex digits, got {_preview(self.hex)}")

    def __str__(self) -> str:
        return self.hex

    @classmethod
    def of(cls, data: bytes) -> ContentHash:
        # hexdigest() is 64 lowercase hex digits by construction: no pattern check (two per turn)
        made = object.__new__(cls)
        object.__setattr__(made, "hex", hashlib.sha256(data).hexdigest())
        return made

    @classmethod
    def parse(cls, raw: object, field: str = "content_hash") -> Result[ContentHash, ValidationError]:
        if isinstance(raw, ContentHash):
            return Ok(raw)
        if isinstance(raw, str) and _HEX64_RE.match(raw):
            return Ok(cls(raw))
        return Err(ValidationError(field, f"expected 64 lowercase hex digits, got {_preview(raw)}"))
