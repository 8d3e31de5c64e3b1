"""Size-tiered compaction, and the streaming k-way merge it (and full scans) are built on.

Why size-tiered: with random keys every run overlaps every other, so leveled compaction would
rewrite a whole level to push each small run down (write amplification ~ fanout per level);
size-tiered merges ``fanout`` runs of similar size into one run of the next tier, so each entry is
rewritten about once per tier: write amplification ~ 1 (log) + 1 (flush) + log_fanout(N / memtable).
The price is space (up to ``fanout`` runs per tier and a transient copy while merging) and more
runs to probe on a point lookup, which the key filters make cheap.  Both amplifications are
measured by ``bench/bench_lsm.py`` and reported by ``stats()``.

Why fanout 8 and 128 MiB memtables (the defaults): measured with ``bench/bench_lsm.py --rows
20000000 --engines lsm`` (2 shards of 10M rows, 16+200-byte entries, a loaded 2-core machine):

=======  ========  =====  =====  ===========  ======================
fanout   memtable  W-amp  S-amp  sustained/s  runs at the end/shard
=======  ========  =====  =====  ===========  ======================
4        64 MiB    4.38   1.20   261k         4 (tiers 0 and 2)
8        64 MiB    3.12   1.22   321k         11 (tiers 0 and 1)
8        128 MiB   3.26   1.20   359k         3 (tiers 0 and 1)
=======  ========  =====  =====  ===========  ======================

W-amp counts log + flush + compaction bytes (the 128 MiB run includes a final tier-0 merge).  At
50M rows (25M per shard, 128 MiB, fanout 8) W-amp is 3.3 and S-amp 1.2 (``bench_lsm.py --rows
50000000``); with fanout 4 it was 5.5 before this change.
Every compaction pass costs ~0.9-1 us of CPU per entry even vectorised (about half of it kernel
time: copies into the page cache, faults on fresh memory; ``bench/bench_lsm_stages.py``), so one
tier fewer is worth more than anything else here; the price is up to ``fanout - 1`` runs per tier
for lookups and scans to visit (lookups stay cheap behind the key filters; prefix scans slow down
about in proportion), and a memtable's worth of memory (128 MiB of columns, twice while it is
sorted).

Much of that kernel time was the page cache growing into memory the VM's host had taken back
(free pages are reported to the host; touching one again costs a host fault: ~2.5-3 s of kernel
CPU per GB written into fresh page cache against ~0.3 s/GB into recycled pages, measured with
plain ``pwrite``).  A merge wrote its output (as large as its inputs) into fresh pages, then freed
its inputs' pages at the end, too late to be reused warm.  So a merge reads its inputs without a
memory map and drops their pages behind the reader (:func:`~.run.iter_columns`), and the output
is written into them; the log drops its pages once durable (:mod:`.log`).  Measured in
alternating runs on a loaded machine (``bench_lsm.py``'s writer, whole-process CPU per row with key
generation): at 2 x 10M rows 1.23 us against 1.52-1.55 us before in two pairs, 1.30 against 1.26
in a third; at 2 x 25M rows the background threads 0.79-0.93 against 0.92-1.06 us per row.  What
is left is the page cache growing by the data kept cached for reads.  Dropping the *output's*
pages instead saved more CPU (1.21-1.33 against 1.59-1.64 us at 2 x 10M rows) but left fresh runs
uncached: lookups/s fell ~10x.

Tiers keep age order: every run in tier L is newer than every run in tier L+1 (a merge takes *all*
runs of its tier), so "newest first" is "by ``max_seq``, descending" and a merge output keeps its
place.  Tombstones are dropped only when the output lands below every other run: then nothing older
remains for them to shadow.

The merge is chunked so that the per-entry work runs in C: take the smallest "last buffered key"
over all sources as a fence, ``dict.update`` every source's entries up to the fence from oldest to
newest (newest wins), then ``sorted`` the dict.  No Python-level heap operation per entry.
When every input run has keys of one width, :func:`merge_columns` does the same with numpy
columns (:mod:`.columns`): concatenate the fenced slices newest first, one stable sort (a timsort,
which merges the slices' sorted runs instead of sorting afresh), keep the first entry of each key;
no Python object per entry at all.  A compactor thread keeps its buffers from one merge step (and
one merge) to the next (:class:`~.columns.Scratch`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Iterator, Sequence, Set

import numpy as np

from datamesh.storage.ap.lsm.columns import Columns, Scratch, sort_unique
from datamesh.storage.ap.lsm.format import Value
from datamesh.storage.ap.lsm.manifest import RunMeta
from datamesh.storage.ap.lsm.run import Block

_MERGE_BUFFER = 4096  # entries buffered per source between fences


def pick_compaction(
    runs: Sequence[RunMeta],
    fanout: int,
    *,
    min_level: int = 0,
    max_level: int | None = None,
    busy: Set[int] = frozenset(),
) -> tuple[int, list[RunMeta]] | None:
    """The lowest tier in ``[min_level, max_level]`` holding ``fanout`` runs or more and not being
    merged already (``busy``), with its ``fanout`` *oldest* runs, newest first.

    Taking the oldest runs keeps the age order (the runs left in the tier are newer than the
    output, which is newer than the next tier) and bounds every merge to ``fanout`` runs, so a tier
    that fell behind is caught up by several bounded merges rather than one long one (which would
    stretch a writer stall).  Merges of different tiers may run at once for the same reason.
    """
    tiers: dict[int, list[RunMeta]] = defaultdict(list)
    for run in runs:
        tiers[run.level].append(run)
    for level in sorted(tiers):
        if level < min_level or (max_level is not None and level > max_level) or level in busy:
            continue
        if len(tiers[level]) >= fanout:
            oldest = sorted(tiers[level], key=lambda run: run.max_seq)[:fanout]
            return level, oldest[::-1]
    return None


def pending_compactions(runs: Sequence[RunMeta], fanout: int) -> int:
    """How many tier merges are due now (a tier with ``k * fanout`` runs counts ``k``)."""
    tiers: dict[int, int] = defaultdict(int)
    for run in runs:
        tiers[run.level] += 1
    return sum(count // fanout for count in tiers.values())


class _Source:
    __slots__ = ("blocks", "keys", "pos", "values")

    def __init__(self, blocks: Iterator[Block]) -> None:
        self.blocks = blocks
        self.keys: list[bytes] = []
        self.values: list[Value] = []
        self.pos = 0
        self.refill()

    def refill(self) -> None:
        keys: list[bytes] = []
        values: list[Value] = []
        for block_keys, block_values in self.blocks:
            keys.extend(block_keys)
            values.extend(block_values)
            if len(keys) >= _MERGE_BUFFER:
                break
        self.keys, self.values, self.pos = keys, values, 0


def merge_blocks(newest_first: Sequence[Iterator[Block]], *, drop_tombstones: bool) -> Iterator[Block]:
    """Merge sorted block streams into sorted chunks; on equal keys the earliest stream wins."""
    sources = [_Source(blocks) for blocks in newest_first]
    while True:
        active = [source for source in sources if source.pos < len(source.keys)]
        if not active:
            return
        fence = min(source.keys[-1] for source in active)
        merged: dict[bytes, Value] = {}
        for source in reversed(active):  # oldest first: newer entries overwrite older ones
            cut = bisect_right(source.keys, fence, source.pos)
            merged.update(zip(source.keys[source.pos : cut], source.values[source.pos : cut], strict=True))
            source.pos = cut
            if cut == len(source.keys):
                source.refill()
        keys = sorted(merged)
        values = list(map(merged.__getitem__, keys))
        if drop_tombstones and None in values:
            kept = [(key, value) for key, value in zip(keys, values, strict=True) if value is not None]
            keys = [key for key, _ in kept]
            values = [value for _, value in kept]
        if keys:
            yield keys, values


class _ColumnSource:
    __slots__ = ("chunk", "chunks", "last", "pos")

    def __init__(self, chunks: Iterator[Columns]) -> None:
        self.chunks = chunks
        self.chunk: Columns | None = None
        self.last = b""
        self.pos = 0
        self.refill()

    def refill(self) -> None:
        self.chunk, self.pos = None, 0
        for chunk in self.chunks:
            if len(chunk):
                self.chunk, self.last = chunk, chunk.key_at(-1)
                return


def merge_columns(
    newest_first: Sequence[Iterator[Columns]], *, drop_tombstones: bool, scratch: Scratch | None = None
) -> Iterator[Columns]:
    """:func:`merge_blocks` over streams of sorted columns of one key width (the vectorised path).

    The fence is the smallest last key buffered by any source: every source's entries up to it
    are in memory, so they can be merged and emitted; on equal keys the earliest stream wins.
    With ``scratch`` every chunk is built in its buffers, so a chunk is valid only until the next
    one is taken: for a consumer such as :func:`~.run.write_run` that is done with a chunk when it
    asks for the next.
    """
    sources = [_ColumnSource(chunks) for chunks in newest_first]
    while True:
        active = [source for source in sources if source.chunk is not None]
        if not active:
            return
        fence = min(source.last for source in active)
        parts: list[Columns] = []
        for source in active:  # newest first: the stable sort then keeps the newest entry of a key
            chunk = source.chunk
            assert chunk is not None
            cut = int(np.searchsorted(chunk.keys, np.frombuffer(fence, dtype=chunk.keys.dtype), side="right")[0])
            if cut > source.pos:
                parts.append(chunk.slice(source.pos, cut))
            source.pos = cut
            if cut == len(chunk):
                source.refill()
        merged = sort_unique(parts, drop_tombstones=drop_tombstones, scratch=scratch, sorted_parts=True)
        if len(merged):
            yield merged
