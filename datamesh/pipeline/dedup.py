"""Idempotency keys: given by the client, or derived from what the request says.

The request digest covers every field that defines the stored turn (owner, region, target
conversation, the SHA-256 of prompt and response, embedding, metadata), so the same key with a
different payload is detected as a conflict and a replay with the same payload is recognised.
"""

from __future__ import annotations

import hashlib
import json
import struct

from datamesh.pipeline.request import ValidRequest

DERIVED_PREFIX = "sha256:"
_ascii = json.encoder.encode_basestring_ascii


def request_digest(
    request: ValidRequest, prompt_sha256: str, response_sha256: str, *, entity_id: str | None = None
) -> str:
    """SHA-256 over a canonical encoding of the request's defining fields (``entity_id``: the text of
    ``request.entity_id``, when the caller has made it already)."""
    sha = hashlib.sha256(canonical_request(request, prompt_sha256, response_sha256, entity_id=entity_id).encode())
    if request.embedding is not None:
        sha.update(struct.pack(f"<{len(request.embedding)}d", *request.embedding))
    return sha.hexdigest()


def canonical_request(
    request: ValidRequest, prompt_sha256: str, response_sha256: str, *, entity_id: str | None = None
) -> str:
    """``json.dumps`` of the defining fields with sorted keys, compact separators and ASCII escapes.

    Spelled out in key order because it runs once per ingested turn; a test checks it against
    ``json.dumps`` (the digests of stored keys depend on these exact bytes).
    """
    conversation = _ascii(str(request.conversation_id)) if request.conversation_id else "null"
    metadata = json.dumps(sorted(request.metadata.items()), separators=(",", ":")) if request.metadata else "[]"
    return '{"conversation":%s,"entity":%s,"metadata":%s,"prompt":%s,"region":%s,"response":%s}' % (  # noqa: UP031
        conversation,
        _ascii(str(request.entity_id) if entity_id is None else entity_id),
        metadata,
        _ascii(prompt_sha256),
        _ascii(request.region.value),
        _ascii(response_sha256),
    )


def idempotency_key(request: ValidRequest, digest: str) -> str:
    """The client's key, or one derived from the request digest."""
    return request.idempotency_key if request.idempotency_key is not None else DERIVED_PREFIX + digest
