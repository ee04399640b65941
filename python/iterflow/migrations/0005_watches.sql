-- iterflow schema, version 5: progress wake-ups for watched runs. Idempotent, like every
-- migration.
--
-- `wait(step=...)` and `wait(signal=...)` wait for a run to get somewhere, not to end. Rather
-- than have them poll, a waiter registers a watch on the run; while a watch lives, a step
-- record written for the run or a signal delivered to it sends `p <run id>` on the schema's
-- channel (docs/signals.md). An unwatched run pays one probe of this (nearly always empty)
-- table per statement, and no notification. A waiter that dies leaves a watch behind until
-- it expires; expired ones are deleted by the next unwatch.

CREATE TABLE IF NOT EXISTS {schema}.watches (
    run_id     uuid        NOT NULL,
    watcher    uuid        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (run_id, watcher)
);

-- Announce progress of those of `p_runs` that someone watches (NULL: none).
CREATE OR REPLACE FUNCTION {schema}.notify_watchers(p_runs uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM {schema}.wakeup('p ' || w.run_id::text)
       FROM (SELECT DISTINCT run_id FROM {schema}.watches
              WHERE run_id = ANY (p_runs) AND expires_at > now()) w;
END $$;

INSERT INTO {schema}.schema_version (version) VALUES (5) ON CONFLICT DO NOTHING;
