"""Object store throughput next to raw writes of the same data, in the same run.

    python bench/bench_objects.py [--small-count 500] [--large-count 3] [--rounds 5]
                                  [--endpoint http://...] [--dir ./bench-data]
                                  [--backends fs,s3] [--sizes small,large]

Without ``--endpoint`` it starts ``moto_server`` on a loopback port.  For each backend and blob size
it times datamesh ``put`` and ``get`` (hash-verified) against the raw path (``open/write/fsync`` and
``open/read`` for the filesystem, ``put_object`` / ``get_object().read()`` on a default boto3 client
for S3) and prints objects/s, MB/s and the ratio.  Every round
writes fresh stores, so datamesh puts are real writes, never dedup hits.  The raw and datamesh
operations are interleaved blob by blob, so load from other work on the machine weighs on both alike.

Two more comparisons are printed under the rows they belong to.  For filesystem puts: datamesh
with ``folder_fsync="always"`` against a raw write that also fsyncs its folder, the durability POSIX
promises everywhere (by default datamesh, like the plain raw write, counts on ext4, XFS and btrfs
committing a new name with its file's fsync, and fsyncs the folder on other filesystems).  For large
S3 blobs: boto3's managed
transfer (``upload_fileobj`` / ``download_fileobj`` with its default ``TransferConfig``: 8 MiB
parts, 10 threads).  The ratio
column is always against the plain raw path.  Every operation counts each blob's fastest time
over the rounds (raw and datamesh alike): on two shared cores a round's total swings by 10-20%
with what else ran during it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datamesh.core.filesystems import filesystem_type, name_committed_with_file
from datamesh.core.types import ContentHash
from datamesh.storage.objects.config import S3Settings
from datamesh.storage.objects.filesystem import FilesystemObjectStore
from datamesh.storage.objects.s3 import S3ObjectStore, make_client

KiB, MiB = 1024, 1024 * 1024
CREDENTIALS = {"access_key_id": "bench", "secret_access_key": "bench"}


@dataclass
class Rate:
    count: int
    nbytes: int
    seconds: float
    per_blob: list[float]

    @property
    def ops(self) -> float:
        return self.count / self.seconds

    @property
    def mbs(self) -> float:
        return self.nbytes / self.seconds / 1e6


def timed(blobs: list[bytes], fns: dict[str, Callable[[int, bytes], object]]) -> dict[str, Rate]:
    """Time each of ``fns`` over every blob, interleaved blob by blob.

    Interleaving puts the raw path and datamesh's through the same moments, so load from other work
    on the machine (it may share its cores and disk) weighs on both alike instead of on whichever
    happened to run while it lasted.
    """
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for i, blob in enumerate(blobs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(i, blob)
            seconds[name].append(time.perf_counter() - start)
    nbytes = sum(map(len, blobs))
    return {name: Rate(len(blobs), nbytes, sum(spent), spent) for name, spent in seconds.items()}


def best(rates: list[Rate]) -> Rate:
    """Each blob's fastest time over the rounds, summed: a moment of load from elsewhere (moto's
    garbage collector, another process) then costs one blob one round, not the whole round."""
    fastest = [min(times) for times in zip(*(r.per_blob for r in rates), strict=True)]
    return Rate(rates[0].count, rates[0].nbytes, sum(fastest), fastest)


def best_of(rounds: list[dict[str, Rate]], name: str) -> Rate | None:
    """The best ``name`` rate over the rounds that measured it (``None`` when none did)."""
    found = [r[name] for r in rounds if name in r]
    return best(found) if found else None


def fs_round(blobs: list[bytes], root: Path) -> dict[str, Rate]:
    raw_dir, store_dir = root / f"raw-{uuid.uuid4().hex}", root / f"dm-{uuid.uuid4().hex}"
    raw_dir.mkdir(parents=True)

    def raw_put(i: int, blob: bytes) -> None:
        with open(raw_dir / f"obj-{i}", "wb") as out:
            out.write(blob)
            out.flush()
            os.fsync(out.fileno())

    def raw_durable_put(i: int, blob: bytes) -> None:
        """The same, plus the folder fsync a new file needs to survive a crash (as datamesh does)."""
        raw_put(i + len(blobs), blob)
        fd = os.open(raw_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def raw_get(i: int, blob: bytes) -> None:
        with open(raw_dir / f"obj-{i}", "rb") as handle:
            assert len(handle.read()) == len(blob)

    store = FilesystemObjectStore(store_dir)  # a new store: it makes its 256 fan-out folders here
    strict = FilesystemObjectStore(root / f"dm-always-{uuid.uuid4().hex}", folder_fsync="always")
    keys = [ContentHash.of(b) for b in blobs]  # precomputed only to address gets

    def dm_put(i: int, blob: bytes) -> None:
        assert store.put(blob).unwrap().written

    def dm_always_put(i: int, blob: bytes) -> None:
        """Every small put's folder fsynced too, whatever the filesystem (``folder_fsync="always"``)."""
        assert strict.put(blob).unwrap().written

    def dm_get(i: int, blob: bytes) -> None:
        assert len(store.get(keys[i]).unwrap()) == len(blob)

    out = timed(
        blobs,
        {"raw put": raw_put, "dm put": dm_put, "raw-durable put": raw_durable_put, "dm-always put": dm_always_put},
    )

    def dm_verify(i: int, blob: bytes) -> None:
        assert store.verify(keys[i]).unwrap() == len(blob)

    out |= timed(blobs, {"raw get": raw_get, "dm get": dm_get, "dm verify": dm_verify})
    shutil.rmtree(raw_dir)
    shutil.rmtree(store_dir)
    shutil.rmtree(strict.root)
    return out


def s3_round(blobs: list[bytes], endpoint: str, part_bytes: int) -> dict[str, Rate]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    raw = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    raw_bucket, dm_bucket = f"raw-{uuid.uuid4().hex[:20]}", f"dm-{uuid.uuid4().hex[:20]}"
    raw.create_bucket(Bucket=raw_bucket)
    raw.create_bucket(Bucket=dm_bucket)
    settings = S3Settings(endpoint_url=endpoint, region_name="us-east-1", part_bytes=part_bytes, **CREDENTIALS)
    store = S3ObjectStore(make_client(settings), dm_bucket, "bench", part_bytes=settings.part_bytes)
    keys = [ContentHash.of(b) for b in blobs]

    def raw_put(i: int, blob: bytes) -> None:
        raw.put_object(Bucket=raw_bucket, Key=f"obj-{i}", Body=blob)

    def raw_get(i: int, blob: bytes) -> None:
        assert len(raw.get_object(Bucket=raw_bucket, Key=f"obj-{i}")["Body"].read()) == len(blob)

    def dm_put(i: int, blob: bytes) -> None:
        assert store.put(blob).unwrap().written

    def dm_get(i: int, blob: bytes) -> None:
        assert len(store.get(keys[i]).unwrap()) == len(blob)

    def raw_managed_put(i: int, blob: bytes) -> None:
        raw.upload_fileobj(io.BytesIO(blob), raw_bucket, f"managed-{i}", Config=TransferConfig())

    def raw_managed_get(i: int, blob: bytes) -> None:
        sink = io.BytesIO()
        raw.download_fileobj(raw_bucket, f"managed-{i}", sink, Config=TransferConfig())
        assert len(sink.getvalue()) == len(blob)

    managed = len(blobs[0]) > part_bytes  # managed transfers only differ from the plain calls above one part
    puts = {"raw put": raw_put, "dm put": dm_put} | ({"raw-managed put": raw_managed_put} if managed else {})
    gets = {"raw get": raw_get, "dm get": dm_get} | ({"raw-managed get": raw_managed_get} if managed else {})
    out = timed(blobs, puts) | timed(blobs, gets)
    for bucket in (raw_bucket, dm_bucket):  # free the server's memory between rounds
        for item in raw.list_objects_v2(Bucket=bucket).get("Contents", []):
            raw.delete_object(Bucket=bucket, Key=item["Key"])
    store.close()
    return out


def sha256_rate(size: int = 64 * MiB, rounds: int = 3) -> float:
    data = os.urandom(size)
    best_s = min(_time(lambda: hashlib.sha256(data).digest()) for _ in range(rounds))
    return size / best_s / 1e6


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = shutil.which("moto_server")
    if binary is None:
        sys.exit("moto_server not found: pip install 'moto[server]' or pass --endpoint")
    proc = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("moto_server did not start")


def _subset(parser: argparse.ArgumentParser, option: str, value: str, allowed: set[str]) -> set[str]:
    chosen = {part.strip() for part in value.split(",") if part.strip()}
    if not chosen or chosen - allowed:
        parser.error(f"{option} takes a comma-separated subset of {','.join(sorted(allowed))}, got {value!r}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-count", type=int, default=500)
    parser.add_argument("--large-count", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--part-mib", type=int, default=8, help="S3 part size (DATAMESH_S3_PART_BYTES), MiB")
    parser.add_argument("--endpoint", default=None, help="S3 endpoint (default: start moto_server)")
    parser.add_argument("--dir", type=Path, default=None, help="folder for filesystem runs (default: a temp dir)")
    parser.add_argument("--backends", default="fs,s3", help="comma-separated subset of fs,s3")
    parser.add_argument("--sizes", default="small,large", help="comma-separated subset of small,large")
    args = parser.parse_args()
    backends = _subset(parser, "--backends", args.backends, {"fs", "s3"})
    wanted = _subset(parser, "--sizes", args.sizes, {"small", "large"})

    proc, endpoint = (None, args.endpoint) if args.endpoint or "s3" not in backends else start_moto()
    root = Path(tempfile.mkdtemp(prefix="bench-objects-", dir=args.dir))
    sizes = {}
    if "small" in wanted:
        sizes["4 KiB"] = [os.urandom(4 * KiB) for _ in range(args.small_count)]
    if "large" in wanted:
        sizes["64 MiB"] = [os.urandom(64 * MiB) for _ in range(args.large_count)]
    runs: dict[str, Callable[[list[bytes]], dict[str, Rate]]] = {
        "fs": lambda b: fs_round(b, root),
        "s3": lambda b: s3_round(b, str(endpoint), args.part_mib * MiB),
    }
    try:
        rows = []
        for label, blobs in sizes.items():
            for backend, run in runs.items():
                if backend not in backends:
                    continue
                rounds = [run(blobs) for _ in range(args.rounds)]
                for op in ("put", "get"):
                    dm = best([r[f"dm {op}"] for r in rounds])
                    raw = best([r[f"raw {op}"] for r in rounds])
                    durable, managed = (best_of(rounds, f"{kind} {op}") for kind in ("raw-durable", "raw-managed"))
                    verify, always = best_of(rounds, "dm verify"), best_of(rounds, f"dm-always {op}")
                    rows.append((backend, label, op, dm, raw, durable, always, managed, verify))
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if proc is not None:
            proc.terminate()
            proc.wait()

    target = {"fs": 0.80, "s3": 0.90}
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    if "s3" in backends:
        print(f"S3 endpoint: {endpoint} ({'moto_server on loopback' if proc else 'given'})")
    kind = filesystem_type(root.parent) or "unknown"
    if name_committed_with_file(root.parent):
        policy = "a file's fsync commits its name here: datamesh (folder_fsync=auto) skips a small put's folder fsync"
    else:
        policy = "datamesh fsyncs a small put's folder here"
    print(f"fs folder under {root.parent} ({kind}): {policy}")
    sha_rate = sha256_rate()
    print(f"hashlib SHA-256 on this machine: {sha_rate:.0f} MB/s (64 MiB buffer)")
    print(
        f"small={args.small_count} x 4 KiB, large={args.large_count} x 64 MiB, {args.rounds} rounds (each blob's best),"
        f" S3 part size {args.part_mib} MiB"
    )
    header = (
        f"{'backend':<7} {'blob':<7} {'op':<4} {'datamesh obj/s':>15} {'MB/s':>9}"
        f" {'raw obj/s':>11} {'MB/s':>9} {'ratio':>6}  target"
    )
    print(header)
    print("-" * len(header))
    for backend, label, op, dm, raw, durable, always, managed, verify in rows:
        ratio = dm.ops / raw.ops
        verdict = "met" if ratio >= target[backend] else "MISSED"
        print(
            f"{backend:<7} {label:<7} {op:<4} {dm.ops:>15.1f} {dm.mbs:>9.1f} {raw.ops:>11.1f} {raw.mbs:>9.1f}"
            f" {ratio:>6.0%}  >={target[backend]:.0%} {verdict}"
        )
        if durable is not None and always is not None:
            print(
                f"{'':<20} folder fsynced on every filesystem: datamesh folder_fsync=always {always.ops:.1f} obj/s"
                f" vs raw write+fsync+folder fsync {durable.ops:.1f} obj/s -> ratio {always.ops / durable.ops:.0%}"
            )
        if managed is not None:
            call = "upload_fileobj" if op == "put" else "download_fileobj"
            print(
                f"{'':<20} raw boto3 {call} (TransferConfig defaults: 8 MiB parts, 10 threads):"
                f" {managed.ops:.1f} obj/s, {managed.mbs:.1f} MB/s -> ratio {dm.ops / managed.ops:.0%}"
            )
        if op == "get" and label == "64 MiB":
            print(f"{'':<20} verified get runs at {dm.mbs / sha_rate:.0%} of the SHA-256 rate ({sha_rate:.0f} MB/s)")
            if verify is not None:
                share = verify.mbs / sha_rate
                print(f"{'':<20} verify (scrub, nothing kept): {verify.mbs:.1f} MB/s, {share:.0%} of the SHA-256 rate")


if __name__ == "__main__":
    main()
