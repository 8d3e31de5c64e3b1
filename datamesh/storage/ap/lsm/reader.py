"""How a reader in another process follows a shard it does not own.

The writer replaces ``MANIFEST`` atomically (a new inode each time), so a reader notices a new
generation by ``stat`` alone and then opens the runs the new manifest names, keeping handles it
already has.  A run named by the manifest it read may be deleted by a compaction before the reader
opens it (the writer moved on); the reader then reads the manifest again.  Readers never delete
files: only the writer does, after its own readers let go.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from datamesh.storage.ap.base import ShardError
from datamesh.storage.ap.lsm.format import FormatError
from datamesh.storage.ap.lsm.manifest import MANIFEST_NAME, Manifest, RunMeta, load_manifest
from datamesh.storage.ap.lsm.run import Run

Stamp = tuple[int, int]
_ATTEMPTS = 10


def reload_runs(
    directory: Path, current: dict[str, Run], seen: Stamp
) -> tuple[Manifest, list[tuple[RunMeta, Run]], Stamp] | None:
    """The manifest and its runs if the manifest changed since ``seen``, else None.

    Runs found in ``current`` are reused; the caller releases those the new manifest dropped.
    """
    for _attempt in range(_ATTEMPTS):
        try:
            stat = (directory / MANIFEST_NAME).stat()
        except FileNotFoundError:
            return None
        stamp = (stat.st_mtime_ns, stat.st_ino)
        if stamp == seen:
            return None
        manifest = load_manifest(directory)
        if manifest is None:
            return None
        opened: list[tuple[RunMeta, Run]] = []
        try:
            for meta in manifest.runs:
                opened.append((meta, current.get(meta.name) or Run(directory / meta.name)))
        except (OSError, sqlite3.Error, FormatError):  # a run was compacted away meanwhile: retry
            for meta, run in opened:
                if meta.name not in current:
                    run.release()
            time.sleep(0.01)
            continue
        return manifest, opened, stamp
    raise ShardError(f"shard {directory}: manifest kept changing while opening runs", retryable=True)
