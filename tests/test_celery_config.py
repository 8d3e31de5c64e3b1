"""Celery configuration that needs no running service: variables, routing, the worker command lines."""

from __future__ import annotations

from pathlib import Path

from datamesh.cli.main import build_parser
from datamesh.core.config import DataMeshConfig, parse_shards
from datamesh.core.errors import ConfigError
from datamesh.core.result import Err
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.workers import queues
from datamesh.workers.app import create_app
from datamesh.workers.cli import worker_commands


def test_celery_variables_parse() -> None:
    config = DataMeshConfig.from_env(
        {"DATAMESH_EXECUTOR": "celery", "DATAMESH_WORKER_SHARDS": "0-2,7", "DATAMESH_WORKER_REGIONS": "eu-west"}
    ).unwrap()
    assert config.executor == "celery" and config.worker_shards == (0, 1, 2, 7)
    assert config.worker_regions == ("eu-west",) and config.broker_url == "redis://127.0.0.1:6379/0"
    bad = DataMeshConfig.from_env({"DATAMESH_WORKER_REGIONS": "mars"})
    assert isinstance(bad, Err) and bad.error.variable == "DATAMESH_WORKER_REGIONS"
    assert parse_shards("3") == (3,)


def test_reliability_settings_are_set_and_the_visibility_timeout_checked(tmp_path: Path) -> None:
    app = create_app(DataMeshConfig(), load_celeryconfig=False)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
    assert set(conf.imports) == {
        "datamesh.tasks.steps",
        "datamesh.tasks.compensation",
        "datamesh.tasks.reaper",
        "datamesh.tasks.index",
    }


async def test_an_unsafe_visibility_timeout_is_a_config_error(tmp_path: Path) -> None:
    config = DataMeshConfig(data_dir=tmp_path, executor="celery", visibility_timeout_s=30.0)
    result = await IngestionPipeline.create(config)
    assert isinstance(result, Err) and isinstance(result.error, ConfigError)
    assert result.error.variable == "DATAMESH_VISIBILITY_TIMEOUT_S"


def test_routing_by_role_region_and_shard() -> None:
    assert queues.route(queues.WRITE_AP, (), {"region": "eu-west", "shard": 3}, {}) == {"queue": "ap.eu-west.3"}
    assert queues.route(queues.UNDO_STORE_BLOBS, (), {"region": "us-east"}, {}) == {"queue": "blobs.us-east"}
    assert queues.route(queues.COMMIT_CP, (), {"saga_id": "x"}, {}) == {"queue": "cp"}
    assert queues.route(queues.INDEX_DRAIN, (), {"region": "eu-west"}, {}) == {"queue": "index.eu-west"}
    assert queues.route(queues.INDEX_DRAIN, (), {}, {}) == {"queue": "cp"}


def test_index_queues_have_one_consumer_process() -> None:
    # An index pool is one process whatever --processes says (a region's index has one writer),
    args = build_parser().parse_args(["worker", "--role", "index", "--region", "eu-west", "--processes", "3"])
    commands = worker_commands(args, DataMeshConfig())
    assert [(argv[argv.index("-Q") + 1], argv[argv.index("-c") + 1]) for argv, _ in commands] == [
        ("index.eu-west", "1")
    ]
    # and in a sharded all-roles pool only the first worker consumes the index queues.
    args = build_parser().parse_args(["worker", "--role", "all", "--region", "eu-west", "--processes", "2"])
    consumed = [argv[argv.index("-Q") + 1].split(",") for argv, _ in worker_commands(args, DataMeshConfig(ap_shards=2))]
    assert "index.eu-west" in consumed[0] and not any(q.startswith("index.") for q in consumed[1])


def test_an_ap_pool_deals_its_shards_to_one_consumer_each() -> None:
    args = build_parser().parse_args(
        ["worker", "--role", "ap", "--region", "eu-west", "--shards", "0-3", "--processes", "2"]
    )
    commands = worker_commands(args, DataMeshConfig())
    consumed = [argv[argv.index("-Q") + 1].split(",") for argv, _ in commands]
    assert consumed == [["ap.eu-west.0", "ap.eu-west.2"], ["ap.eu-west.1", "ap.eu-west.3"]]
    assert all(argv[argv.index("-c") + 1] == "1" for argv, _ in commands)
    assert all(env["DATAMESH_WORKER_REGIONS"] == "eu-west" for _, env in commands)
