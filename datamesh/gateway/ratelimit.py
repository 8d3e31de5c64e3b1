"""Token buckets per API key and per tenant, kept in Redis so the limit holds across instances.

One Lua script refills and checks both buckets and takes from both, or from neither, atomically:
two gateway instances can never both spend the last token.  Time comes from Redis (``TIME``), so
instances' clocks do not matter.  A request costs one token per turn (a batch of 50 costs 50).

With Redis unreachable the limiter answers by configuration: ``closed`` refuses (503), ``open``
admits; it never raises.  redis-py's exceptions are translated here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cost = tonumber(ARGV[#ARGV])
local tokens = {}
local wait = 0
local limited = 0
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tk = tonumber(v[1])
  local ts = tonumber(v[2])
  if tk == nil or ts == nil then
    tk = burst
    ts = now
  end
  tk = math.min(burst, tk + math.max(0, now - ts) * rate)
  tokens[i] = tk
  local need = math.min(cost, burst)
  if tk < need then
    local w = (need - tk) / rate
    if w > wait then
      wait = w
      limited = i
    end
  end
end
local out = {}
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tk = tokens[i]
  if limited == 0 then
    tk = tk - cost
  end
  redis.call('HSET', KEYS[i], 'tokens', tostring(tk), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate * 1000) + 1000)
  out[i] = tostring(tk)
end
return {limited, tostring(wait), unpack(out)}
"""


@dataclass(frozen=True, slots=True)
class Bucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    rate: float
    burst: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The limiter's answer; ``scope`` names the exhausted bucket, ``unavailable`` a Redis failure."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    retry_after_s: float = 0.0
    scope: str = ""
    unavailable: bool = False

    def headers(self) -> dict[str, str]:
        if self.unavailable:
            return {"Retry-After": "1"} if not self.allowed else {}
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(max(0, self.remaining)),
            "RateLimit-Reset": str(math.ceil(self.reset_s)),
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return out


class RateLimiter:
    """Checks and takes tokens for ``(key_id, tenant)``; create with :meth:`from_url`."""

    def __init__(
        self,
        client: aioredis.Redis | None,
        *,
        per_key: Bucket,
        per_tenant: Bucket,
        fail_open: bool,
        prefix: str = "dm:rl",
    ) -> None:
        self._client = client
        self.per_key = per_key
        self.per_tenant = per_tenant
        self.fail_open = fail_open
        self.prefix = prefix
        self._script = client.register_script(SCRIPT) if client is not None else None

    @classmethod
    def from_url(cls, url: str | None, *, per_key: Bucket, per_tenant: Bucket, fail_open: bool) -> RateLimiter:
        """``url=None`` disables limiting (every request allowed)."""
        client = (
            aioredis.Redis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25, retry_on_timeout=False)
            if url
            else None
        )
        return cls(client, per_key=per_key, per_tenant=per_tenant, fail_open=fail_open)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    async def check(self, key_id: str, tenant: str, cost: int = 1) -> Decision:
        """Take ``cost`` tokens from both buckets, or none and say how long to wait."""
        if self._script is None:
            return Decision(True, 0, 0, 0.0)
        keys = [f"{self.prefix}:key:{key_id}", f"{self.prefix}:tenant:{tenant}"]
        args = [self.per_key.rate, self.per_key.burst, self.per_tenant.rate, self.per_tenant.burst, max(1, cost)]
        try:
            raw = await self._script(keys=keys, args=args)
        except (RedisError, OSError):
            return Decision(self.fail_open, 0, 0, 0.0, retry_after_s=1.0, scope="limiter", unavailable=True)
        limited, wait = int(raw[0]), float(raw[1])
        remaining = [float(x) for x in raw[2:]]
        # report the tighter of the two buckets
        buckets = [self.per_key, self.per_tenant]
        tight = limited - 1 if limited else min(range(2), key=lambda i: remaining[i] / buckets[i].burst)
        bucket = buckets[tight]
        reset = max(0.0, (bucket.burst - remaining[tight]) / bucket.rate)
        return Decision(
            allowed=limited == 0,
            limit=bucket.burst,
            remaining=math.floor(remaining[tight]),
            reset_s=reset,
            retry_after_s=wait,
            scope=("key", "tenant")[tight] if limited else "",
        )

    async def ping(self) -> bool:
        if self._client is None:
            return True
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
