"""Two hot-path codecs against the ways they replaced, in the same run.

    python bench/bench_codecs.py [--values 5000] [--repeat 5]

* LSM value gather (``Columns.take`` on values of several widths, as a flush or a compaction does):
  datamesh's one-slice-per-value join against a per-byte index gather (numpy fancy indexing with
  positions built by ``np.repeat``), for AlpacaEval-sized values and for small ones.
* The stash of a ``write_ap`` part (``datamesh.tasks.codec``): the binary frame against JSON with
  base64 (the form still read for rolling deploys), encode and decode, on real AlpacaEval turns.

Best of ``--repeat`` (``time.process_time``), per batch and per value / turn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_ingest import load_rows
from datamesh.pipeline.plan import LOCATION_AP, ItemPlan, SagaPlan
from datamesh.storage.ap.lsm.columns import Columns
from datamesh.tasks.codec import decode_content, decode_part, encode_content, encode_part


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def per_byte_gather(columns: Columns, index: np.ndarray) -> np.ndarray:
    """The baseline: one int64 position per value byte, then one fancy-indexing gather."""
    lens = columns.value_lens[index]
    starts = columns.value_offsets()[:-1][index]
    out_starts = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=out_starts[1:])
    positions = np.repeat(starts - out_starts, lens) + np.arange(int(lens.sum()), dtype=np.int64)
    return columns.values[positions]


def gather(n: int, repeat: int) -> None:
    rows = load_rows()
    rng = np.random.default_rng(1)
    print(f"LSM gather of {n} values, shuffled (ms per batch; µs per value)")
    for label, values in (
        ("AlpacaEval turns", [p + r for p, r in (rows[i % len(rows)] for i in range(n))]),
        ("small (20-100 bytes)", [bytes(int(k)) for k in rng.integers(20, 100, n)]),
    ):
        keys = np.array([i.to_bytes(16, "big") for i in range(n)], dtype="S16")
        lens = np.array([len(v) for v in values], dtype=np.int64)
        columns = Columns(keys, np.zeros(n, dtype=np.bool_), lens, np.frombuffer(b"".join(values), dtype=np.uint8))
        index = rng.permutation(n).astype(np.intp)
        assert np.array_equal(columns.take(index).values, per_byte_gather(columns, index))
        ours = best(lambda c=columns, i=index: c.take(i), repeat)
        base = best(lambda c=columns, i=index: per_byte_gather(c, i), repeat)
        print(
            f"  {label:22} avg {lens.mean():6.0f} B: datamesh {ours * 1e3:7.1f} ms ({ours / n * 1e6:5.2f} µs),"
            f" per-byte index {base * 1e3:7.1f} ms ({base / n * 1e6:5.2f} µs): {base / ours:.1f}x"
        )


def stash(n: int, repeat: int) -> None:
    rows = load_rows()
    hashes = ("p" * 64, 1, LOCATION_AP, "q" * 64, 1, LOCATION_AP)
    items = [
        ItemPlan(i, f"k{i}", "r" * 64, f"c{i}", True, f"t{i}", "e", "eu-west", 0, *hashes, False) for i in range(n)
    ]
    plan = SagaPlan("saga", "tenant", items, [])
    content = {i: (*rows[i % len(rows)], None) for i in range(n)}

    def legacy_encode() -> bytes:
        return json.dumps({"plan": plan.to_json(), "content": encode_content(plan, content)}).encode()

    def legacy_decode(raw: bytes) -> Any:
        wire = json.loads(raw)
        return SagaPlan.from_json(wire["plan"]), decode_content(wire["content"])

    binary, legacy = encode_part(plan, content), legacy_encode()
    assert decode_part(binary) == legacy_decode(legacy)
    print(f"stash of a write_ap part of {n} AlpacaEval turns (µs per turn; bytes per turn)")
    for label, enc, dec, size in (
        ("binary frame", lambda: encode_part(plan, content), lambda: decode_part(binary), len(binary)),
        ("JSON + base64", legacy_encode, lambda: legacy_decode(legacy), len(legacy)),
    ):
        e, d = best(enc, repeat), best(dec, repeat)
        print(f"  {label:14} encode {e / n * 1e6:6.2f}  decode {d / n * 1e6:6.2f}  size {size / n:7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    gather(args.values, args.repeat)
    stash(args.values, args.repeat)


if __name__ == "__main__":
    main()
