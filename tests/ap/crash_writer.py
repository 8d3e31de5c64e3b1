"""Child process of the crash test: writes numbered batches forever, printing each acknowledged one.

Run as ``python crash_writer.py <shard_dir> <first_batch> [<fsync policy>]``; the parent SIGKILLs
it at a random moment.  It prints ``start <b>`` just before ``put_many`` of batch ``b`` and ``<b>``
once that call returned (the batch is acknowledged), so a kill that lands with ``start <b>`` as the
last line hit the child while it was writing ``b``.  Batch ``b`` holds ``BATCH_ROWS`` keys that
embed ``b`` (see :func:`batch_items`), so the parent can tell from the keys alone which batches are
whole, partial or absent.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

BATCH_ROWS = 200
SHARD_OPTIONS = {"memtable_bytes": 96 * 1024, "tier_fanout": 3, "block_entries": 32, "flush_interval_s": 0.2}


def batch_items(batch: int) -> list[tuple[bytes, bytes]]:
    """Keys ``hash(b, j)[:4] | b | j`` (spread over the key space, batch readable at [4:8])."""
    items = []
    for row in range(BATCH_ROWS):
        tail = struct.pack(">II", batch, row)
        key = hashlib.blake2b(tail, digest_size=4).digest() + tail
        items.append((key, key * 8))
    return items


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from datamesh.storage.ap.lsm import DEFAULT_FSYNC, FsyncPolicy, LsmShard

    policy = FsyncPolicy(sys.argv[3]) if len(sys.argv) > 3 else DEFAULT_FSYNC
    shard = LsmShard(Path(sys.argv[1]), fsync=policy, **SHARD_OPTIONS)  # type: ignore[arg-type]
    batch = int(sys.argv[2])
    print("ready", flush=True)
    while True:
        print(f"start {batch}", flush=True)
        shard.put_many(batch_items(batch))
        print(batch, flush=True)
        batch += 1


if __name__ == "__main__":
    main()
