-- iterflow schema, version 10: what the dashboard (iterflow.dashboard) reads cheaply.
-- Idempotent, like every migration.
--
-- The dashboard lists runs by flow and version, newest first, and lists the flows by name
-- and version. One index serves both: (name, version, created_at, id) gives a flow version's
-- newest runs in order and, skipped through (a loose index scan, `dashboard_flows`), the
-- distinct flow versions without reading the table. `name` and `version` never change, so it
-- keeps a live run's status changes HOT updates (migration 0003); nothing here indexes
-- `status`, for the same reason (the dashboard's counts per status: docs/operations.md,
-- "Dashboard").

CREATE INDEX IF NOT EXISTS runs_name_version_created
    ON {schema}.runs (name, version, created_at DESC, id DESC);

INSERT INTO {schema}.schema_version (version) VALUES (10) ON CONFLICT DO NOTHING;
