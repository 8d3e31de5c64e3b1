"""S3 transfers: one conditional PUT for bytes in memory, concurrent parts above, whole-body gets."""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError, ResponseStreamingError

from datamesh.core.errors import IntegrityError, StorageError
from datamesh.core.result import Err, Ok
from datamesh.core.types import ContentHash
from datamesh.storage.objects.s3 import S3ObjectStore

from .conftest import FAST_RETRY, TEST_PART_BYTES, MotoServer, corrupt

MiB = 1024 * 1024


class FailingParts:
    """A client whose ``upload_part`` fails permanently for the given part numbers (others go through)."""

    def __init__(self, client: Any, failing: set[int]) -> None:
        self._client = client
        self._failing = failing
        self.parts_sent: list[int] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def upload_part(self, **kwargs: Any) -> Any:
        with self._lock:
            self.parts_sent.append(kwargs["PartNumber"])
        if kwargs["PartNumber"] in self._failing:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "part refused"}}, "UploadPart")
        return self._client.upload_part(**kwargs)


def store_with(client: Any, bucket: str, **changes: Any) -> S3ObjectStore:
    values: dict[str, Any] = {"part_bytes": TEST_PART_BYTES, "retry": FAST_RETRY, **changes}
    return S3ObjectStore(client, bucket, "objects", **values)


def chunks_of(data: bytes, size: int = MiB) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_bytes_up_to_the_single_put_limit_are_one_put(s3_client: Any, bucket: str) -> None:
    # Given a store whose single-PUT limit is above the part size
    store = store_with(s3_client, bucket, single_put_max_bytes=4 * TEST_PART_BYTES)
    data = os.urandom(2 * TEST_PART_BYTES + 7)
    # When bytes longer than a part are put twice
    first, again = store.put(data).unwrap(), store.put(data).unwrap()
    # Then the first writes one plain object (no multipart ETag), the second writes nothing
    head = s3_client.head_object(Bucket=bucket, Key=store.key_of(first.content_hash.hex))
    assert first.written and not again.written and "-" not in head["ETag"]
    assert store.get(first.content_hash) == Ok(data)


@pytest.mark.parametrize("single_put_max_bytes", [4 * TEST_PART_BYTES, 0], ids=["one put", "parts"])
def test_every_uploaded_body_is_covered_by_a_signed_checksum_not_hashed_twice(
    s3_client: Any, bucket: str, single_put_max_bytes: int
) -> None:
    # Given a store on the usual client, and the headers of every request it signs
    store = store_with(s3_client, bucket, single_put_max_bytes=single_put_max_bytes)
    seen: list[tuple[str, dict[str, str]]] = []

    def record(request: Any, event_name: str, **_: Any) -> None:
        seen.append((event_name.rsplit(".", 1)[-1], {k.lower(): v for k, v in request.headers.items()}))

    s3_client.meta.events.register("request-created.s3", record)
    try:
        # When bytes longer than a part are put
        data = os.urandom(2 * TEST_PART_BYTES + 7)
        key = store.put(data).unwrap().content_hash
    finally:
        s3_client.meta.events.unregister("request-created.s3", record)
    # Then no body was hashed for the signature; each carried a checksum header under the signature
    bodies = [(name, headers) for name, headers in seen if name in {"PutObject", "UploadPart"}]
    assert bodies and all(h["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD" for _, h in bodies)
    for name, headers in bodies:
        signed = headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
        checksum = "x-amz-checksum-sha256" if name == "PutObject" else "x-amz-checksum-crc32"
        assert checksum in headers and checksum in signed
    if single_put_max_bytes:  # one PUT, whose checksum is the object's own key
        ((_, put),) = bodies
        assert base64.b64decode(put["x-amz-checksum-sha256"]).hex() == key.hex
    assert store.get(key) == Ok(data)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_bytes_above_the_limit_upload_parts_concurrently(s3_client: Any, bucket: str, concurrency: int) -> None:
    store = store_with(s3_client, bucket, single_put_max_bytes=0, upload_concurrency=concurrency)
    data = os.urandom(4 * TEST_PART_BYTES + 12345)
    stored = store.put(data).unwrap()
    head = s3_client.head_object(Bucket=bucket, Key=store.key_of(stored.content_hash.hex))
    assert head["ETag"].strip('"').endswith("-5")  # five parts, completed in order
    assert store.get(stored.content_hash) == Ok(data)
    store.close()


@pytest.mark.parametrize("streamed", [False, True])
def test_a_failing_part_is_a_clean_error_with_no_upload_left(s3_client: Any, bucket: str, streamed: bool) -> None:
    # Given a client that refuses the third part of any upload
    client = FailingParts(s3_client, {3})
    store = store_with(client, bucket, single_put_max_bytes=0, upload_concurrency=3)
    data = os.urandom(5 * TEST_PART_BYTES)
    # When bytes (straight to their key) or a stream (to staging) are put
    result = store.put_stream(chunks_of(data)) if streamed else store.put(data)
    # Then the put is a permanent error, and neither an object nor a multipart upload remains
    assert isinstance(result, Err) and isinstance(result.error, StorageError)
    assert not result.error.retryable and "part refused" in result.error.message
    assert 3 in client.parts_sent
    assert s3_client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert store.exists(ContentHash.of(data)) == Ok(False)
    store.close()


def test_whole_body_get_of_a_corrupt_multipart_object_is_an_integrity_error(
    moto: MotoServer, s3_client: Any, bucket: str
) -> None:
    store = store_with(s3_client, bucket, single_put_max_bytes=0)
    data = os.urandom(3 * TEST_PART_BYTES)
    key = store.put(data).unwrap().content_hash
    body = bytearray(data)
    body[len(body) // 2] ^= 0x01
    s3_client.put_object(Bucket=bucket, Key=store.key_of(key.hex), Body=bytes(body))
    result = store.get(key)
    assert isinstance(result, Err) and isinstance(result.error, IntegrityError)
    assert isinstance(store.verify(key), Err)
    corrupt(store, key.hex)
    assert isinstance(store.get(key), Err)


class CutBody:
    """A response body that breaks after handing out one chunk (as a reset connection does)."""

    def __init__(self, body: Any) -> None:
        self._body = body
        self._handed_out = False

    def readinto(self, buffer: memoryview) -> int:
        if self._handed_out:
            raise ResponseStreamingError(error="connection reset mid-body")
        self._handed_out = True
        return int(self._body.readinto(buffer))

    def iter_chunks(self, size: int) -> Iterator[bytes]:
        first = self._body.read(size)
        yield first
        raise ResponseStreamingError(error="connection reset mid-body")

    def close(self) -> None:
        self._body.close()


class CutOnce:
    """A client whose first ``get_object`` body breaks mid-way; later ones are whole."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.gets: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_object(self, **kwargs: Any) -> Any:
        self.gets.append(kwargs)
        response = self._client.get_object(**kwargs)
        if len(self.gets) == 1:
            response["Body"] = CutBody(response["Body"])
        return response


@pytest.mark.parametrize("whole", [True, False])
def test_a_body_cut_mid_way_resumes_pinned_to_the_etag(s3_client: Any, bucket: str, whole: bool) -> None:
    # Given a stored object and a client whose first read breaks mid-body
    data = os.urandom(3 * MiB)
    key = store_with(s3_client, bucket).put(data).unwrap().content_hash
    client = CutOnce(s3_client)
    store = store_with(client, bucket, chunk_bytes=MiB)
    # When it is read whole (get) or in chunks (read_into)
    parts: list[bytes] = []
    result = store.get(key) if whole else store.read_into(key, parts.append).map(lambda _size: b"".join(parts))
    # Then the bytes are whole and verified, and the second request resumed where the first broke,
    # pinned to the version it was reading
    assert result == Ok(data)
    assert len(client.gets) == 2 and "IfMatch" in client.gets[1]
    assert client.gets[1]["Range"] == f"bytes={MiB}-"
