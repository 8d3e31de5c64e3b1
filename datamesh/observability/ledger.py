"""The no-loss invariant, kept as metrics: every accepted turn is accounted for at every moment.

Units are turns (one ``IngestionRequest``).  A turn is **accepted** when the ``reserve`` step
commits it into a saga.  From then on it is exactly one of::

    in flight     its saga is running or compensating (also: its driver crashed, the reaper has not
                  settled it yet)
    persisted     its saga committed (the CP pivot)
    compensated   its saga failed and was fully undone; the caller received the error
    dead-lettered its compensation kept failing, or the reaper's re-runs of its pivot did; ``sagas
                  --dead`` lists it, ``sagas retry`` re-drives it (a pivot's back to in flight)

so, summed over regions and processes::

    accepted = persisted + compensated + dead-lettered + in flight

``datamesh_ingest_dead_letter_turns`` and ``datamesh_ingest_in_flight_turns`` are up-down gauges;
the rest are counters.  Turns refused before acceptance (invalid, denied, backpressure, idempotency
conflict, unknown conversation) count as *rejected*, replays as *deduplicated*: neither enters the
equation.

Each move is counted by whoever made the saga-log transition that caused it, after its CP
transaction committed: the transition succeeds for exactly one process (CP is serializable), so a
reaper and a slow driver never both count the same turn.  Within a process the ledger is updated
metric by metric, so a scrape can catch it mid-update; alert on the invariant with a ``for:`` window.
Counters reset when a process restarts: sum over a multiprocess directory (not wiped while sagas are
open) or compare over the same set of processes.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from datamesh.observability import metrics

__all__ = [
    "Ledger",
    "accepted",
    "compensated",
    "dead_lettered",
    "deduplicated",
    "persisted",
    "rejected",
    "revived",
    "snapshot",
]


def _regions(regions: Iterable[str]) -> Tally[str]:
    return Tally(regions)


def accepted(regions: Iterable[str]) -> None:
    """Turns (one region per turn) entered a saga."""
    if not metrics.enabled():
        return
    for region, n in _regions(regions).items():
        metrics.INGEST_IN_FLIGHT.labels(region).inc(n)
        metrics.INGEST_ACCEPTED.labels(region).inc(n)


def persisted(regions: Iterable[str]) -> None:
    if not metrics.enabled():
        return
    for region, n in _regions(regions).items():
        metrics.INGEST_PERSISTED.labels(region).inc(n)
        metrics.INGEST_IN_FLIGHT.labels(region).dec(n)


def compensated(regions: Iterable[str], *, from_dead: bool = False) -> None:
    """Turns were undone; ``from_dead``: their saga had been dead-lettered and was re-driven."""
    if not metrics.enabled():
        return
    for region, n in _regions(regions).items():
        metrics.INGEST_COMPENSATED.labels(region).inc(n)
        (metrics.INGEST_DEAD_LETTER if from_dead else metrics.INGEST_IN_FLIGHT).labels(region).dec(n)


def dead_lettered(regions: Iterable[str]) -> None:
    if not metrics.enabled():
        return
    for region, n in _regions(regions).items():
        metrics.INGEST_DEAD_LETTERED.labels(region).inc(n)
        metrics.INGEST_DEAD_LETTER.labels(region).inc(n)
        metrics.INGEST_IN_FLIGHT.labels(region).dec(n)


def revived(regions: Iterable[str]) -> None:
    """Turns of a saga dead-lettered at its pivot are in flight again (``sagas retry`` re-runs it)."""
    if not metrics.enabled():
        return
    for region, n in _regions(regions).items():
        metrics.INGEST_DEAD_LETTER.labels(region).dec(n)
        metrics.INGEST_IN_FLIGHT.labels(region).inc(n)


def deduplicated(regions: Iterable[str]) -> None:
    if not metrics.enabled():
        return
    for region, n in _regions(regions).items():
        metrics.INGEST_DEDUPLICATED.labels(region).inc(n)


def rejected(regions: Iterable[str], outcome: str) -> None:
    if not metrics.enabled():
        return
    for region, n in _regions(regions).items():
        metrics.INGEST_REJECTED.labels(region, outcome).inc(n)


@dataclass(frozen=True, slots=True)
class Ledger:
    """The ledger's totals over every region (and every process in multiprocess mode)."""

    accepted: float
    persisted: float
    compensated: float
    dead_letter: float
    in_flight: float
    deduplicated: float
    rejected: float

    @property
    def lost(self) -> float:
        """Accepted turns that are nowhere: 0 unless events were lost (the alert's expression)."""
        return self.accepted - self.persisted - self.compensated - self.dead_letter - self.in_flight

    def __sub__(self, other: Ledger) -> Ledger:
        return Ledger(
            self.accepted - other.accepted,
            self.persisted - other.persisted,
            self.compensated - other.compensated,
            self.dead_letter - other.dead_letter,
            self.in_flight - other.in_flight,
            self.deduplicated - other.deduplicated,
            self.rejected - other.rejected,
        )


_SAMPLES = {
    "datamesh_ingest_accepted_turns_total": "accepted",
    "datamesh_ingest_persisted_turns_total": "persisted",
    "datamesh_ingest_compensated_turns_total": "compensated",
    "datamesh_ingest_dead_letter_turns": "dead_letter",
    "datamesh_ingest_in_flight_turns": "in_flight",
    "datamesh_ingest_deduplicated_turns_total": "deduplicated",
    "datamesh_ingest_rejected_turns_total": "rejected",
}


def snapshot(registry: CollectorRegistry | None = None) -> Ledger:
    """Read the ledger from ``registry`` (default: :func:`metrics.registry`)."""
    totals = dict.fromkeys(_SAMPLES.values(), 0.0)
    for family in (registry or metrics.registry()).collect():
        for sample in family.samples:
            field = _SAMPLES.get(sample.name)
            if field is not None:
                totals[field] += sample.value
    return Ledger(**totals)
