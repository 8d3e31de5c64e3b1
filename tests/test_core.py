"""Core values: Result, the error set, ids, configuration, retries."""

from __future__ import annotations

import re
import typing
import uuid
from pathlib import Path

import pytest

from datamesh.core import errors
from datamesh.core.config import DataMeshConfig
from datamesh.core.result import Err, Ok, UnwrapError
from datamesh.core.retry import RetryPolicy, call_with_retry, full_jitter_delay
from datamesh.core.types import ContentHash, ConversationId, EntityId, GeoRegion, uuid7, uuid7_text, uuid7_texts

README = Path(__file__).resolve().parents[1] / "README.md"


def test_result_surface() -> None:
    ok: Ok[int] = Ok(2)
    err: Err[str] = Err("boom")
    assert ok.is_ok() and not ok.is_err() and ok.unwrap() == 2 and ok.error is None
    assert err.is_err() and err.unwrap_err() == "boom" and err.error == "boom"
    assert ok.map(lambda v: v * 3) == Ok(6)
    assert ok.and_then(lambda v: Err(f"no {v}")) == Err("no 2")
    assert err.map(lambda v: v) == err and err.unwrap_or(7) == 7
    assert err.map_err(str.upper) == Err("BOOM")
    with pytest.raises(UnwrapError):
        err.unwrap()
    with pytest.raises(UnwrapError):
        ok.unwrap_err()
    match ok:
        case Ok(value):
            assert value == 2
        case _:
            pytest.fail("Ok did not match")


def test_every_error_variant_is_described_and_documented() -> None:
    variants = typing.get_args(errors.Error)
    samples = {
        errors.ConfigError: errors.ConfigError("DATAMESH_X", "bad"),
        errors.ValidationError: errors.ValidationError("prompt", "empty"),
        errors.NotFound: errors.NotFound("conversation", "x"),
        errors.AccessDenied: errors.AccessDenied("read", "revoked key"),
        errors.IdempotencyConflict: errors.IdempotencyConflict("k"),
        errors.Backpressure: errors.Backpressure(0.5, "rate"),
        errors.IntegrityError: errors.IntegrityError("blob", "a", "b"),
        errors.StorageError: errors.StorageError("ap", "put", "disk full"),
        errors.SagaFailed: errors.SagaFailed("s", "write_ap", "boom"),
    }
    assert set(variants) == set(samples)
    doc = errors.__doc__ or ""
    for variant, sample in samples.items():
        assert variant.__name__ in doc, f"{variant.__name__} missing from the error tree"
        assert errors.describe(sample) and str(sample) == errors.describe(sample)


def test_ids_parse_and_order() -> None:
    ids = [ConversationId.generate() for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == 2000
    assert uuid7().version == 7
    entity = EntityId.generate()
    assert EntityId.parse(str(entity)) == Ok(entity)
    bad = EntityId.parse("not-a-uuid")
    assert isinstance(bad, Err) and bad.error.field == "entity_id"
    assert ConversationId.parse(12).unwrap_err().field == "conversation_id"


def test_regions_and_hashes() -> None:
    assert {r.name for r in GeoRegion} >= {"US_EAST", "US_WEST", "EU_WEST", "EU_CENTRAL", "AP_SOUTHEAST"}
    assert GeoRegion.parse("eu-west") == Ok(GeoRegion.EU_WEST) == GeoRegion.parse("EU_WEST")
    assert GeoRegion.parse("mars").unwrap_err().field == "geo_region"
    assert ContentHash.of(b"abc").hex == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert ContentHash.parse("xyz").is_err()
    with pytest.raises(ValueError):
        ContentHash("ABC")


def test_config_defaults_work_without_environment() -> None:
    config = DataMeshConfig.from_env({}).unwrap()
    assert config.executor == "local" and config.inline_max_bytes == 64 * 1024
    assert config.resolved_cp_url.startswith("sqlite:///")
    assert config.resolved_objects_url.startswith("file://")
    assert config.reaper_pivot_attempts == 10
    assert DataMeshConfig.from_env({"DATAMESH_REAPER_PIVOT_ATTEMPTS": "3"}).unwrap().reaper_pivot_attempts == 3


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATAMESH_AP_SHARDS", "zero"),
        ("DATAMESH_AP_SHARDS", "0"),
        ("DATAMESH_INGEST_RATE", "-3"),
        ("DATAMESH_BACKPRESSURE", "drop"),
        ("DATAMESH_EXECUTOR", "threads"),
        ("DATAMESH_CP_URL", "not a url"),
        ("DATAMESH_TENANT", "a b"),
        ("DATAMESH_MAX_PAYLOAD_BYTES", "1e3"),
        ("DATAMESH_CP_REQUIRE_SYNC_REPLICATION", "maybe"),
        ("DATAMESH_CP_COMMIT_TIMEOUT_S", "0"),
        ("DATAMESH_AP_LSM_FSYNC", "sometimes"),
        ("DATAMESH_AP_LSM_FSYNC_INTERVAL_S", "0"),
        ("DATAMESH_REAPER_PIVOT_ATTEMPTS", "0"),
        ("DATAMESH_REAPER_PIVOT_ATTEMPTS", "ten"),
    ],
)
def test_config_names_the_bad_variable(variable: str, value: str) -> None:
    result = DataMeshConfig.from_env({variable: value})
    assert isinstance(result, Err)
    assert result.error.variable == variable and value in result.error.message


def test_readme_lists_every_variable_with_its_default() -> None:
    package = Path(__file__).resolve().parents[1] / "datamesh"
    variables: set[str] = set()
    for source in package.rglob("*.py"):
        variables |= set(re.findall(r'"(DATAMESH_[A-Z0-9_]+)"', source.read_text()))
    readme = README.read_text()
    missing = sorted(v for v in variables if f"`{v}`" not in readme)
    assert not missing, f"README does not document {missing}"


def test_retry_full_jitter_and_bound() -> None:
    delays = [full_jitter_delay(5, base_s=0.1, cap_s=1.0) for _ in range(200)]
    assert all(0 <= d <= 1.0 for d in delays) and len(set(delays)) > 100
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("transient")
        return "done"

    policy = RetryPolicy(attempts=5, base_s=0.001, cap_s=0.01)
    assert call_with_retry(flaky, lambda e: isinstance(e, ConnectionError), policy) == "done"
    assert len(calls) == 3
    with pytest.raises(ConnectionError):
        call_with_retry(lambda: (_ for _ in ()).throw(ConnectionError("always")), lambda e: True, policy)
    with pytest.raises(KeyError):  # not retryable: raised at once
        call_with_retry(lambda: {}["x"], lambda e: isinstance(e, ConnectionError), policy)


def test_uuid7_text_is_the_canonical_form_and_ordered() -> None:
    # Given ids made as text in a burst (many share a millisecond), interleaved with UUID ones
    texts = [uuid7_text() if n % 2 else str(uuid7()) for n in range(5000)]
    # Then each is a canonical version-7 UUID string, and they sort in creation order, all distinct
    assert all(
        str(uuid.UUID(t)) == t and uuid.UUID(t).version == 7 and uuid.UUID(t).variant == uuid.RFC_4122 for t in texts
    )
    assert texts == sorted(texts) and len(set(texts)) == len(texts)


def test_uuid7_texts_of_a_batch_are_as_if_made_one_by_one() -> None:
    # Given batches of ids (one of them large enough to run the counter over) between single ones
    texts: list[str] = []
    for n in [*range(7), 9000, 0, 3]:
        texts += [*uuid7_texts(n), uuid7_text(), str(uuid7())]
    # Then every id is a canonical version-7 UUID string, in creation order, all distinct
    assert all(
        str(uuid.UUID(t)) == t and uuid.UUID(t).version == 7 and uuid.UUID(t).variant == uuid.RFC_4122 for t in texts
    )
    assert texts == sorted(texts) and len(set(texts)) == len(texts)
