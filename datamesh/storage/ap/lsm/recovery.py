"""Recovery on start: make the directory match its manifest, then replay the logs it still needs.

Order matters and every step is idempotent, so a crash during recovery is recovered from too:

1. delete files the manifest does not name (runs of an interrupted flush or compaction, a
   half-written ``MANIFEST.tmp``) and logs older than ``min_log`` (already flushed);
2. replay the remaining logs in order; a torn tail is cut (see :func:`~datamesh.storage.ap.lsm.log.replay`);
3. flush what was replayed into a tier-0 run, then point ``min_log`` at a fresh log in a new
   manifest, and only then delete the replayed logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datamesh.storage.ap.lsm.columns import Scratch
from datamesh.storage.ap.lsm.format import decode_entries
from datamesh.storage.ap.lsm.log import replay
from datamesh.storage.ap.lsm.manifest import MANIFEST_NAME, Manifest, load_manifest, run_meta, save_manifest
from datamesh.storage.ap.lsm.memtable import Memtable
from datamesh.storage.ap.lsm.run import write_run
from datamesh.storage.ap.lsm.stats import LOG_SUFFIX, RUN_SUFFIX


@dataclass(slots=True)
class RecoveryState:
    """The manifest after recovery, the number of the fresh log to write, and what was done."""

    manifest: Manifest
    log_number: int
    report: dict[str, int | str] = field(default_factory=dict)


def file_path(directory: Path, name: str) -> Path:
    return directory / name


def _number(path: Path) -> int | None:
    stem = path.name.split(".", 1)[0]
    return int(stem) if stem.isdigit() else None


def remove_obsolete_logs(directory: Path, min_log: int) -> None:
    for log in directory.glob(f"*{LOG_SUFFIX}"):
        number = _number(log)
        if number is not None and number < min_log:
            log.unlink(missing_ok=True)


def recover(directory: Path, *, block_entries: int | None) -> RecoveryState:
    manifest = load_manifest(directory) or Manifest()
    live = {run.name for run in manifest.runs}
    report: dict[str, int | str] = {"orphans_removed": 0, "logs_replayed": 0, "batches_replayed": 0}
    highest = 0
    for path in directory.iterdir():
        number = _number(path)
        if number is not None:
            highest = max(highest, number)
        if path.name == f"{MANIFEST_NAME}.tmp" or (
            RUN_SUFFIX in path.name and path.name.split("-", 1)[0] not in live and path.name not in live
        ):
            path.unlink(missing_ok=True)
            report["orphans_removed"] = int(report["orphans_removed"]) + 1
    manifest.next_file = max(manifest.next_file, highest + 1)
    remove_obsolete_logs(directory, manifest.min_log)

    memtable = Memtable(0)
    truncated = 0
    reasons: list[str] = []
    logs = sorted((n, p) for p in directory.glob(f"*{LOG_SUFFIX}") if (n := _number(p)) is not None)
    for _, log in logs:
        result = replay(log)
        for sequence, payload in result.records:
            keys, values = decode_entries(payload)
            memtable.apply_payload(payload, keys, values, sequence)
            manifest.counters.user_bytes += len(payload)
            report["batches_replayed"] = int(report["batches_replayed"]) + 1
        report["logs_replayed"] = int(report["logs_replayed"]) + 1
        if result.truncated_bytes:
            truncated += result.truncated_bytes
            reasons.append(f"{log.name}: {result.reason}")
    report["torn_bytes_cut"] = truncated
    report["torn_tails"] = "; ".join(reasons)

    if len(memtable):
        number = manifest.next_file
        manifest.next_file += 1
        path = directory / f"{number:08d}{RUN_SUFFIX}"
        summary = write_run(path, memtable.flush_chunks(scratch=Scratch()), block_entries=block_entries)
        assert summary is not None  # the memtable is not empty
        manifest.runs.append(run_meta(path.name, 0, memtable.max_seq, summary))
        manifest.counters.flush_bytes += summary.file_bytes
        manifest.counters.flushes += 1
        manifest.last_seq = max(manifest.last_seq, memtable.max_seq)
    log_number = manifest.next_file
    manifest.next_file += 1
    manifest.min_log = log_number
    save_manifest(directory, manifest)
    remove_obsolete_logs(directory, log_number)
    return RecoveryState(manifest=manifest, log_number=log_number, report=report)
