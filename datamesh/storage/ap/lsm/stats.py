"""Operational statistics of LSM shards, live (``LsmShard.stats()``) or read from disk.

:func:`format_stats` is what ``python -m datamesh ap stats`` prints for a data directory: it reads
each shard's manifest and log sizes, so it works while writers run in other processes.  It cannot
see a writer's memory, so its ``memtable`` column is the bytes of the records in the shard's
unflushed logs (the logs the manifest still needs, without their file headers): what the writer's
memtables hold, as encoded in the log, and 0 once everything is flushed.
"""

from __future__ import annotations

import contextlib
from collections import Counter as _Tally
from dataclasses import dataclass, field
from pathlib import Path

from datamesh.storage.ap.lsm.compaction import pending_compactions
from datamesh.storage.ap.lsm.log import FILE_HEADER
from datamesh.storage.ap.lsm.manifest import MANIFEST_NAME, Manifest, load_manifest

LOG_SUFFIX = ".log"
RUN_SUFFIX = ".sqlite3"
SHARD_SUFFIX = ".lsm"


@dataclass(frozen=True, slots=True)
class LsmStats:
    """A shard's shape and cost.  Amplifications are ratios of bytes; 0.0 when nothing was written.

    ``write_amplification``: bytes written to log, flushed runs and compaction outputs per byte
    the user wrote.  ``space_amplification``: bytes on disk (runs and logs) per key+value byte
    held in runs and memtables; duplicates across runs are counted once per copy, so with
    overwrites the true figure is higher (the benchmark measures it against unique rows).
    """

    path: str
    memtable_bytes: int
    memtable_entries: int
    immutable_memtables: int
    runs_per_level: dict[int, int]
    run_bytes: int
    log_bytes: int
    entries_in_runs: int
    pending_compactions: int
    compacting: bool
    write_amplification: float
    space_amplification: float
    flushes: int
    compactions: int
    stalls: int = 0
    stall_seconds_total: float = 0.0
    stall_seconds_max: float = 0.0
    slowdown_seconds_total: float = 0.0
    last_recovery: dict[str, int | str] = field(default_factory=dict)


def build_stats(
    path: Path,
    manifest: Manifest,
    *,
    fanout: int,
    memtable_bytes: int,
    memtable_entries: int,
    immutable_memtables: int,
    log_bytes: int,
    compacting: bool,
    stalls: int = 0,
    stall_seconds_total: float = 0.0,
    stall_seconds_max: float = 0.0,
    slowdown_seconds_total: float = 0.0,
    last_recovery: dict[str, int | str] | None = None,
) -> LsmStats:
    counters = manifest.counters
    run_bytes = sum(run.file_bytes for run in manifest.runs)
    payload = sum(run.payload_bytes for run in manifest.runs) + memtable_bytes
    written = counters.log_bytes + counters.flush_bytes + counters.compaction_bytes_written
    return LsmStats(
        path=str(path),
        memtable_bytes=memtable_bytes,
        memtable_entries=memtable_entries,
        immutable_memtables=immutable_memtables,
        runs_per_level=dict(sorted(_Tally(run.level for run in manifest.runs).items())),
        run_bytes=run_bytes,
        log_bytes=log_bytes,
        entries_in_runs=sum(run.entries for run in manifest.runs),
        pending_compactions=pending_compactions(manifest.runs, fanout),
        compacting=compacting,
        write_amplification=written / counters.user_bytes if counters.user_bytes else 0.0,
        space_amplification=(run_bytes + log_bytes) / payload if payload else 0.0,
        flushes=counters.flushes,
        compactions=counters.compactions,
        stalls=stalls,
        stall_seconds_total=stall_seconds_total,
        stall_seconds_max=stall_seconds_max,
        slowdown_seconds_total=slowdown_seconds_total,
        last_recovery=dict(last_recovery or {}),
    )


def logs_bytes(shard_dir: Path, *, min_log: int = 0, records_only: bool = False) -> int:
    """Bytes in the shard's logs numbered ``min_log`` or above (``records_only``: without each log's
    file header, so logs holding no record count 0).  A log the flusher removes while they are
    listed (it does so outside the shard lock) counts as the empty log it has become."""
    total = 0
    for log in shard_dir.glob(f"*{LOG_SUFFIX}") if shard_dir.exists() else ():
        if int(log.stem.split("-")[-1]) < min_log:
            continue
        with contextlib.suppress(FileNotFoundError):
            size = log.stat().st_size
            total += max(0, size - len(FILE_HEADER)) if records_only else size
    return total


def read_stats(shard_dir: Path, *, fanout: int) -> LsmStats | None:
    """Stats of a shard from its files alone (no lock taken; safe beside a running writer)."""
    manifest = load_manifest(shard_dir)
    if manifest is None:
        return None
    log_bytes = logs_bytes(shard_dir, min_log=manifest.min_log)
    return build_stats(
        shard_dir,
        manifest,
        fanout=fanout,
        memtable_bytes=logs_bytes(shard_dir, min_log=manifest.min_log, records_only=True),
        memtable_entries=-1,
        immutable_memtables=-1,
        log_bytes=log_bytes,
        compacting=False,
    )


def format_stats(data_dir: Path, *, fanout: int | None = None) -> str:
    """A table of every LSM shard under ``data_dir`` (any directory below it holding a ``MANIFEST``)."""
    from datamesh.storage.ap.lsm.shard import DEFAULT_TIER_FANOUT

    header = (
        f"{'shard':<40} {'memtable':>10} {'runs/level':<22} {'run bytes':>12} {'pending':>7} {'W-amp':>6} {'S-amp':>6}"
    )
    lines = [header, "-" * len(header)]
    shards = sorted(manifest.parent for manifest in Path(data_dir).rglob(MANIFEST_NAME))
    for shard in shards:
        stats = read_stats(shard, fanout=fanout or DEFAULT_TIER_FANOUT)
        if stats is None:
            continue
        levels = " ".join(f"L{level}:{count}" for level, count in stats.runs_per_level.items()) or "-"
        name = str(shard.relative_to(data_dir))
        lines.append(
            f"{name:<40} {_human(stats.memtable_bytes):>10} {levels:<22} {_human(stats.run_bytes):>12}"
            f" {stats.pending_compactions:>7} {stats.write_amplification:>6.2f} {stats.space_amplification:>6.2f}"
        )
    if not shards:
        lines.append(f"(no LSM shards under {data_dir})")
    else:
        lines.append(
            "memtable: bytes of records in unflushed logs, read from disk; pending: tier merges due"
            f" at fanout {fanout or DEFAULT_TIER_FANOUT}; W-amp, S-amp: write and space amplification"
        )
    return "\n".join(lines)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"  # pragma: no cover
