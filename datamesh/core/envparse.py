"""Parsing of ``DATAMESH_*`` variables: each parser raises ``ValueError`` with what was expected,
and :func:`_get` turns that into :class:`_BadValue` naming the variable (the configuration objects
turn it into ``Err(ConfigError)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class _BadValue(Exception):
    def __init__(self, variable: str, message: str) -> None:
        super().__init__(variable, message)
        self.variable = variable
        self.message = message


def _get(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw.strip())
    except ValueError as exc:
        raise _BadValue(name, f"{exc} (got {raw!r})") from None


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("expected a positive finite number")
    return value


def _non_negative_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if not 0 <= value < float("inf"):
        raise ValueError("expected a finite number >= 0")
    return value


def _fraction(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError("expected a number from 0 to 1")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return raw

    return parse


def _upper_choice(options: tuple[str, ...]) -> Callable[[str], str]:
    parse = _choice(options)
    return lambda raw: parse(raw.upper())


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")


def _url(raw: str) -> str:
    if "://" not in raw:
        raise ValueError("expected a URL such as scheme://...")
    return raw


def _optional_path(raw: str) -> Path | None:
    return Path(raw)


def _float_between(low: float, high: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low} to {high}")
        return value

    return parse
