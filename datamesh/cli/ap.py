"""``python -m datamesh ap stats``: the AP shards' LSM state (memtable, runs per tier, amplification)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from datamesh.core.config import DataMeshConfig
from datamesh.storage.ap.lsm import format_stats


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "ap",
        help="AP tier operations: stats of the LSM shards",
        description=(
            "stats: per LSM shard, read from its files (safe beside running writers): memtable (bytes of"
            " records in the unflushed logs, as a writer in another process cannot be asked), runs per"
            " level, run bytes, pending tier merges, write and space amplification"
        ),
    )
    parser.add_argument("action", choices=["stats"])
    parser.add_argument("--dir", type=Path, default=None, help="AP folder (default: DATAMESH_AP_DIR)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, config: DataMeshConfig) -> int:
    root = args.dir or Path(config.resolved_ap_dir)
    if not root.exists():
        print(f"error: no AP folder at {root}")
        return 2
    print(format_stats(root))
    return 0
