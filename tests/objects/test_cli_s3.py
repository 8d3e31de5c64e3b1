"""`python -m datamesh objects verify|gc` on an S3 store configured by the usual AWS variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.objects.conftest import CREDENTIALS, REGION, MotoServer
from tests.test_cli import run


def test_objects_verify_and_gc_commands_on_s3(moto: MotoServer, s3_client: Any, bucket: str, tmp_path: Path) -> None:
    env = {
        "DATAMESH_OBJECTS_URL": f"s3://{bucket}/dm",
        "AWS_ENDPOINT_URL": moto.endpoint,
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
    }
    # Given a demo run whose large payload went to the S3 bucket
    demo = run(["-m", "datamesh", "demo", "--conversations", "4"], tmp_path, **env)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="dm/")["Contents"]]
    (blob,) = [k for k in keys if len(k.rsplit("/", 1)[-1]) == 64]
    assert blob.startswith("dm/eu-west/"), keys
    name = blob.rsplit("/", 1)[-1]
    clean = run(["-m", "datamesh", "objects", "verify"], tmp_path, **env)
    assert clean.returncode == 0 and "0 problems found" in clean.stdout, clean.stdout + clean.stderr
    # When the object is overwritten with other bytes, then verify names it corrupt and fails
    s3_client.put_object(Bucket=bucket, Key=blob, Body=b"rotten bytes")
    dirty = run(["-m", "datamesh", "objects", "verify"], tmp_path, **env)
    assert dirty.returncode == 1 and f"CORRUPT eu-west {name}" in dirty.stdout, dirty.stdout + dirty.stderr
    # And gc, with an object no saga references beside it, deletes only that one
    stray = "ab" + "0" * 62
    s3_client.put_object(Bucket=bucket, Key=f"dm/eu-west/ab/{stray}", Body=b"no saga references this")
    gc = run(["-m", "datamesh", "objects", "gc", "--grace-s", "0"], tmp_path, **env)
    assert gc.returncode == 0 and "1 deleted" in gc.stdout, gc.stdout + gc.stderr
    left = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="dm/")["Contents"]}
    assert left == {blob}
    # When the object is deleted, then verify names it missing and fails
    s3_client.delete_object(Bucket=bucket, Key=blob)
    lost = run(["-m", "datamesh", "objects", "verify"], tmp_path, **env)
    assert lost.returncode == 1 and f"MISSING eu-west {name}" in lost.stdout, lost.stdout + lost.stderr
