"""Residency: each region's objects stay in that region's location; no store means an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from datamesh.core.errors import ConfigError, NotFound
from datamesh.core.result import Err
from datamesh.core.types import GeoRegion
from datamesh.storage.objects.config import ObjectsSettings
from datamesh.storage.objects.router import open_object_stores, open_object_stores_from_env

from .conftest import CREDENTIALS, REGION, MotoServer

EU_PAYLOAD = b"an EU citizen's conversation" * 100


def s3_env(moto: MotoServer, **variables: str) -> dict[str, str]:
    return {
        "DATAMESH_S3_ENDPOINT_URL": moto.endpoint,
        "AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
        **variables,
    }


def all_keys(client: Any, bucket: str) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_eu_payload_lands_only_in_the_eu_bucket(moto: MotoServer, s3_client: Any, bucket: str) -> None:
    us_bucket = bucket + "-us"
    s3_client.create_bucket(Bucket=us_bucket)
    env = s3_env(
        moto,
        DATAMESH_OBJECTS_REGIONS="eu-west,us-east",
        DATAMESH_OBJECTS_URL_EU_WEST=f"s3://{bucket}/eu",
        DATAMESH_OBJECTS_URL_US_EAST=f"s3://{us_bucket}/us",
    )
    router = open_object_stores_from_env(env, default_url="file:///unused").unwrap()
    try:
        stored = router.for_region(GeoRegion.EU_WEST).unwrap().put(EU_PAYLOAD).unwrap()

        assert [k for k in all_keys(s3_client, bucket) if stored.content_hash.hex in k] != []
        assert all_keys(s3_client, us_bucket) == []
        us_store = router.for_region(GeoRegion.US_EAST).unwrap()
        assert isinstance(us_store.get(stored.content_hash).error, NotFound)
        assert router.for_region(GeoRegion.AP_SOUTHEAST) == Err(NotFound("object store for region", "ap-southeast"))
    finally:
        router.close()


def test_one_s3_url_gives_each_region_its_own_prefix(moto: MotoServer, s3_client: Any, bucket: str) -> None:
    router = open_object_stores_from_env(
        s3_env(moto, DATAMESH_OBJECTS_URL=f"s3://{bucket}/base"), default_url=""
    ).unwrap()
    try:
        stored = router.for_region(GeoRegion.EU_WEST).unwrap().put(EU_PAYLOAD).unwrap()
        keys = all_keys(s3_client, bucket)
        assert keys == [f"base/eu-west/{stored.content_hash.hex[:2]}/{stored.content_hash.hex}"]
        assert set(router.regions) == set(GeoRegion)
    finally:
        router.close()


def test_filesystem_regions_are_separate_folders(tmp_path: Path) -> None:
    router = open_object_stores(tmp_path.as_uri()).unwrap()
    stored = router.for_region(GeoRegion.EU_WEST).unwrap().put(EU_PAYLOAD).unwrap()
    found = [p.relative_to(tmp_path) for p in tmp_path.rglob(stored.content_hash.hex)]
    assert len(found) == 1 and found[0].parts[0] == "eu-west"
    assert not any((tmp_path / "us-east").rglob(stored.content_hash.hex))


def test_a_region_not_listed_has_no_store(tmp_path: Path) -> None:
    env = {"DATAMESH_OBJECTS_URL": tmp_path.as_uri(), "DATAMESH_OBJECTS_REGIONS": "eu-west"}
    router = open_object_stores_from_env(env, default_url="").unwrap()
    assert router.regions == [GeoRegion.EU_WEST]
    assert router.for_region(GeoRegion.US_EAST) == Err(NotFound("object store for region", "us-east"))
    assert not (tmp_path / "us-east").exists()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        (
            {"DATAMESH_OBJECTS_REGIONS": "eu-west", "DATAMESH_OBJECTS_URL_US_EAST": "s3://us/x"},
            "DATAMESH_OBJECTS_URL_US_EAST",
        ),
        ({"DATAMESH_OBJECTS_URL_MARS": "s3://mars/x"}, "DATAMESH_OBJECTS_URL_MARS"),
        ({"DATAMESH_OBJECTS_REGIONS": "eu-west,atlantis"}, "DATAMESH_OBJECTS_REGIONS"),
        ({"DATAMESH_OBJECTS_URL": "ftp://host/x"}, "DATAMESH_OBJECTS_URL"),
        ({"DATAMESH_OBJECTS_URL": "s3:///no-bucket"}, "DATAMESH_OBJECTS_URL"),
        (
            {
                "DATAMESH_OBJECTS_REGIONS": "eu-west,us-east",
                "DATAMESH_OBJECTS_URL_EU_WEST": "s3://shared/data",
                "DATAMESH_OBJECTS_URL_US_EAST": "s3://shared/data/us",
            },
            "DATAMESH_OBJECTS_URL_US_EAST",
        ),
        ({"DATAMESH_S3_PART_BYTES": "1024"}, "DATAMESH_S3_PART_BYTES"),
        ({"DATAMESH_S3_RETRY_ATTEMPTS": "zero"}, "DATAMESH_S3_RETRY_ATTEMPTS"),
        ({"DATAMESH_S3_RETRY_ATTEMPTS": "0", "DATAMESH_S3_RETRY_CAP_S": "1"}, "DATAMESH_S3_RETRY_ATTEMPTS"),
        ({"DATAMESH_S3_RETRY_CAP_S": "0.01"}, "DATAMESH_S3_RETRY_CAP_S"),
    ],
)
def test_bad_configuration_is_a_config_error(env: dict[str, str], variable: str) -> None:
    result = ObjectsSettings.from_env(env, default_url="s3://bucket/base")
    assert isinstance(result, Err) and isinstance(result.error, ConfigError)
    assert result.error.variable == variable


def test_settings_defaults_and_overrides() -> None:
    settings = ObjectsSettings.from_env(
        {
            "DATAMESH_OBJECTS_URL_EU_WEST": "s3://eu-bucket/x?region=eu-west-1",
            "AWS_ENDPOINT_URL": "http://aws-endpoint",
            "DATAMESH_S3_PART_BYTES": str(16 * 1024 * 1024),
        },
        default_url="s3://base-bucket/p",
    ).unwrap()
    eu = settings.locations[GeoRegion.EU_WEST]
    assert (eu.bucket, eu.path, eu.region_name) == ("eu-bucket", "x", "eu-west-1")
    assert settings.locations[GeoRegion.US_EAST].url == "s3://base-bucket/p/us-east"
    assert settings.s3.endpoint_url == "http://aws-endpoint"
    assert settings.s3.part_bytes == 16 * 1024 * 1024


def test_transfer_settings_have_defaults_and_bounds() -> None:
    defaults = ObjectsSettings.from_env({}, default_url="s3://bucket/base").unwrap().s3
    assert (defaults.single_put_max_bytes, defaults.upload_concurrency) == (100 * 1024 * 1024, 4)
    changed = ObjectsSettings.from_env(
        {"DATAMESH_S3_SINGLE_PUT_MAX_BYTES": "0", "DATAMESH_S3_UPLOAD_CONCURRENCY": "8"}, default_url="s3://b/p"
    ).unwrap()
    assert (changed.s3.single_put_max_bytes, changed.s3.upload_concurrency) == (0, 8)
    bad = ObjectsSettings.from_env({"DATAMESH_S3_UPLOAD_CONCURRENCY": "0"}, default_url="s3://b/p")
    assert isinstance(bad, Err) and bad.error.variable == "DATAMESH_S3_UPLOAD_CONCURRENCY"
