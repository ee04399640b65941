-- iterflow schema, version 9: the workers registry. Idempotent, like every migration.
--
-- Each process that listens (a Worker) keeps one row here: who it is, which name@version
-- flows it serves, on which core and with how many slots. It writes the row when it starts
-- and again once per heartbeat interval (one statement per interval, not per run), deletes it
-- when it stops gracefully, and a row not seen for a lease is "gone" (a crashed worker's row
-- is pruned a day later by any worker's next write). engine.list_workers() reads it, and
-- engine.explain() uses it to say that no live worker serves a queued run's flow, or when the
-- holder of a lease was last heard from (docs/operations.md, "Why is this run stuck?").

CREATE TABLE IF NOT EXISTS {schema}.workers (
    owner       text PRIMARY KEY,
    host        text        NOT NULL,
    pid         int         NOT NULL,
    flows       text[]      NOT NULL DEFAULT '{}',
    core        text        NOT NULL,
    concurrency int         NOT NULL,
    lease_ms    bigint      NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

INSERT INTO {schema}.schema_version (version) VALUES (9) ON CONFLICT DO NOTHING;
