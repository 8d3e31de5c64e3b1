"""Retries with exponential backoff and full jitter (tenacity underneath).

Full jitter (sleep a uniform random time in ``[0, min(cap, base * 2**attempt)]``) spreads retries of
many clients apart, which plain exponential backoff does not.  Only errors the caller marks as
retryable are retried; the last outcome is returned as is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

T = TypeVar("T")

DEFAULT_ATTEMPTS = 5
DEFAULT_BASE_S = 0.05
DEFAULT_CAP_S = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry; ``deadline_s`` of ``None`` means no time bound."""

    attempts: int = DEFAULT_ATTEMPTS
    base_s: float = DEFAULT_BASE_S
    cap_s: float = DEFAULT_CAP_S
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        if self.base_s <= 0 or self.cap_s < self.base_s:
            raise ValueError("RetryPolicy needs 0 < base_s <= cap_s")

    def _kwargs(self, retry_on: Callable[[BaseException], bool]) -> dict[str, object]:
        stop = stop_after_attempt(self.attempts)
        if self.deadline_s is not None:
            stop = stop | stop_after_delay(self.deadline_s)  # type: ignore[assignment]
        return {
            "stop": stop,
            "wait": wait_random_exponential(multiplier=self.base_s, max=self.cap_s),
            "retry": retry_if_exception(retry_on),
            "reraise": True,
        }


def full_jitter_delay(attempt: int, *, base_s: float = DEFAULT_BASE_S, cap_s: float = DEFAULT_CAP_S) -> float:
    """The delay before retry number ``attempt`` (1-based) under full jitter."""
    state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return float(wait_random_exponential(multiplier=base_s, max=cap_s)(state))


def call_with_retry(fn: Callable[[], T], retry_on: Callable[[BaseException], bool], policy: RetryPolicy) -> T:
    """Call ``fn`` until it returns, retrying exceptions for which ``retry_on`` is true."""
    for attempt in Retrying(**policy._kwargs(retry_on)):  # type: ignore[arg-type]
        with attempt:
            return fn()
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover


async def call_with_retry_async(
    fn: Callable[[], Awaitable[T]],
    retry_on: Callable[[BaseException], bool],
    policy: RetryPolicy,
) -> T:
    """The async twin of :func:`call_with_retry`."""
    async for attempt in AsyncRetrying(**policy._kwargs(retry_on)):  # type: ignore[arg-type]
        with attempt:
            return await fn()
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover
