-- iterflow schema, version 3: a live run's status changes are HOT updates.
-- Idempotent, like every migration.
--
-- A live run's row is updated at every claim, suspension and wake-up. PostgreSQL can update a
-- row in place (a heap-only tuple: no new entry in any index) only when no indexed column
-- changes value and the page has room. `runs_status_created` indexed `status`, so each of
-- those updates wrote a new entry into every index of `runs` (seven, one of them GIN), which
-- was a large part of the database's work per step. Live runs are now found through
-- `finished_at IS NULL` (set exactly when a run becomes terminal, cleared by retry), which no
-- transition of a live run changes; terminal runs through `runs_finished`, as before.

DROP INDEX IF EXISTS {schema}.runs_status_created;
CREATE INDEX IF NOT EXISTS runs_live ON {schema}.runs (created_at) WHERE finished_at IS NULL;
-- room on each page for the in-place versions (applies to pages written from now on)
ALTER TABLE {schema}.runs SET (fillfactor = 80);

INSERT INTO {schema}.schema_version (version) VALUES (3) ON CONFLICT DO NOTHING;
