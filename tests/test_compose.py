"""docker-compose.yml is valid Compose and runs only real entry points of the project.

No Docker engine runs here: the file is validated against the Compose specification's JSON schema
(``../shared/schemas/compose-spec.json``, next to the repository) and every datamesh command it runs is
parsed by the project's own command line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from datamesh.cli.main import build_parser
from datamesh.core.types import GeoRegion

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_file_matches_the_compose_schema(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_every_datamesh_command_is_a_real_entry_point(compose: dict[str, Any]) -> None:
    parser = build_parser()
    ours = {name: svc for name, svc in compose["services"].items() if svc.get("image") == "datamesh:latest"}
    assert {"migrate", "worker-cp", "worker-blobs", "beat", "flower"} <= set(ours)
    assert any(name.startswith("worker-ap-") for name in ours)
    for name, service in ours.items():
        command = service["command"]
        assert command[:3] == ["python", "-m", "datamesh"], name
        args = parser.parse_args(command[3:])  # exits (fails the test) on an unknown command or option
        assert callable(args.handler), name
    assert (ROOT / "Dockerfile").is_file() and (ROOT / "celeryconfig.py").is_file()


def test_the_services_the_architecture_asks_for(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    primary = services["postgres-primary"]["environment"]
    assert (
        primary["POSTGRESQL_SYNCHRONOUS_COMMIT_MODE"] == "on" and primary["POSTGRESQL_NUM_SYNCHRONOUS_REPLICAS"] == "1"
    )
    assert services["postgres-standby"]["environment"]["POSTGRESQL_MASTER_HOST"] == "postgres-primary"
    assert "minio" in services and "flower" in services and "beat" in services
    workers = [s["command"] for n, s in services.items() if n.startswith("worker-ap-")]
    assert all("--region" in c for c in workers)  # AP pools are per region


def test_two_gateways_behind_a_balancer_and_prometheus(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateways = [n for n, s in services.items() if s.get("command", [])[3:4] == ["serve"]]
    assert len(gateways) >= 2 and all("healthcheck" in services[n] for n in gateways)
    nginx = (ROOT / "deploy" / "nginx" / "datamesh-gateway.conf").read_text()
    for name in gateways:  # the balancer's upstream lists every instance the compose file runs
        assert f"server {name}:8080" in nginx
    lb = services["gateway-lb"]
    assert lb["image"].startswith("nginx") and "./deploy/nginx/datamesh-gateway.conf" in lb["volumes"][0]
    prometheus = services["prometheus"]
    assert any(v.startswith("./deploy/prometheus:") for v in prometheus["volumes"])
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert {f"{name}:8080" for name in gateways} <= targets


def test_prometheus_scrapes_every_worker_pool(compose: dict[str, Any]) -> None:
    services = compose["services"]
    pools = [n for n, s in services.items() if s.get("command", [])[3:4] == ["worker"]]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    for name in pools:
        command = services[name]["command"]
        port = command[command.index("--metrics-port") + 1]
        assert f"{name}:{port}" in targets, name


def test_one_index_writer_and_read_only_readers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    writers = [n for n, s in services.items() if s.get("command", [])[3:6] == ["worker", "--role", "index"]]
    assert writers == ["worker-index"]
    assert "index:/var/lib/datamesh/index" in services["worker-index"]["volumes"]
    # and every region's searches are served by a search pool that mounts the index volume read-only.
    searchers = {n: s for n, s in services.items() if s.get("command", [])[3:6] == ["worker", "--role", "search"]}
    served = {c[i + 1] for c in (s["command"] for s in searchers.values()) for i, a in enumerate(c) if a == "--region"}
    assert served == {r.value for r in GeoRegion}
    for service in searchers.values():
        assert service["volumes"] == ["index:/var/lib/datamesh/index:ro"]


def test_gateways_mount_no_data_volume_and_read_through_the_workers(compose: dict[str, Any]) -> None:
    # Gateways are stateless instances that may run on any host: AP reads go to the shards' owners,
    # searches to the search pools, and nothing of the data folder is mounted.
    services = compose["services"]
    for name in ("gateway-1", "gateway-2"):
        gateway = services[name]
        assert gateway["environment"]["DATAMESH_AP_READS"] == "workers"
        assert gateway["environment"]["DATAMESH_INDEX_READS"] == "workers"
        assert not gateway.get("volumes"), name


def test_the_image_user_owns_the_data_folder_and_every_mount_point_under_it(compose: dict[str, Any]) -> None:
    # Given the image's user and the folders its RUN lines make and hand over to that user
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)[-1]
    made = {m for line in re.findall(r"mkdir -p ([^&\n]+)", dockerfile) for m in line.split()}
    made |= {str(parent) for m in made for parent in Path(m).parents}  # mkdir -p makes the parents too
    owned = re.findall(rf"chown -R {user}:\S+ (\S+)", dockerfile)
    data_dir = compose["x-datamesh"]["environment"]["DATAMESH_DATA_DIR"]
    # Then the data folder is the user's, and every volume a datamesh service mounts under it is
    # mounted on a folder the image made there (a new named volume takes that folder's owner)
    assert data_dir in owned
    for name, service in compose["services"].items():
        if service.get("image") != "datamesh:latest":
            continue
        for volume in service.get("volumes", []):
            target = volume.split(":")[1]
            if target.startswith(data_dir):
                assert target in made | {data_dir}, (name, target)


def test_the_cp_url_names_both_servers_and_asks_for_the_writable_one(compose: dict[str, Any]) -> None:
    from sqlalchemy.engine import make_url

    from datamesh.core.config import DataMeshConfig
    from datamesh.storage.cp.database import normalize_url

    env = compose["x-datamesh"]["environment"]
    # Given the compose file's CP URL, as every datamesh service reads it
    config = DataMeshConfig.from_env({"DATAMESH_CP_URL": env["DATAMESH_CP_URL"]}).unwrap()
    url = make_url(normalize_url(config.resolved_cp_url))
    # Then it is psycopg2's multi-host form: the primary first, then the synchronous standby a
    # failover promotes, and each connection keeps only a server that accepts writes
    assert url.drivername == "postgresql+psycopg2" and url.host is None and url.database == "datamesh"
    hosts = url.query["host"]
    assert isinstance(hosts, tuple) and list(hosts) == ["postgres-primary:5432", "postgres-standby:5432"]
    assert url.query["target_session_attrs"] == "read-write"
    services = compose["services"]
    assert {"postgres-primary", "postgres-standby"} == {h.split(":")[0] for h in hosts} & set(services)


def test_rpo_zero_is_required_and_migrate_waits_for_the_standby(compose: dict[str, Any]) -> None:
    from datamesh.core.config import DataMeshConfig

    services = compose["services"]
    env = compose["x-datamesh"]["environment"]
    # Given the shared environment, every long-running datamesh service requires synchronous replication
    assert DataMeshConfig.from_env(env).unwrap().cp_require_sync_replication
    long_running = [n for n, s in services.items() if s.get("image") == "datamesh:latest" and n != "migrate"]
    for name in long_running:
        service_env = services[name].get("environment", env)
        assert service_env["DATAMESH_CP_REQUIRE_SYNC_REPLICATION"] == "true", name
        # and starts after the one-shot migration,
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
    # which starts once the standby streams (its commits wait for it), by the standby's healthcheck
    assert services["migrate"]["depends_on"]["postgres-standby"] == {"condition": "service_healthy"}
    check = " ".join(services["postgres-standby"]["healthcheck"]["test"])
    assert "pg_stat_wal_receiver" in check
    # and the application's user may read the replication state the flag checks (pg_monitor)
    mounts = services["postgres-primary"]["volumes"]
    assert "./deploy/postgres/initdb:/docker-entrypoint-initdb.d:ro" in mounts
    grants = "\n".join(p.read_text() for p in (ROOT / "deploy" / "postgres" / "initdb").glob("*.sql"))
    assert "GRANT pg_monitor TO datamesh;" in grants
    assert services["postgres-primary"]["environment"]["POSTGRESQL_INITSCRIPTS_USERNAME"] == "postgres"


def test_flower_needs_its_password_from_the_environment(compose: dict[str, Any]) -> None:
    command = compose["services"]["flower"]["command"]
    auth = command[command.index("--basic-auth") + 1]
    # a required variable (`${VAR:?message}`): compose refuses to start without it, and nothing in
    # the file is a password for Flower
    assert re.fullmatch(r"admin:\$\{FLOWER_PASSWORD:\?[^}]+\}", auth), auth
    readme = (ROOT / "README.md").read_text()
    assert "`FLOWER_PASSWORD`" in readme


def test_a_multi_host_cp_url_skips_a_server_that_is_down(pg_cp_url: str, tmp_path: Path) -> None:
    import socket

    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from datamesh.core.config import DataMeshConfig
    from datamesh.pipeline.tiers import Tiers

    # Given a port nothing listens on (bound, then closed) and the real PostgreSQL on 127.0.0.1:5432,
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    real = make_url(pg_cp_url)
    assert (real.host, real.port or 5432) == ("127.0.0.1", 5432)
    # and a CP URL in the compose file's form naming the closed port first,
    query = {**real.query, "host": (f"127.0.0.1:{closed}", "127.0.0.1:5432"), "target_session_attrs": "read-write"}
    url = real.set(host=None, port=None, query=query).render_as_string(hide_password=False)
    config = DataMeshConfig.from_env({"DATAMESH_CP_URL": url, "DATAMESH_DATA_DIR": str(tmp_path)}).unwrap()
    # When the tiers open it (schema check included) and run a query,
    tiers = Tiers.open(config).unwrap()
    try:
        found = tiers.cp.run(
            lambda c: c.execute(text("SELECT inet_server_port(), pg_is_in_recovery()")).one(),
            operation="t",
            write=False,
        ).unwrap()
    finally:
        tiers.close()
    # Then the connection was made to the second server, a writable one
    assert tuple(found) == (5432, False)


def test_a_gateway_gives_up_on_a_saga_before_the_balancer_gives_up_on_the_gateway(compose: dict[str, Any]) -> None:
    # The caller then gets the gateway's answer (the saga id, still in flight), not nginx's bare 504.
    conf = (ROOT / "deploy" / "nginx" / "datamesh-gateway.conf").read_text()
    read_timeout = re.search(r"proxy_read_timeout\s+(\d+)s;", conf)
    assert read_timeout is not None
    for name in ("gateway-1", "gateway-2"):
        wait_s = float(compose["services"][name]["environment"]["DATAMESH_SAGA_WAIT_S"])
        assert wait_s < int(read_timeout.group(1)), name
