"""The manifest: which runs are live, which log is the oldest still needed, and the counters.

It is the one mutable file of a shard and is replaced atomically (write a temporary file, fsync,
rename, fsync the directory), so a crash leaves the old or the new manifest, never a mix.  A run
file exists before the manifest names it and is deleted only after the manifest stops naming it;
files the manifest does not name are leftovers of an interrupted flush or compaction and are removed
on recovery.  Readers in other processes poll the manifest's ``generation`` to see new runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datamesh.core.durable import replace_durably
from datamesh.storage.ap.lsm.run import RunSummary

MANIFEST_NAME = "MANIFEST"


@dataclass(slots=True)
class RunMeta:
    """One live run: its file, tier, newest sequence, and size (kept here so stats need no open)."""

    name: str
    level: int
    max_seq: int
    entries: int
    tombstones: int
    payload_bytes: int
    file_bytes: int


def run_meta(name: str, level: int, max_seq: int, summary: RunSummary) -> RunMeta:
    return RunMeta(
        name=name,
        level=level,
        max_seq=max_seq,
        entries=summary.entries,
        tombstones=summary.tombstones,
        payload_bytes=summary.payload_bytes,
        file_bytes=summary.file_bytes,
    )


@dataclass(slots=True)
class Counters:
    """Byte counts behind write amplification (bytes written to disk / bytes the user wrote)."""

    user_bytes: int = 0
    log_bytes: int = 0
    flush_bytes: int = 0
    compaction_bytes_read: int = 0
    compaction_bytes_written: int = 0
    flushes: int = 0
    compactions: int = 0


@dataclass(slots=True)
class Manifest:
    """The durable state of a shard besides its log and run files."""

    generation: int = 0
    next_file: int = 1
    min_log: int = 0
    last_seq: int = 0
    runs: list[RunMeta] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        return cls(
            generation=int(raw["generation"]),
            next_file=int(raw["next_file"]),
            min_log=int(raw["min_log"]),
            last_seq=int(raw["last_seq"]),
            runs=[RunMeta(**run) for run in raw["runs"]],
            counters=Counters(**raw["counters"]),
        )


def load_manifest(directory: Path) -> Manifest | None:
    try:
        return Manifest.from_json((directory / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return None


def save_manifest(directory: Path, manifest: Manifest) -> None:
    """Atomically replace the manifest (bumping its generation)."""
    manifest.generation += 1
    target = directory / MANIFEST_NAME
    replace_durably(target, manifest.to_json().encode(), temporary=directory / f"{MANIFEST_NAME}.tmp")
