"""The vectorised path (numpy columns) against the reference list path, on random data."""

from __future__ import annotations

import itertools
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash

from datamesh.storage.ap.lsm.columns import Columns, Scratch, decode_blocks, encode_blocks, from_lists, stable_key_order
from datamesh.storage.ap.lsm.compaction import merge_blocks, merge_columns
from datamesh.storage.ap.lsm.filter import fingerprint, fingerprints, list_fingerprints
from datamesh.storage.ap.lsm.format import (
    FormatError,
    Value,
    block_checksum,
    decode_entries,
    encode_entries,
    entry_parts,
)
from datamesh.storage.ap.lsm.memtable import MISSING, Memtable
from datamesh.storage.ap.lsm.run import Run, RunWriter, iter_blocks, iter_columns, verify_run, write_run

Block = tuple[list[bytes], list[Value]]


def _sorted_source(
    rng: random.Random, pool: list[bytes], size: int, *, uniform: bool, tombstones: bool = True
) -> Block:
    keys = sorted(rng.sample(pool, min(size, len(pool))))
    values: list[Value] = []
    for _ in keys:
        roll = rng.random()
        if tombstones and roll < 0.2:
            values.append(None)
        elif uniform:
            values.append(rng.randbytes(12))
        else:
            values.append(rng.randbytes(rng.choice([0, 1, 5, 40])))
    return keys, values


def _chunks(block: Block, rng: random.Random) -> list[Block]:
    keys, values = block
    out, start = [], 0
    while start < len(keys):
        stop = start + rng.randint(1, 300)
        out.append((keys[start:stop], values[start:stop]))
        start = stop
    return out


def _as_columns(chunks: list[Block]) -> Iterator[Columns]:
    for keys, values in chunks:
        columns = from_lists(keys, values)
        assert columns is not None
        yield columns


def _flat(blocks: Iterator[Block]) -> list[tuple[bytes, Value]]:
    return [pair for keys, values in blocks for pair in zip(keys, values, strict=True)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("drop_tombstones", [False, True])
@pytest.mark.parametrize("tombstones", [True, False])
@pytest.mark.parametrize("reuse_buffers", [False, True])
def test_the_vectorised_merge_equals_the_reference_merge(
    seed: int, drop_tombstones: bool, tombstones: bool, reuse_buffers: bool
) -> None:
    # Given sources drawn from a small key pool (so keys repeat across them), with or without
    # tombstones (without, values of one width take the gather-per-source path), values of one
    # width or of many, cut into chunks of random sizes
    rng = random.Random(seed)
    width = rng.choice([1, 3, 8, 16, 21])
    pool = sorted({rng.randbytes(width) for _ in range(3000)} | {b"\x00" * width, b"\xff" * width})
    sources = [
        _sorted_source(rng, pool, rng.randint(1, 1500), uniform=seed % 2 == 0, tombstones=tombstones)
        for _ in range(rng.randint(1, 5))
    ]
    chunked = [_chunks(source, rng) for source in sources]
    # When both merges run, newest source first
    reference = _flat(merge_blocks([iter(chunks) for chunks in chunked], drop_tombstones=drop_tombstones))
    vectorised = [
        pair
        for columns in merge_columns(
            [_as_columns(chunks) for chunks in chunked],
            drop_tombstones=drop_tombstones,
            scratch=Scratch() if reuse_buffers else None,
        )
        for pair in zip(*columns.to_lists(), strict=True)  # each chunk read before the next is built
    ]
    # Then they agree entry for entry: newest value per key, tombstones kept or dropped alike
    assert vectorised == reference


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("tombstones", [True, False])
def test_blocks_encode_byte_for_byte_like_the_list_codec_and_decode_back(uniform: bool, tombstones: bool) -> None:
    # (values of one width and no tombstone: whole blocks are laid out as rows of one matrix)
    rng = random.Random(7)
    pool = [rng.randbytes(16) for _ in range(2000)]
    keys, values = _sorted_source(rng, pool, 1000, uniform=uniform, tombstones=tombstones)
    columns = from_lists(keys, values)
    assert columns is not None
    rows = encode_blocks(columns, 64)
    expected = [encode_entries(keys[i : i + 64], values[i : i + 64]) for i in range(0, 1000, 64)]
    assert [bytes(row[4]) for row in rows] == expected
    assert [(row[0], row[1], row[2]) for row in rows] == [
        (keys[i], keys[min(i + 64, 1000) - 1], min(64, 1000 - i)) for i in range(0, 1000, 64)
    ]
    assert decode_blocks([row[4] for row in rows], 16).to_lists() == (keys, values)
    assert decode_entries(bytes(rows[3][4])) == (keys[192:256], values[192:256])


def test_blocks_alike_but_for_keys_and_values_decode_like_any_blocks() -> None:
    # Given whole blocks of 16-byte keys and 12-byte values (the uniform fast path)
    rng = random.Random(8)
    keys = sorted(rng.sample([rng.randbytes(16) for _ in range(3000)], 640))
    values: list[Value] = [rng.randbytes(12) for _ in keys]
    blocks = [encode_entries(keys[i : i + 64], values[i : i + 64]) for i in range(0, 640, 64)]
    assert decode_blocks(blocks, 16).to_lists() == (keys, values)
    # And the same with one block whose values differ in width (same size) or with a tombstone
    uneven = list(values)
    uneven[70], uneven[71] = b"x" * 11, b"y" * 13
    deleted: list[Value] = list(values)
    deleted[200] = None
    for changed in (uneven, deleted):
        mixed = [encode_entries(keys[i : i + 64], changed[i : i + 64]) for i in range(0, 640, 64)]
        assert decode_blocks(mixed, 16).to_lists() == (keys, changed)
    # And a block of the same size whose key lengths are wrong is refused
    bad = bytearray(blocks[2])
    bad[4 + 64 : 4 + 64 + 8] = (15).to_bytes(4, "little") + (17).to_bytes(4, "little")
    with pytest.raises(FormatError):
        decode_blocks([*blocks[:2], bytes(bad), *blocks[3:]], 16)


def test_decoding_refuses_a_block_of_another_key_width_or_a_bad_size() -> None:
    data = encode_entries([b"a" * 16, b"b" * 17], [b"1", b"2"])
    with pytest.raises(FormatError):
        decode_blocks([data], 16)
    good = encode_entries([b"a" * 16, b"b" * 16], [b"1", b"2"])
    with pytest.raises(FormatError):
        decode_blocks([good + b"x"], 16)


def test_keys_of_several_widths_take_the_list_path() -> None:
    assert from_lists([b"a", b"bb"], [b"1", b"2"]) is None
    memtable = Memtable(0)
    memtable.apply([b"b", b"aa", b"c"], [b"1", None, b"3"], 1, 0)
    assert [pair for keys, values in memtable.flush_chunks() for pair in zip(keys, values, strict=True)] == [  # type: ignore[arg-type]
        (b"aa", None),
        (b"b", b"1"),
        (b"c", b"3"),
    ]


def test_a_memtable_flushes_sorted_columns_when_keys_share_a_width() -> None:
    rng = random.Random(3)
    memtable = Memtable(0)
    keys = [rng.randbytes(16) for _ in range(5000)]
    values: list[Value] = [None if i % 7 == 0 else rng.randbytes(30) for i in range(5000)]
    memtable.apply(keys, values, 1, 0)
    chunks = list(memtable.flush_chunks(size=1000))
    assert all(isinstance(chunk, Columns) for chunk in chunks)
    flat = [pair for chunk in chunks if isinstance(chunk, Columns) for pair in zip(*chunk.to_lists(), strict=True)]
    assert flat == sorted(zip(keys, values, strict=True))


def test_fingerprints_of_an_array_equal_the_one_key_fingerprint() -> None:
    rng = random.Random(5)
    for width in (1, 7, 8, 9, 16, 24, 33):
        keys = [rng.randbytes(width) for _ in range(500)] + [b"\x00" * width]
        found = fingerprints(np.frombuffer(b"".join(keys), dtype=f"S{width}"))
        assert found.tolist() == [fingerprint(key) for key in keys]
    mixed = [b"", b"a", b"abcdefghi"]
    assert list(list_fingerprints(mixed)) == [fingerprint(key) for key in mixed]


@pytest.mark.parametrize("tombstones", [True, False])
def test_a_run_written_from_columns_reads_back_and_verifies(tmp_path: Path, tombstones: bool) -> None:
    # Given sorted entries handed to a run writer in chunks of every size around a block's
    rng = random.Random(11)
    pool = [rng.randbytes(16) for _ in range(9000)]
    keys, values = _sorted_source(rng, pool, 5000, uniform=True, tombstones=tombstones)
    columns = from_lists(keys, values)
    assert columns is not None
    writer = RunWriter(tmp_path / "1.sqlite3", block_entries=64)
    cuts = [0, 1000, 1001, 1004, 1067, 1131, 1195, 1196, 1260, 2000, 5000]
    for start, stop in itertools.pairwise(cuts):
        writer.add_columns(columns.slice(start, stop))
    writer.finish()
    # Then it reads back entry for entry and verifies
    run = Run(tmp_path / "1.sqlite3")
    assert run.key_width == 16
    assert all(run.get(key) == value for key, value in zip(keys[::97], values[::97], strict=True))
    # and a batch lookup (every key, keys not in the run, repeats, any order) answers as get does.
    asked = keys + [k for k in pool if k not in set(keys)][:500] + keys[:50]
    rng.shuffle(asked)
    assert run.get_many(asked) == [run.get(key) for key in asked]
    assert [k for k, _ in run.range_items(keys[100], keys[900])] == keys[100:900]
    back = [pair for chunk in iter_columns(tmp_path / "1.sqlite3", 16) for pair in zip(*chunk.to_lists(), strict=True)]
    assert back == list(zip(keys, values, strict=True))
    assert verify_run(tmp_path / "1.sqlite3") == []
    run.release()


@pytest.mark.parametrize("version", [1, 2])
def test_a_run_of_an_older_format_is_refused_with_both_versions_named(tmp_path: Path, version: int) -> None:
    writer = RunWriter(tmp_path / "1.sqlite3", block_entries=4)
    writer.add([b"a", b"b"], [b"1", b"2"])
    writer.finish()
    db = sqlite3.connect(tmp_path / "1.sqlite3")
    db.execute("UPDATE meta SET value = ? WHERE name = 'format'", (version,))
    db.commit()
    db.close()
    expected = f"run format {version}, this datamesh reads run format 3"
    with pytest.raises(FormatError, match=expected):
        Run(tmp_path / "1.sqlite3")
    with pytest.raises(FormatError, match=expected):
        list(iter_columns(tmp_path / "1.sqlite3", 1))
    with pytest.raises(FormatError, match=expected):
        list(iter_blocks(tmp_path / "1.sqlite3"))
    assert any(expected in problem for problem in verify_run(tmp_path / "1.sqlite3"))


def test_block_checksums_are_xxh3_as_signed_64_bit_integers(tmp_path: Path) -> None:
    # Given a run whose blocks were written from lists and from columns
    rng = random.Random(2)
    keys = sorted(rng.randbytes(16) for _ in range(300))
    values: list[Value] = [key * 3 for key in keys]
    writer = RunWriter(tmp_path / "1.sqlite3", block_entries=64)
    writer.add(keys[:100], values[:100])
    columns = from_lists(keys[100:], values[100:])
    assert columns is not None
    writer.add_columns(columns)
    writer.finish()
    # Then each stored checksum is the block's xxh3_64, its 64 bits read as a signed integer
    db = sqlite3.connect(tmp_path / "1.sqlite3")
    rows = db.execute("SELECT checksum, data FROM blocks ORDER BY id").fetchall()
    db.close()
    assert len(rows) == 5
    for checksum, data in rows:
        assert -(2**63) <= checksum < 2**63
        assert checksum % 2**64 == xxhash.xxh3_64_intdigest(data)
        assert checksum == block_checksum(data)
    high = next(data for n in range(100) if xxhash.xxh3_64_intdigest(data := b"%d" % n) >= 2**63)
    assert block_checksum(high) == xxhash.xxh3_64_intdigest(high) - 2**64 < 0  # the top bit set: negative
    assert block_checksum(b"") == xxhash.xxh3_64_intdigest(b"")  # top bit clear: unchanged


@pytest.mark.parametrize("reader", ["get", "range_items", "iter_columns", "iter_blocks", "verify_run"])
def test_a_corrupted_block_is_detected_on_read(tmp_path: Path, reader: str) -> None:
    # Given a run one of whose blocks had a byte of a value flipped on disk
    rng = random.Random(4)
    keys = sorted(rng.randbytes(16) for _ in range(256))
    values: list[Value] = [key * 4 for key in keys]
    path = tmp_path / "1.sqlite3"
    writer = RunWriter(path, block_entries=64)
    columns = from_lists(keys, values)
    assert columns is not None
    writer.add_columns(columns)
    writer.finish()
    db = sqlite3.connect(path)
    (data,) = db.execute("SELECT data FROM blocks WHERE id = 1").fetchone()
    damaged = bytearray(data)
    damaged[-5] ^= 0x01
    db.execute("UPDATE blocks SET data = ? WHERE id = 1", (bytes(damaged),))
    db.commit()
    db.close()
    # Then reading that block raises FormatError (verify_run reports it)
    if reader == "verify_run":
        assert any("checksum mismatch" in problem for problem in verify_run(path))
        return
    with pytest.raises(FormatError, match="checksum mismatch"):
        if reader == "get":
            run = Run(path)
            assert run.get(keys[0]) == values[0]  # another block reads fine
            try:
                run.get(keys[64])
            finally:
                run.release()
        elif reader == "range_items":
            run = Run(path)
            try:
                run.range_items(keys[0], None)
            finally:
                run.release()
        elif reader == "iter_columns":
            list(iter_columns(path, 16))
        else:
            list(iter_blocks(path))


@pytest.mark.parametrize("seed", range(4))
def test_the_columns_memtable_answers_like_a_dict_through_writes_reads_and_a_width_change(seed: int) -> None:
    # Given a memtable and a dict fed the same batches (overwrites within and across batches,
    # tombstones), read between writes
    rng = random.Random(seed)
    memtable = Memtable(0)
    reference: dict[bytes, Value] = {}
    pool = [rng.randbytes(8) for _ in range(400)] + [b"\x00" * 8, b"\xff" * 8]
    for round_ in range(30):
        keys = rng.choices(pool, k=rng.randint(1, 60))  # repeats inside a batch too: its last write wins
        if seed % 2 and round_ == 20:  # a key of another width turns the memtable into a dict
            keys = [b"short"]
        values: list[Value] = [None if rng.random() < 0.2 else rng.randbytes(rng.randint(0, 9)) for _ in keys]
        memtable.apply_payload(encode_entries(keys, values), keys, values, round_ + 1)
        reference.update(zip(keys, values, strict=True))
        # Then point reads, range reads (bounds of every width) and the flush order agree with the dict
        asked = [*rng.sample(pool, 50), b"short", b"", b"x" * 20]
        assert memtable.get_many(asked) == [reference.get(key, MISSING) for key in asked]
        low, high = sorted([rng.randbytes(rng.randint(0, 12)), rng.randbytes(rng.randint(0, 12))])
        expected = sorted((k, v) for k, v in reference.items() if low <= k < high)
        assert memtable.range_items(low, high) == expected
        assert memtable.range_items(low, None) == sorted((k, v) for k, v in reference.items() if low <= k)
    flushed = [pair for keys, values in memtable.sorted_chunks(size=7) for pair in zip(keys, values, strict=True)]
    assert flushed == sorted(reference.items())


@pytest.mark.parametrize("width", [1, 4, 8, 9, 16, 20])
def test_the_prefix_sort_orders_like_a_stable_sort_of_whole_keys(width: int) -> None:
    # Given keys with repeats, extreme keys and (for wide keys) long shared 8-byte prefixes
    rng = random.Random(width)
    keys = [rng.randbytes(width) for _ in range(3000)]
    keys += keys[:1500] + [b"\x00" * width] * 5 + [b"\xff" * width] * 3
    if width > 8:
        keys += [b"abcdefgh" + rng.randbytes(width - 8) for _ in range(50)]
    array = np.frombuffer(b"".join(keys), dtype=f"S{width}")
    # Then the order is the stable one: by key, equal keys in their given order
    assert stable_key_order(array).tolist() == np.argsort(array, kind="stable").tolist()


@pytest.mark.parametrize("width", [1, 8, 16, 20])
def test_the_prefix_sort_of_sorted_runs_orders_like_a_stable_sort_of_whole_keys(width: int) -> None:
    # Given a merge's input: a few sorted runs one after the other, sharing keys (a key in several
    # runs), extreme keys, and (for wide keys) long shared 8-byte prefixes
    rng = random.Random(width)
    pool = [rng.randbytes(width) for _ in range(2000)] + [b"\x00" * width, b"\xff" * width]
    if width > 8:
        pool += [b"abcdefgh" + rng.randbytes(width - 8) for _ in range(50)]
    runs = [sorted(rng.sample(pool, rng.randint(1, 800))) for _ in range(8)]
    array = np.frombuffer(b"".join(key for run in runs for key in run), dtype=f"S{width}")
    # When it is sorted as runs
    order = stable_key_order(array, sorted_runs=True)
    # Then the order is the stable one: by key, equal keys in their run order (newest run first)
    assert order.tolist() == np.argsort(array, kind="stable").tolist()


def test_a_key_written_twice_in_one_batch_keeps_its_later_value_through_flush_and_merge(tmp_path: Path) -> None:
    from datamesh.storage.ap.lsm import LsmShard

    shard = LsmShard(tmp_path / "s", tier_fanout=2, background=False)
    key, other = b"k" * 16, b"o" * 16
    shard.put_many([(key, b"first"), (other, b"x"), (key, b"second")])
    assert shard.get_many([key]) == {key: b"second"}
    shard.flush()
    shard.put_many([(other, b"y"), (key, b"third"), (key, b"fourth")])
    shard.flush()
    shard.wait_for_compactions()
    assert shard.get_many([key, other]) == {key: b"fourth", other: b"y"}
    assert list(shard.scan_prefix(b"k")) == [(key, b"fourth")]
    shard.close()


@pytest.mark.parametrize("seed", range(3))
def test_a_memtable_fed_parts_flushes_like_a_dict_when_values_share_a_width(seed: int) -> None:
    # Given batches given as parts (the put_many path), values all 12 bytes, no tombstone, keys
    # repeated inside a batch and across batches
    rng = random.Random(seed)
    memtable = Memtable(0)
    reference: dict[bytes, Value] = {}
    pool = [rng.randbytes(16) for _ in range(300)]
    for round_ in range(40):
        keys = rng.choices(pool, k=rng.randint(1, 80))
        values: list[Value] = [rng.randbytes(12) for _ in keys]
        memtable.apply_parts(entry_parts(keys, values), keys, values, round_ + 1)
        reference.update(zip(keys, values, strict=True))
    # When it is flushed
    flushed = [pair for keys, values in memtable.sorted_chunks(size=11) for pair in zip(keys, values, strict=True)]
    # Then every key has its last value, in key order
    assert flushed == sorted(reference.items())


@pytest.mark.parametrize("block_entries", [7, 72])
def test_runs_written_from_reused_buffers_hold_every_entry(tmp_path: Path, block_entries: int) -> None:
    # Given memtables whose flush chunks (and a merge whose chunks) are built in reused buffers,
    # in chunks that do not end on a block boundary (the writer keeps a partial block meanwhile)
    rng = random.Random(11)
    memtables: list[Memtable] = []
    each: list[dict[bytes, Value]] = []
    for number in range(3):
        memtable = Memtable(number)
        keys = [rng.randbytes(16) for _ in range(3000)]
        values: list[Value] = [rng.randbytes(24) for _ in keys]
        memtable.apply(keys, values, number + 1, 0)
        memtables.append(memtable)
        each.append(dict(zip(keys, values, strict=True)))
    paths = []
    scratch = Scratch()  # one for every flush and the merge, as a shard's threads keep theirs
    for number, memtable in enumerate(memtables):
        path = tmp_path / f"{number}.sqlite3"
        write_run(path, memtable.flush_chunks(size=1000, scratch=scratch), block_entries=block_entries, scratch=scratch)
        paths.append(path)
    # When the runs are merged, newest first, the same way
    merged = tmp_path / "merged.sqlite3"
    streams = [iter_columns(path, 16, entries_per_chunk=500) for path in reversed(paths)]
    chunks = merge_columns(streams, drop_tombstones=True, scratch=scratch)
    write_run(merged, chunks, block_entries=block_entries, scratch=scratch)
    # Then every run, and the merge, reads back whole and in order: no chunk was overwritten while kept
    for number, path in enumerate(paths):
        assert verify_run(path) == []
        assert _flat(iter_blocks(path)) == sorted(each[number].items())
    newest_wins = {key: value for entries in each for key, value in entries.items()}
    assert verify_run(merged) == []
    assert _flat(iter_blocks(merged)) == sorted(newest_wins.items())


@pytest.mark.parametrize("with_scratch", [False, True])
def test_taking_entries_of_mixed_value_widths_gathers_each_value_whole(with_scratch: bool) -> None:
    # Values of many widths (text-sized, tiny, empty, tombstones), taken in a shuffled order with
    # repeats, come out exactly as taking them one by one from the lists would give.
    rng = random.Random(7)
    keys = [i.to_bytes(16, "big") for i in range(300)]
    values: list[bytes | None] = [rng.randbytes(rng.choice([0, 3, 60, 2500, 9000])) for _ in keys]
    for i in range(0, len(values), 17):
        values[i] = None
    columns = from_lists(keys, values)
    assert columns is not None
    order = [rng.randrange(len(keys)) for _ in range(500)]
    taken = columns.take(np.array(order, dtype=np.intp), Scratch() if with_scratch else None)
    got_keys, got_values = taken.to_lists()
    assert got_keys == [keys[i] for i in order]
    assert got_values == [values[i] for i in order]
    taken.values[:1] = 0  # a buffer of its own, writable like any gathered array
    assert columns.to_lists()[1] == values
