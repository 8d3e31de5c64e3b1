"""Shard leases with fencing tokens, in Redis.

A queue can briefly have two consumers (a rolling deploy, a redelivery to a second worker), so the
single writer of a shard is enforced, not assumed: before writing, a worker holds the shard's lease
(``SET NX PX``) and the token that came with it (``INCR``).  The shard refuses writes carrying a token
lower than one it has seen (:mod:`datamesh.storage.ap.fenced`).  When the owner dies its lease expires
and another worker takes the shard with a higher token.

Tokens must only grow, even if Redis loses its data: the acquirer passes the highest token the shard
has seen and the counter jumps past it; and a worker records a token it takes in the shard's fence at
once (``fence_to``), before it writes, so a token taken but never written with is not issued twice
should Redis lose its counter.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, '|', 1, true)
  local owner = string.sub(current, 1, sep - 1)
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {tonumber(string.sub(current, sep + 1)), 0}
  end
  return {0, redis.call('PTTL', KEYS[1])}
end
local token = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3])
if token <= floor then
  token = floor + 1
  redis.call('SET', KEYS[2], token)
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return {token, 0}
"""

_RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(slots=True)
class _Held:
    token: int
    valid_until: float


class ShardLeases:
    """The leases one worker holds; ``owner`` names the worker node (stable across child restarts)."""

    def __init__(
        self,
        client: redis.Redis,
        owner: str,
        *,
        ttl_s: float,
        fence_of: Callable[[str, int], int],
        fence_to: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self._client = client
        self.owner = owner
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._fence_of = fence_of
        self._fence_to = fence_to
        self._held: dict[tuple[str, int], _Held] = {}
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)

    def acquire(self, region: str, shard: int) -> tuple[int | None, float]:
        """Take or renew the lease: ``(token, 0)``, or ``(None, seconds until it may be free)``."""
        started = time.monotonic()
        fence = self._fence_of(region, shard)
        token, wait_ms = self._acquire(
            keys=[f"dm:lease:ap:{region}:{shard}", f"dm:fence:ap:{region}:{shard}"],
            args=[self.owner, self.ttl_ms, fence],
        )
        if int(token) <= 0:
            self._held.pop((region, shard), None)
            return None, max(0.05, int(wait_ms) / 1000)
        if int(token) > fence and self._fence_to is not None:
            self._fence_to(region, shard, int(token))  # before any write with it: see the module's note
        # Trust the lease locally for less than its TTL, counted from before the request was sent.
        self._held[(region, shard)] = _Held(int(token), started + self.ttl_ms / 1000 * 0.8)
        return int(token), 0.0

    def token(self, region: str, shard: int) -> int | None:
        """The token held for a shard, while the lease is surely still ours."""
        held = self._held.get((region, shard))
        if held is None or time.monotonic() > held.valid_until:
            return None
        return held.token

    def forget(self, region: str, shard: int) -> None:
        self._held.pop((region, shard), None)

    def release(self, region: str, shard: int) -> None:
        """Give the lease up now (if it is still ours), so the shard's owner need not wait for it to expire."""
        self._release(keys=[f"dm:lease:ap:{region}:{shard}"], args=[self.owner])
        self._held.pop((region, shard), None)

    def release_all(self) -> None:
        for region, shard in list(self._held):
            self._release(keys=[f"dm:lease:ap:{region}:{shard}"], args=[self.owner])
        self._held.clear()
