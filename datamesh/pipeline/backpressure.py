"""Backpressure: a token bucket (rate, burst) and a bound on requests in flight.

When either is exhausted the pipeline waits (the default) or, configured not to wait, answers
``Err(Backpressure)`` with the time after which a retry can succeed.  Nothing is ever dropped: a
request is either admitted and processed, or refused before anything is written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from datamesh.core.errors import Backpressure
from datamesh.core.result import Err, Ok, Result


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; a take of more than ``burst`` may borrow."""

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("TokenBucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_take(self, n: int) -> float:
        """Take ``n`` tokens now and return 0.0, or take nothing and return the seconds to wait.

        A request larger than the burst is admitted once the bucket is full, leaving it in debt.
        """
        self._refill()
        need = min(float(n), self.burst)
        if self._tokens >= need:
            self._tokens -= n
            return 0.0
        return (need - self._tokens) / self.rate

    @property
    def available(self) -> float:
        self._refill()
        return self._tokens


class Admission:
    """The pipeline's gate: rate first, then the in-flight bound."""

    def __init__(self, *, rate: float, burst: int, max_in_flight: int, wait: bool) -> None:
        self.bucket = TokenBucket(rate, burst)
        self.max_in_flight = max_in_flight
        self.wait = wait
        self.in_flight = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def admit(self, items: int) -> AsyncIterator[Result[None, Backpressure]]:
        """Hold a slot for a request of ``items`` turns while the body runs."""
        admitted = await self._enter(items)
        if isinstance(admitted, Err):
            yield admitted
            return
        try:
            yield admitted
        finally:
            async with self._changed:
                self.in_flight -= 1
                self._changed.notify()

    async def _enter(self, items: int) -> Result[None, Backpressure]:
        while True:
            delay = self.bucket.try_take(items)
            if delay == 0.0:
                break
            if not self.wait:
                return Err(Backpressure(delay, "ingest rate limit reached"))
            await asyncio.sleep(delay)
        async with self._changed:
            if self.in_flight >= self.max_in_flight and not self.wait:
                self.bucket._tokens += items  # give the tokens back: the request was not admitted
                return Err(Backpressure(0.05, f"{self.in_flight} requests in flight"))
            await self._changed.wait_for(lambda: self.in_flight < self.max_in_flight)
            self.in_flight += 1
        return Ok(None)
