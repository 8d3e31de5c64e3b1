"""One writer per shard: leases with fencing tokens in real Redis, checked by the shard before writing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from datamesh.core.config import DataMeshConfig
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.storage.ap.base import ShardError
from datamesh.storage.ap.fenced import FencedShard, advance_fence, read_fence
from datamesh.storage.ap.sqlite_shard import SqliteShard
from datamesh.workers.leases import ShardLeases
from tests.celery.conftest import Workers, eventually, pool_children
from tests.helpers import real_requests, tier_counts


def test_lease_excludes_a_second_owner_until_it_expires(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    fence = tmp_path / "shard-000.fence"
    a = ShardLeases(client, "worker-a", ttl_s=0.4, fence_of=lambda r, s: read_fence(fence))
    b = ShardLeases(client, "worker-b", ttl_s=0.4, fence_of=lambda r, s: read_fence(fence))
    # Given worker A holding the lease of a shard,
    token_a, _ = a.acquire("eu-west", 0)
    assert token_a is not None
    assert a.acquire("eu-west", 0)[0] == token_a  # renewing keeps the token
    # when B asks while the lease is live, it is told to wait;
    token, wait = b.acquire("eu-west", 0)
    assert token is None and 0 < wait <= 0.4
    # once A stops renewing and the lease expires, B takes the shard with a higher token.
    time.sleep(0.5)
    assert a.token("eu-west", 0) is None  # A no longer trusts its own lease either
    token_b, _ = b.acquire("eu-west", 0)
    assert token_b is not None and token_b > token_a
    client.close()


def test_shard_refuses_a_writer_with_an_older_token(tmp_path: Path) -> None:
    path = tmp_path / "shard-000.sqlite3"
    fence = tmp_path / "shard-000.fence"
    tokens = {"current": 5}
    shard = FencedShard(SqliteShard(path), fence, lambda: tokens["current"])
    # Given a write under token 5 and one under token 6 (a new owner),
    shard.put_many([(b"k1", b"v1")])
    tokens["current"] = 6
    shard.put_many([(b"k2", b"v2")])
    assert read_fence(fence) == 6
    # when the old owner wakes up and writes with token 5,
    tokens["current"] = 5
    with pytest.raises(ShardError, match="fenced off"):
        shard.put_many([(b"k3", b"stale")])
    with pytest.raises(ShardError, match="fenced off"):
        shard.delete_many([b"k1"])
    # then nothing it sent is written; without a lease nothing is written either.
    tokens_none = FencedShard(shard, fence, lambda: None)
    with pytest.raises(ShardError, match="no lease"):
        tokens_none.put_many([(b"k4", b"v")])
    assert shard.get_many([b"k1", b"k2", b"k3", b"k4"]) == {b"k1": b"v1", b"k2": b"v2"}
    shard.close()


def test_tokens_stay_above_the_fence_when_redis_lost_its_counter(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    # Given a shard that has seen token 41 and a Redis that forgot every counter (restart without data),
    leases = ShardLeases(client, "worker-c", ttl_s=1.0, fence_of=lambda r, s: 41)
    # when a worker takes the lease, its token is above what the shard has seen.
    token, _ = leases.acquire("us-east", 3)
    assert token is not None and token > 41
    leases.release_all()
    client.close()


def test_a_token_taken_but_never_written_with_is_not_issued_again_after_redis_lost_its_data(
    redis_url: str, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    fence = tmp_path / "shard-003.fence"
    a, b = (
        ShardLeases(
            client,
            owner,
            ttl_s=5.0,
            fence_of=lambda r, s: read_fence(fence),
            fence_to=lambda r, s, token: advance_fence(fence, token),
        )
        for owner in ("worker-a", "worker-b")
    )
    # Given a worker that took a shard's lease and has not written yet,
    first, _ = a.acquire("us-east", 3)
    assert first is not None
    # when Redis loses its data (lease and counter) and another worker takes the shard,
    client.flushdb()
    second, _ = b.acquire("us-east", 3)
    # then the second token is above the first (the first was recorded in the fence as it was
    # taken), so the shard refuses the first worker's writes rather than taking both.
    assert second is not None and second > first, (first, second)
    assert read_fence(fence) == second
    b.release_all()
    client.close()


@pytest.mark.parametrize("celery_config", ["sqlite", "lsm"], indirect=True)
async def test_a_second_worker_takes_the_shards_when_the_owner_dies(
    workers: Workers, celery_config: DataMeshConfig
) -> None:
    import os
    import signal

    # Given worker A owning the shards it wrote, and worker B consuming the same queues (a rolling deploy),
    first = workers.start("--role", "all", "--name", "a")
    workers.wait_ready()
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        committed = []
        done = (await p.ingest_many(real_requests(8))).unwrap()
        committed += [r.unwrap().conversation_id for r in done]
        workers.start("--role", "all", "--name", "b")
        workers.wait_ready(2)
        # A's leases run out while it idles with its shard files open;
        await asyncio.sleep(celery_config.shard_lease_s + 0.5)
        # both consuming still gives one writer per shard (B waits for A to let go of the files),
        done = (await p.ingest_many(real_requests(16)[8:])).unwrap()
        committed += [r.unwrap().conversation_id for r in done]
        fences = {f: read_fence(f) for f in (celery_config.data_dir / "ap").rglob("*.fence")}
        # when A dies (main process and pool),
        for pid in [*pool_children(first.pid), first.pid]:
            os.kill(pid, signal.SIGKILL)
        first.wait()
        # then B takes its shards once the leases expire, with higher tokens,
        done = (await p.ingest_many(real_requests(40)[16:])).unwrap()
        committed += [r.unwrap().conversation_id for r in done]
        after = {f: read_fence(f) for f in (celery_config.data_dir / "ap").rglob("*.fence")}
        assert any(after[f] > token for f, token in fences.items()), (fences, after)
        # every turn reads back, those A wrote last too (an LSM shard's log is replayed by B),
        for conversation_id in committed:
            assert (await p.get(conversation_id)).is_ok(), conversation_id

        # and the shards hold exactly the 40 turns.
        def forty() -> None:
            assert tier_counts(p.tiers).ap_rows == 40

        await eventually(forty)
