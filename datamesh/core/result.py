"""Result values: ``Ok(value)`` or ``Err(error)``.

Public calls of datamesh return a :data:`Result` instead of raising for control flow.  Both
variants share one surface (``is_ok``, ``is_err``, ``unwrap``, ``unwrap_err``, ``error``, ``map``,
``map_err``, ``and_then``, ``unwrap_or``) so callers may test and unwrap without narrowing, and
both support structural pattern matching (``match r: case Ok(v): ... case Err(e): ...``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, NoReturn, TypeAlias, TypeVar

T = TypeVar("T", covariant=True)
U = TypeVar("U")
E = TypeVar("E", covariant=True)
F = TypeVar("F")


class UnwrapError(Exception):
    """Raised by ``unwrap`` on an ``Err`` or ``unwrap_err`` on an ``Ok``: a programming bug."""


@dataclass(frozen=True, slots=True)
class Ok(Generic[T]):
    """A successful result holding ``value``."""

    value: T

    @property
    def error(self) -> None:
        """Always ``None``: an ``Ok`` carries no error."""
        return None

    def is_ok(self) -> bool:
        return True

    def is_err(self) -> bool:
        return False

    def unwrap(self) -> T:
        return self.value

    def unwrap_err(self) -> NoReturn:
        raise UnwrapError(f"unwrap_err() called on Ok({self.value!r})")

    def unwrap_or(self, default: object) -> T:
        return self.value

    def map(self, fn: Callable[[T], U]) -> Ok[U]:
        return Ok(fn(self.value))

    def map_err(self, fn: Callable[[object], object]) -> Ok[T]:
        return self

    def and_then(self, fn: Callable[[T], Result[U, F]]) -> Result[U, F]:
        return fn(self.value)


@dataclass(frozen=True, slots=True)
class Err(Generic[E]):
    """A failed result holding ``error`` (one of the variants of :mod:`datamesh.core.errors`)."""

    error: E

    def is_ok(self) -> bool:
        return False

    def is_err(self) -> bool:
        return True

    def unwrap(self) -> NoReturn:
        raise UnwrapError(f"unwrap() called on Err({self.error!r})")

    def unwrap_err(self) -> E:
        return self.error

    def unwrap_or(self, default: U) -> U:
        return default

    def map(self, fn: Callable[[object], object]) -> Err[E]:
        return self

    def map_err(self, fn: Callable[[E], F]) -> Err[F]:
        return Err(fn(self.error))

    def and_then(self, fn: Callable[[object], object]) -> Err[E]:
        return self


Result: TypeAlias = Ok[T] | Err[E]
