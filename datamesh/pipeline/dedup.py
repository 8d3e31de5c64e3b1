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


def request_digest(request: ValidRequest, prompt_sha256: str, response_sha256: str) -> str:
    """SHA-256 over a canonical encoding of the request's defining fields."""
    canonical = {
        "entity": str(request.entity_id),
        "region": request.region.value,
        "conversation": str(request.conversation_id) if request.conversation_id else None,
        "prompt": prompt_sha256,
        "response": response_sha256,
        "metadata": sorted(request.metadata.items()),
    }
    sha = hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())
    if request.embedding is not None:
        sha.update(struct.pack(f"<{len(request.embedding)}d", *request.embedding))
    return sha.hexdigest()


def idempotency_key(request: ValidRequest, digest: str) -> str:
    """The client's key, or one derived from the request digest."""
    return request.idempotency_key if request.idempotency_key is not None else DERIVED_PREFIX + digest
