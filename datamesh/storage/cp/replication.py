"""RPO=0 on PostgreSQL: is every commit confirmed by a synchronous, streaming standby?

With ``DATAMESH_CP_REQUIRE_SYNC_REPLICATION`` the pipeline checks this on start and refuses to run
when any part is missing:

* ``synchronous_commit`` is ``on``, ``remote_write`` or ``remote_apply`` (``local`` and ``off``
  acknowledge a commit before a standby has it);
* ``synchronous_standby_names`` names at least one standby;
* ``pg_stat_replication`` shows a standby ``streaming`` with ``sync_state`` ``sync`` or
  ``quorum`` (reading its state needs a superuser or the ``pg_monitor`` role).

A standby that drops out later makes commits wait; ``DATAMESH_CP_COMMIT_TIMEOUT_S`` bounds that
wait (see :mod:`datamesh.storage.cp.database`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

from datamesh.core.errors import ConfigError, StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.storage.cp.database import CpDatabase

VARIABLE = "DATAMESH_CP_REQUIRE_SYNC_REPLICATION"
SYNC_COMMIT_LEVELS = ("on", "remote_write", "remote_apply")


@dataclass(frozen=True, slots=True)
class ReplicationState:
    """What the primary reports about its synchronous replication."""

    synchronous_commit: str
    synchronous_standby_names: str
    sync_standbys: tuple[str, ...]

    def problems(self) -> list[str]:
        """What is missing for RPO=0 (empty when every commit waits for a streaming standby)."""
        found: list[str] = []
        if self.synchronous_commit not in SYNC_COMMIT_LEVELS:
            found.append(
                f"synchronous_commit is {self.synchronous_commit!r} (needs one of {', '.join(SYNC_COMMIT_LEVELS)})"
            )
        if not self.synchronous_standby_names.strip():
            found.append("synchronous_standby_names is empty")
        if not self.sync_standbys:
            found.append("pg_stat_replication shows no standby streaming with sync_state sync or quorum")
        return found


def state(conn: Connection) -> ReplicationState:
    synchronous_commit = str(conn.execute(text("SHOW synchronous_commit")).scalar_one())
    names = str(conn.execute(text("SHOW synchronous_standby_names")).scalar_one())
    rows = conn.execute(
        text(
            "SELECT coalesce(application_name, '') AS name FROM pg_stat_replication"
            " WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum') ORDER BY 1"
        )
    )
    return ReplicationState(synchronous_commit, names, tuple(r.name for r in rows))


def check_sync_replication(db: CpDatabase) -> Result[ReplicationState, ConfigError | StorageError]:
    """``Ok(state)`` when commits are confirmed by a synchronous standby; else a clear ``Err``."""
    if db.dialect != "postgresql":
        return Err(ConfigError(VARIABLE, f"synchronous replication needs a PostgreSQL CP database, not {db.dialect}"))
    found = db.run(state, operation="check_sync_replication", write=False)
    if isinstance(found, Err):
        return found
    problems = found.value.problems()
    if problems:
        return Err(
            StorageError(
                "cp",
                "check_sync_replication",
                f"{VARIABLE} is set but commits are not synchronously replicated (RPO=0 not met): "
                + "; ".join(problems),
            )
        )
    return Ok(found.value)
