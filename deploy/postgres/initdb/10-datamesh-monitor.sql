-- Run once, as the superuser, when the primary's data directory is created (bitnami init scripts).
-- DATAMESH_CP_REQUIRE_SYNC_REPLICATION reads pg_stat_replication's state and sync_state, which
-- PostgreSQL shows only to superusers and members of pg_monitor (pg_read_all_stats).
GRANT pg_monitor TO datamesh;
