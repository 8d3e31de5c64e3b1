"""Scrub: re-read every object of a store and report the corrupt and the missing.

``python -m datamesh objects verify`` calls :func:`scrub_store` per region.  Reads go through the
store's verifying path, so a corrupt object is reported, never returned.  ``expected`` (the hashes
the CP tier references) turns "referenced but absent" into ``missing``; without it, ``missing`` only
holds keys that were listed but vanished before they were read (e.g. collected meanwhile).
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from datamesh.core.errors import IntegrityError, NotFound, StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ContentHash
from datamesh.storage.objects.base import ObjectStore

DEFAULT_SCRUB_WORKERS = 4


@dataclass(slots=True)
class ScrubReport:
    """What a scrub found; ``ok`` when nothing is corrupt, missing or unreadable."""

    checked: int = 0
    bytes_checked: int = 0
    corrupt: list[ContentHash] = field(default_factory=list)
    missing: list[ContentHash] = field(default_factory=list)
    failed: list[tuple[ContentHash, StorageError]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.missing or self.failed)


def scrub_store(
    store: ObjectStore[Any],
    *,
    expected: Iterable[ContentHash] | None = None,
    workers: int = DEFAULT_SCRUB_WORKERS,
) -> Result[ScrubReport, StorageError]:
    """Verify every object of ``store`` (and check that every ``expected`` hash is present).

    ``Err`` only when the store cannot be listed; per-object read failures land in ``failed``.
    """
    listed = store.list()
    if isinstance(listed, Err):
        return listed
    present = set(listed.value)
    report = ScrubReport()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for key, outcome in zip(listed.value, pool.map(store.verify, listed.value), strict=True):
            report.checked += 1
            match outcome:
                case Ok(value=size):
                    report.bytes_checked += size
                case Err(error=IntegrityError()):
                    report.corrupt.append(key)
                case Err(error=NotFound()):
                    report.missing.append(key)
                case Err(error=StorageError() as error):
                    report.failed.append((key, error))
    if expected is not None:
        report.missing.extend(sorted(set(expected) - present))
    return Ok(report)
