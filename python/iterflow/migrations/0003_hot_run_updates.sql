-- iterflow schema, version 3: cheaper transitions of live runs.
-- Idempotent, like every migration.
--
-- 1. A live run's status changes are HOT updates.
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

-- 2. wake_run is PL/pgSQL. As a SQL function whose body cannot be inlined (an INSERT), it was
-- parsed and planned again at every call; PL/pgSQL keeps its plan for the session. Every
-- signal delivery, finished child and cancellation wakes a run.
CREATE OR REPLACE FUNCTION {schema}.wake_run(p_run uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {schema}.queue (run_id, flow_name, priority, ready_at, woken)
    SELECT r.id, r.name, r.priority, now(), true FROM {schema}.runs r
     WHERE r.id = p_run AND r.status NOT IN ('done', 'failed', 'canceled')
    ON CONFLICT (run_id) DO UPDATE SET woken = true, ready_at = LEAST({schema}.queue.ready_at, now());
END $$;

INSERT INTO {schema}.schema_version (version) VALUES (3) ON CONFLICT DO NOTHING;
