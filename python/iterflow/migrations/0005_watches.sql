-- iterflow schema, version 5: progress wake-ups for watched runs. Idempotent, like every
-- migration.
--
-- `wait(step=...)` and `wait(signal=...)` wait for a run to get somewhere, not to end. Rather
-- than have them poll, a waiter registers a watch on the run; while a watch lives, a step
-- record written for the run or a signal delivered to it sends `p <run id>` on the schema's
-- channel (docs/signals.md; the statements are record_step, record_step_many and
-- deliver_signal in queries.sql). An unwatched run pays one index probe of this (nearly
-- always empty) table per statement, and no notification. A waiter that dies leaves a watch
-- behind until it expires; expired ones are deleted by the next unwatch.

CREATE TABLE IF NOT EXISTS {schema}.watches (
    run_id     uuid        NOT NULL,
    watcher    uuid        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (run_id, watcher)
);

INSERT INTO {schema}.schema_version (version) VALUES (5) ON CONFLICT DO NOTHING;
