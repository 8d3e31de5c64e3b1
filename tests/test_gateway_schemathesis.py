"""Schemathesis against the served OpenAPI spec: no 500s, no response that breaks the spec.

Given a gateway on the real PostgreSQL and Redis and a writer's key, when Schemathesis generates
requests for every operation (valid and invalid by the schema), then every response has a status
the spec lists, the content type it lists, and a body matching the schema, and none is a 5xx.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from datamesh.core.principal import Role
from datamesh.storage.cp.access import AccessControl
from datamesh.storage.cp.database import CpDatabase
from tests.gateway_support import clean_redis, pg_schema, serve

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    with pg_schema() as cp:
        db = CpDatabase.open(cp).unwrap()
        access = AccessControl(db)
        access.grant("fuzz", "schemathesis", Role.WRITER).unwrap()
        raw = access.issue_key("fuzz", "schemathesis").unwrap().raw
        db.dispose()
        env = {"DATAMESH_CP_URL": cp, "DATAMESH_RATE_LIMIT_REDIS_URL": clean_redis()}
        env |= {"DATAMESH_RATE_LIMIT_KEY_BURST": "100000", "DATAMESH_RATE_LIMIT_TENANT_BURST": "100000"}
        with serve(tmp_path, **env) as server:
            run = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "schemathesis.cli",
                    "run",
                    f"{server.url}/openapi.json",
                    "--checks",
                    CHECKS,
                    "--header",
                    f"Authorization: Bearer {raw}",
                    "--max-examples",
                    "40",
                    "--seed",
                    "1",
                    "--request-timeout",
                    "30",
                    "--no-color",
                ],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=tmp_path,
            )
            log = server.output()
    assert run.returncode == 0, f"{run.stdout[-6000:]}\n{run.stderr[-2000:]}"
    assert " 500 " not in log and "Traceback" not in log, log[-4000:]
