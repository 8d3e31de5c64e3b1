"""Bearer-key authentication against the CP tier, with a short TTL cache.

The cache keys on a SHA-256 of the presented key (raw keys are never kept), holds positive and
negative answers for at most ``ttl_s`` (and never past a key's expiry), so a revoked key stops
working within ``ttl_s``.  CP failures are not cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime

from datamesh.core.errors import AccessDenied, StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.storage.cp.access import AccessControl, Authenticated

MAX_CACHED = 10_000

AuthResult = Result[Authenticated, AccessDenied | StorageError]


class Authenticator:
    def __init__(self, access: AccessControl, *, ttl_s: float) -> None:
        self.access = access
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, AuthResult]] = {}

    async def authenticate(self, header: str | None) -> AuthResult:
        """Check an ``Authorization`` header value (``Bearer <key>``)."""
        if not header:
            return Err(AccessDenied("authenticate", "missing Authorization: Bearer <api key> header"))
        scheme, _, raw = header.partition(" ")
        raw = raw.strip()
        if scheme.lower() != "bearer" or not raw:
            return Err(AccessDenied("authenticate", "expected Authorization: Bearer <api key>"))
        digest = hashlib.sha256(raw.encode("utf-8", "replace")).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        result = await asyncio.to_thread(self.access.authenticate_key, raw)
        if isinstance(result, Err) and isinstance(result.error, StorageError):
            return result
        expires = now + self.ttl_s
        if isinstance(result, Ok) and result.value.expires_at is not None:
            left = (result.value.expires_at - datetime.now(UTC)).total_seconds()
            expires = min(expires, now + left)
        if self.ttl_s > 0:
            if len(self._cache) >= MAX_CACHED:
                self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(self._cache) >= MAX_CACHED:
                    self._cache.clear()
            self._cache[digest] = (expires, result)
        return result
