-- The iterflow schema as it is now (version 14), in one file: every table, index and function,
-- each function with its live body. `{schema}` is the quoted schema name, `{schema_raw}` the
-- bare one, as in the migrations.
--
-- This file is the picture to read and review; it is not how a database gets the schema.
-- Databases are created and upgraded by the migrations (migrations/000N_*.sql, applied in
-- order by `iterflow migrate`), which never change once released. A change to the schema is a
-- new migration plus the same change here: tests/test_schema_sql.py applies all migrations to
-- one fresh schema and this file to another and fails unless the two are identical (tables,
-- columns, defaults, constraints, indexes, storage options, sequences, and every function's
-- definition as PostgreSQL prints it). See docs/architecture.md, "Database".

CREATE SCHEMA {schema};

-- ---------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------

CREATE TABLE {schema}.schema_version (
    version    int PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- One row per run, forever (until retention prunes terminal runs).
-- status: pending | running | sleeping | awaiting_signal | awaiting_child | retrying | parked
--         | done | failed | canceled
-- Room on each page (fillfactor) keeps a live run's status changes HOT updates: no column an
-- index covers changes while a run is live (migration 0003).
CREATE TABLE {schema}.runs (
    id              uuid PRIMARY KEY,
    name            text        NOT NULL,
    version         int         NOT NULL,
    idempotency_key text,
    status          text        NOT NULL,
    input           jsonb,
    output          jsonb,
    error           jsonb,
    tags            text[]      NOT NULL DEFAULT '{}',
    priority        int         NOT NULL DEFAULT 0,
    attempts        int         NOT NULL DEFAULT 0,
    parent_id       uuid,
    parent_key      text,
    depth           int         NOT NULL DEFAULT 1,
    -- why a live run is not moving: {"kind": "signal"|"sleep"|"child"|"retry"|"parked", ...}
    waiting         jsonb,
    cancel_reason   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    -- the run's key (start(..., key=...)): per-key limits and fair claims (migration 0008)
    concurrency_key text,
    -- continue-as-new (migration 0011): the run this one continued, the run that continued it
    continued_from  uuid,
    continued_to    uuid,
    -- a debounced start's key (migration 0012; docs/guide.md, "Flow control")
    debounce_key    text
) WITH (fillfactor = 80);

CREATE UNIQUE INDEX runs_idempotency
    ON {schema}.runs (name, version, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX runs_parent_key
    ON {schema}.runs (parent_id, parent_key) WHERE parent_id IS NOT NULL;
CREATE INDEX runs_created ON {schema}.runs (created_at DESC, id DESC);
CREATE INDEX runs_name_created ON {schema}.runs (name, created_at DESC, id DESC);
-- a flow version's newest runs, and the distinct flow versions (the dashboard; migration 0010)
CREATE INDEX runs_name_version_created ON {schema}.runs (name, version, created_at DESC, id DESC);
CREATE INDEX runs_tags ON {schema}.runs USING gin (tags);
-- terminal runs (retention, listing by finish); live ones through runs_live
CREATE INDEX runs_finished ON {schema}.runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX runs_live ON {schema}.runs (created_at) WHERE finished_at IS NULL;
-- debounced starts find the run that has not begun; none of its columns change once written
CREATE INDEX runs_debounce
    ON {schema}.runs (name, version, debounce_key) WHERE debounce_key IS NOT NULL;

-- The work queue: a row exists only while a live run has something to do at `ready_at`
-- (start, retry backoff, sleep deadline, signal-timeout deadline, a wake-up). Timers are
-- rows whose ready_at is in the future. A finished or indefinitely waiting run has no row,
-- so the table stays as small as the live work.
CREATE TABLE {schema}.queue (
    run_id      uuid PRIMARY KEY REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    flow_name   text        NOT NULL,
    priority    int         NOT NULL DEFAULT 0,
    ready_at    timestamptz NOT NULL DEFAULT now(),
    -- set by every wake-up (signal, child finished, cancel); a suspend that finds it set
    -- re-queues the run at once instead of waiting, so a wake during a lease is never lost.
    woken       boolean     NOT NULL DEFAULT false,
    lease_owner text,
    lease_token bigint,
    lease_until timestamptz,
    concurrency_key text    NOT NULL DEFAULT '',
    -- set by the claim on a lease counted against a limit: releasing it announces the free place
    limited     boolean     NOT NULL DEFAULT false
) WITH (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 0,
        autovacuum_analyze_scale_factor = 0.02, autovacuum_analyze_threshold = 200);

CREATE INDEX queue_ready
    ON {schema}.queue (priority DESC, ready_at) WHERE lease_until IS NULL;
CREATE INDEX queue_leased
    ON {schema}.queue (lease_until) WHERE lease_until IS NOT NULL;
-- ready runs of a flow by key, in claim order (claim_limited's per-key picks and its walk over
-- the keys that have ready work)
CREATE INDEX queue_ready_key
    ON {schema}.queue (flow_name, concurrency_key, priority DESC, ready_at) WHERE lease_until IS NULL;
-- leases per flow and key (claim_limited's count of what is executing)
CREATE INDEX queue_leased_key
    ON {schema}.queue (flow_name, concurrency_key) WHERE lease_until IS NOT NULL;

-- Each flow's limits, written by the workers that serve it when they start (docs/guide.md,
-- "Flow control"); `limited`: claimed through claim_limited (any limit, or a keyed flow).
CREATE TABLE {schema}.flow_limits (
    flow_name       text PRIMARY KEY,
    concurrency     int,
    key_concurrency int,
    limited         boolean     NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- lease tokens fence a stale worker's writes (finish_runs, suspend_run, heartbeat)
CREATE SEQUENCE {schema}.lease_tokens;

-- Memoized ctx calls. `key` is the cursor key; `seq` the call index in the body (drift check).
-- status: done (result or error stored, final) | attempt (a failed attempt, will retry)
--         | waiting (a pinned deadline / spawned child, not yet resolved)
CREATE TABLE {schema}.steps (
    run_id      uuid        NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    key         text        NOT NULL,
    seq         int         NOT NULL,
    kind        text        NOT NULL,
    name        text        NOT NULL,
    status      text        NOT NULL,
    result      jsonb,
    error       jsonb,
    attempts    int         NOT NULL DEFAULT 0,
    deadline    timestamptz,
    child_id    uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    PRIMARY KEY (run_id, key)
);

-- Per-run signal inbox, single consumer. Idempotency keys are kept for the life of the run.
CREATE TABLE {schema}.signals (
    id              bigserial PRIMARY KEY,
    run_id          uuid        NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    name            text        NOT NULL,
    payload         jsonb,
    idempotency_key text,
    received_at     timestamptz NOT NULL DEFAULT now(),
    consumed_at     timestamptz,
    consumed_by     text
);
CREATE INDEX signals_unconsumed
    ON {schema}.signals (run_id, name, id) WHERE consumed_at IS NULL;
CREATE UNIQUE INDEX signals_idempotency
    ON {schema}.signals (run_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- Notable moments of a run (failures, retries, parking, cancel, ctx.log). Not written per
-- successful step: that is what `steps` is for, and every row here costs WAL.
CREATE TABLE {schema}.events (
    id      bigserial PRIMARY KEY,
    run_id  uuid        NOT NULL REFERENCES {schema}.runs (id) ON DELETE CASCADE,
    at      timestamptz NOT NULL DEFAULT now(),
    kind    text        NOT NULL,
    data    jsonb
);
CREATE INDEX events_run ON {schema}.events (run_id, id);
CREATE INDEX events_at ON {schema}.events (at);

CREATE TABLE {schema}.crons (
    name          text PRIMARY KEY,
    schedule      text        NOT NULL,
    timezone      text        NOT NULL DEFAULT 'UTC',
    flow_name     text        NOT NULL,
    flow_version  int         NOT NULL,
    input         jsonb,
    overlap       text        NOT NULL DEFAULT 'skip',
    jitter_ms     bigint,
    backfill_ms   bigint,
    next_fire_at  timestamptz NOT NULL,
    last_fire_at  timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Waiters watching a run's progress (`wait(step=...)`, `wait(signal=...)`): while a watch
-- lives, a step record written for the run or a signal delivered to it sends `p <run id>`
-- (record_step, record_step_many and deliver_signal in queries.sql; docs/signals.md).
CREATE TABLE {schema}.watches (
    run_id     uuid        NOT NULL,
    watcher    uuid        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (run_id, watcher)
);

-- The workers registry (migration 0009): one row per listening process, written at its start
-- and once per heartbeat interval, deleted at a graceful stop. A row unseen for `lease_ms` is
-- a gone worker; one unseen for a day is pruned by the next upsert_worker of any worker.
CREATE TABLE {schema}.workers (
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

-- Permits of step concurrency limits (migration 0012): one row per step call holding one. A
-- permit counts only while the queue row of its run carries the lease token it was taken
-- under, unexpired: it lives as long as the holder's lease, renewed by the same heartbeat.
CREATE TABLE {schema}.step_permits (
    limit_name  text        NOT NULL,
    key         text        NOT NULL,
    run_id      uuid        NOT NULL,
    step_key    text        NOT NULL,
    lease_token bigint      NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (limit_name, key, run_id, step_key)
);

-- One GCRA row (theoretical arrival time) per rate-limited (limit, key).
CREATE TABLE {schema}.rate_limits (
    limit_name text        NOT NULL,
    key        text        NOT NULL,
    tat        timestamptz NOT NULL,
    PRIMARY KEY (limit_name, key)
);

-- ---------------------------------------------------------------------------------------
-- Functions. The state transitions that touch several rows live here so both cores run the
-- same logic in one round trip, and so a transition can never be half applied. Each is
-- written once; the statements of queries.sql call them.
-- ---------------------------------------------------------------------------------------

-- For autoscalers: how much work is claimable now (ready queue rows + due crons).
CREATE OR REPLACE FUNCTION {schema}.pending_work(names text[] DEFAULT NULL) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT (SELECT count(*) FROM {schema}.queue q
             WHERE q.lease_until IS NULL AND q.ready_at <= now()
               AND (names IS NULL OR q.flow_name = ANY (names)))
         + (SELECT count(*) FROM {schema}.crons c
             WHERE c.next_fire_at <= now() AND (names IS NULL OR c.flow_name = ANY (names)))
$$;

-- Send a wake-up (`q <flow>`, `h <run id> <token> <owner>`, `d <run id>`, `p <run id>`,
-- `l <limit> [<key>]`) on the schema's channel, or, in a
-- transaction that set `iterflow.defer_notify` to `on`, collect it in `iterflow.notify`
-- (records separated by chr(30)) for the Rust core's relay to send after the commit: a
-- notifying commit holds a database-wide lock until its WAL flush (migration 0002).
CREATE OR REPLACE FUNCTION {schema}.wakeup(p_payload text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('iterflow.defer_notify', true) = 'on' THEN
        PERFORM set_config('iterflow.notify',
                           coalesce(current_setting('iterflow.notify', true), '') || p_payload || chr(30), true);
    ELSE
        PERFORM pg_notify('iterflow.{schema_raw}', p_payload);
    END IF;
END $$;

-- Announce a run that became ready now: `h <run id> <lease token> <owner>` to the worker
-- holding it in its sticky cache (`p_waiting.sticky`), else `q <flow>` to its flow's workers.
CREATE OR REPLACE FUNCTION {schema}.announce_ready(p_run uuid, p_waiting jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM {schema}.wakeup(CASE
        WHEN p_waiting ? 'sticky' THEN
            'h ' || p_run::text || ' ' || (p_waiting->'sticky'->>'token') || ' '
                 || (p_waiting->'sticky'->>'owner')
        ELSE 'q ' || (SELECT name FROM {schema}.runs WHERE id = p_run) END);
END $$;

-- The records of keys p_keys of run p_run as a JSON array, each with its child's status,
-- output and error while it waits on one: the records a handoff sends (hand_off), and reads
-- back when they were too large for its notice (handed_records).
CREATE OR REPLACE FUNCTION {schema}.held_records(p_run uuid, p_keys text[]) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'key', s.key, 'seq', s.seq, 'kind', s.kind, 'name', s.name, 'status', s.status,
               'result', s.result, 'error', s.error, 'attempts', s.attempts, 'deadline', s.deadline,
               'child_id', s.child_id, 'child_status', c.status, 'child_output', c.output,
               'child_error', c.error, 'finished_at', s.finished_at)), '[]')
      FROM {schema}.steps s LEFT JOIN {schema}.runs c ON s.status = 'waiting' AND c.id = s.child_id
     WHERE s.run_id = p_run AND s.key = ANY (p_keys)
$$;

-- Lease a woken held run to the worker holding it, in the waking transaction, as claim_runs
-- would, and send it the claim: `H <run id> <held token> <owner> <json>` (the new lease token,
-- attempt, parent status, database time and the records of the keys its body waits on, or
-- `"steps": null` when they would not fit a notice). Only when the holder asked for it
-- (`waiting.sticky.hand`, the lease in ms it gets), is registered as alive, and the run is
-- neither canceled nor of a flow with limits; else false, having written nothing (migration 0014).
CREATE OR REPLACE FUNCTION {schema}.hand_off(p_run uuid, p_name text, p_parent uuid, p_waiting jsonb)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_held jsonb := p_waiting->'sticky';
    v_ms int := (p_waiting->'sticky'->>'hand')::int;
    v_owner text := p_waiting->'sticky'->>'owner';
    v_token bigint;
    v_attempts int;
    v_keys text[];
    v_seqs int[];
    v_names text[];
    v_closed int;
    v_steps jsonb;
    v_notice text;
BEGIN
    IF v_ms IS NULL
       OR EXISTS (SELECT 1 FROM {schema}.flow_limits l WHERE l.flow_name = p_name AND l.limited)
       OR NOT EXISTS (SELECT 1 FROM {schema}.workers w WHERE w.owner = v_owner
                         AND w.last_seen > now() - w.lease_ms * interval '1 millisecond') THEN
        RETURN false;
    END IF;
    UPDATE {schema}.queue
       SET lease_owner = v_owner, lease_token = nextval('{schema}.lease_tokens'),
           lease_until = now() + v_ms * interval '1 millisecond', woken = false
     WHERE run_id = p_run
    RETURNING lease_token INTO v_token;
    UPDATE {schema}.runs r
       SET status = 'running', attempts = r.attempts + 1, updated_at = now(),
           waiting = jsonb_build_object('kind', 'running', 'worker', v_owner,
                                        'until', now() + v_ms * interval '1 millisecond')
     WHERE r.id = p_run
    RETURNING r.attempts INTO v_attempts;
    -- the signals its waits take, as a claim takes them
    SELECT array_agg(w.value), array_agg((p_waiting->'signal_seqs'->>w.key)::int), array_agg(w.key)
      INTO v_keys, v_seqs, v_names
      FROM jsonb_each_text(p_waiting->'signals') w
     WHERE p_waiting->'signal_seqs' ? w.key;
    IF v_keys IS NOT NULL THEN
        PERFORM 1 FROM {schema}.take_signals(array_fill(p_run, ARRAY[cardinality(v_keys)]), v_keys, v_seqs, v_names);
    END IF;
    -- its sleep that is over, closed as a claim closes it
    IF p_waiting->>'kind' = 'sleep' THEN
        UPDATE {schema}.steps s SET status = 'done', finished_at = now()
         WHERE s.run_id = p_run AND s.key IN (SELECT jsonb_array_elements_text(v_held->'keys'))
           AND s.kind = 'sleep' AND s.status = 'waiting' AND s.deadline <= now();
        GET DIAGNOSTICS v_closed = ROW_COUNT;
        IF v_closed > 0 AND EXISTS (SELECT 1 FROM {schema}.watches WHERE run_id = p_run AND expires_at > now()) THEN
            PERFORM {schema}.wakeup('p ' || p_run::text);
        END IF;
    END IF;
    v_steps := {schema}.held_records(p_run, ARRAY(SELECT jsonb_array_elements_text(v_held->'keys')));
    v_notice := 'H ' || p_run::text || ' ' || (v_held->>'token') || ' ' || v_owner || ' ';
    -- a notice must stay under 8000 bytes: records too large to go along (`"steps": null`)
    -- are read by the holder (handed_records)
    IF octet_length(v_steps::text) > 7000 - octet_length(v_notice) THEN
        v_steps := 'null';
    END IF;
    PERFORM {schema}.wakeup(v_notice || jsonb_build_object(
        'token', v_token, 'attempts', v_attempts, 'now', now(), 'steps', v_steps,
        'parent_status', (SELECT p.status FROM {schema}.runs p WHERE p.id = p_parent))::text);
    RETURN true;
END $$;

-- Wake a live run now (a signal arrived, a child finished, a reconcile found a stranded
-- parent), keeping its key on the queue row it makes. A run that is not leased is handed to
-- the worker holding it in its sticky cache (hand_off), else announced: `h <run id> <lease
-- token> <owner>` to that worker, or `q <flow>`; a leased run's worker sees `woken` when it
-- suspends (migrations 0013, 0014).
CREATE OR REPLACE FUNCTION {schema}.wake_run(p_run uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_run record;
    v_leased boolean;
BEGIN
    SELECT id, name, priority, concurrency_key, waiting, cancel_reason, parent_id INTO v_run FROM {schema}.runs
     WHERE id = p_run AND status NOT IN ('done', 'failed', 'canceled');
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO {schema}.queue AS q (run_id, flow_name, priority, ready_at, woken, concurrency_key)
    VALUES (v_run.id, v_run.name, v_run.priority, now(), true, coalesce(v_run.concurrency_key, ''))
    ON CONFLICT (run_id) DO UPDATE SET woken = true, ready_at = LEAST(q.ready_at, now())
    RETURNING q.lease_until IS NOT NULL INTO v_leased;
    IF v_leased THEN
        RETURN;
    END IF;
    IF v_run.waiting ? 'sticky' AND v_run.cancel_reason IS NULL
       AND {schema}.hand_off(p_run, v_run.name, v_run.parent_id, v_run.waiting) THEN
        RETURN;
    END IF;
    PERFORM {schema}.announce_ready(p_run, v_run.waiting);
END $$;

-- What a finish implies beyond the finished rows: live children of the runs that failed or
-- were canceled are canceled, and parents are woken (a parent that finished in the same call
-- is terminal now: wake_run leaves it alone).
CREATE OR REPLACE FUNCTION {schema}.finish_consequences(p_failed uuid[], p_parents uuid[])
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_failed IS NOT NULL THEN
        PERFORM {schema}.cancel_tree(c.id, coalesce(p.error->>'message', 'parent ' || p.status))
           FROM {schema}.runs c JOIN {schema}.runs p ON p.id = c.parent_id
          WHERE c.parent_id = ANY (p_failed) AND c.status NOT IN ('done', 'failed', 'canceled');
    END IF;
    IF p_parents IS NOT NULL THEN
        PERFORM {schema}.wake_run(p.id) FROM unnest(p_parents) AS p(id);
    END IF;
END $$;

-- Make runs terminal: the arrays hold, per run, the run, its lease token (NULL: no lease to
-- check), its status, output and error; no run twice. With a lease token the caller must still
-- hold the lease (fencing: a stale worker's completion is a no-op). Returns, per run, its
-- 1-based position and whether it was finished here. Consequences commit with it
-- (finish_consequences), and waiters are notified. finish_run is the one-run form.
CREATE OR REPLACE FUNCTION {schema}.finish_runs(
    p_runs uuid[], p_tokens bigint[], p_statuses text[], p_outputs jsonb[], p_errors jsonb[]
) RETURNS TABLE (ord bigint, finished boolean)
LANGUAGE plpgsql
-- One cached generic plan for the body's statements, whoever calls: a fresh custom plan of
-- this multi-CTE body on every call cost more than running it.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_finished bigint[];
    v_failed uuid[];
    v_parents uuid[];
BEGIN
    -- Lock order is runs rows (by id, so concurrent batches agree), then queue rows, as
    -- deliver_signal and cancel_tree take them: the reverse deadlocks with a signal delivered
    -- while the run finishes.
    PERFORM 1 FROM {schema}.runs WHERE id = ANY (p_runs) ORDER BY id FOR UPDATE;
    WITH x AS (
        SELECT * FROM unnest(p_runs, p_tokens, p_statuses, p_outputs, p_errors)
                 WITH ORDINALITY AS x(run_id, token, status, output, error, pos)
    ), fenced AS (
        -- lease tokens are unique, so a token in the set identifies its run's lease
        DELETE FROM {schema}.queue
         WHERE run_id = ANY (p_runs)
           AND (lease_token = ANY (p_tokens)
                OR run_id = ANY (ARRAY(SELECT x.run_id FROM x WHERE x.token IS NULL)))
        RETURNING run_id
    ), done_here AS (
        UPDATE {schema}.runs r
           SET status = x.status, output = x.output, error = x.error, waiting = NULL,
               updated_at = now(), finished_at = now()
          FROM x
         WHERE r.id = x.run_id AND r.status NOT IN ('done', 'failed', 'canceled')
           AND (x.token IS NULL OR x.run_id = ANY (ARRAY(SELECT f.run_id FROM fenced f)))
        RETURNING r.id, r.parent_id, x.status, x.pos, {schema}.wakeup('d ' || r.id::text)
    )
    SELECT array_agg(d.pos), array_agg(d.id) FILTER (WHERE d.status <> 'done'),
           array_agg(DISTINCT d.parent_id) FILTER (WHERE d.parent_id IS NOT NULL)
      INTO v_finished, v_failed, v_parents
      FROM done_here d;
    PERFORM {schema}.finish_consequences(v_failed, v_parents);
    RETURN QUERY
        SELECT i.pos, i.pos = ANY (coalesce(v_finished, '{}'))
          FROM generate_series(1::bigint, cardinality(p_runs)) AS i(pos);
END $$;

-- Make one run terminal: finish_runs for one run (same fencing, same consequences), with
-- statements on the one key.
CREATE OR REPLACE FUNCTION {schema}.finish_run(
    p_run uuid, p_token bigint, p_status text, p_output jsonb, p_error jsonb
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_parent uuid;
BEGIN
    PERFORM 1 FROM {schema}.runs WHERE id = p_run FOR UPDATE;
    DELETE FROM {schema}.queue WHERE run_id = p_run AND (p_token IS NULL OR lease_token = p_token);
    IF NOT FOUND AND p_token IS NOT NULL THEN
        RETURN false;
    END IF;
    UPDATE {schema}.runs
       SET status = p_status, output = p_output, error = p_error, waiting = NULL,
           updated_at = now(), finished_at = now()
     WHERE id = p_run AND status NOT IN ('done', 'failed', 'canceled')
    RETURNING parent_id INTO v_parent;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM {schema}.wakeup('d ' || p_run::text);
    IF p_status <> 'done' OR v_parent IS NOT NULL THEN
        PERFORM {schema}.finish_consequences(
            CASE WHEN p_status <> 'done' THEN ARRAY[p_run] END,
            CASE WHEN v_parent IS NOT NULL THEN ARRAY[v_parent] END);
    END IF;
    RETURN true;
END $$;

-- Cancel a run and every live descendant. Unleased runs become `canceled` at once; a run
-- leased by a worker keeps running until that worker sees `cancel_reason` (heartbeat or its
-- next write) and finishes it, which fires the step's abort token there. Returns how many
-- runs were canceled or flagged.
CREATE OR REPLACE FUNCTION {schema}.cancel_tree(p_run uuid, p_reason text)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid;
    v_ids uuid[] := '{}';
    v_leased boolean;
BEGIN
    -- every run of the tree is marked before any is finished: a finish wakes its parent,
    -- which must not be handed to its holder as if it were not canceled (hand_off)
    FOR v_id IN
        WITH RECURSIVE tree(id) AS (
            SELECT id FROM {schema}.runs WHERE id = p_run
            UNION ALL
            SELECT c.id FROM {schema}.runs c JOIN tree t ON c.parent_id = t.id
        )
        SELECT r.id FROM {schema}.runs r JOIN tree USING (id)
         WHERE r.status NOT IN ('done', 'failed', 'canceled')
         ORDER BY r.depth DESC
         FOR UPDATE OF r
    LOOP
        UPDATE {schema}.runs SET cancel_reason = coalesce(cancel_reason, p_reason), updated_at = now()
         WHERE id = v_id;
        v_ids := v_ids || v_id;
    END LOOP;
    FOREACH v_id IN ARRAY v_ids LOOP
        SELECT lease_until IS NOT NULL AND lease_until > now() INTO v_leased
          FROM {schema}.queue WHERE run_id = v_id;
        IF coalesce(v_leased, false) THEN
            UPDATE {schema}.queue SET woken = true WHERE run_id = v_id;
        ELSE
            PERFORM {schema}.finish_run(v_id, NULL, 'canceled', NULL,
                jsonb_build_object('code', 'RUN_CANCELED', 'message', coalesce(p_reason, 'canceled'),
                                   'traceback', NULL, 'cause', NULL));
        END IF;
    END LOOP;
    RETURN cardinality(v_ids);
END $$;

-- Park a leased run until `p_wake_at` (NULL = until woken) with a reason a human can read.
-- A wake that arrived during the lease re-queues it at once. p_attempts_delta NULL marks
-- forward progress (sleep, signal and child waits), which resets the poison-pill counter.
CREATE OR REPLACE FUNCTION {schema}.suspend_run(
    p_run uuid, p_token bigint, p_status text, p_waiting jsonb, p_wake_at timestamptz,
    p_attempts_delta integer
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_woken boolean;
BEGIN
    -- runs row first, then queue row: see finish_run
    PERFORM 1 FROM {schema}.runs WHERE id = p_run FOR UPDATE;
    SELECT woken INTO v_woken FROM {schema}.queue
     WHERE run_id = p_run AND lease_token = p_token FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF v_woken OR p_wake_at IS NOT NULL THEN
        UPDATE {schema}.queue
           SET lease_owner = NULL, lease_token = NULL, lease_until = NULL, woken = false,
               ready_at = CASE WHEN v_woken THEN now() ELSE p_wake_at END
         WHERE run_id = p_run;
    ELSE
        DELETE FROM {schema}.queue WHERE run_id = p_run;
    END IF;
    UPDATE {schema}.runs
       SET status = p_status, waiting = p_waiting, updated_at = now(),
           attempts = CASE WHEN p_attempts_delta IS NULL THEN 0 ELSE attempts + p_attempts_delta END
     WHERE id = p_run;
    IF v_woken OR p_wake_at <= now() THEN
        PERFORM {schema}.announce_ready(p_run, p_waiting);  -- (to its holder, when one holds it)
    END IF;
    RETURN true;
END $$;

-- Deliver a signal (docs/signals.md). Locks the run row so delivery and a timeout decision
-- (resolve_signal) serialize: whichever commits first wins, and nothing is lost. A delivery
-- answers `delivered` only when its own payload is the one the waiting run will consume.
CREATE OR REPLACE FUNCTION {schema}.deliver_signal(
    p_run uuid, p_name text, p_payload jsonb, p_key text
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_status text;
    v_waiting jsonb;
    v_last record;
    v_key text;
BEGIN
    SELECT status, waiting INTO v_status, v_waiting FROM {schema}.runs WHERE id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    END IF;
    IF v_status IN ('done', 'failed', 'canceled') THEN
        RETURN 'closed';
    END IF;
    IF p_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM {schema}.signals WHERE run_id = p_run AND idempotency_key = p_key
    ) THEN
        RETURN 'duplicate';
    END IF;
    -- a suspended run lists every signal any of its branches waits for, with the cursor key;
    -- the wait is this payload's only if no earlier payload of that name is still queued
    v_key := CASE WHEN v_status <> 'running' THEN v_waiting->'signals'->>p_name END;
    IF v_key IS NOT NULL AND EXISTS (
        SELECT 1 FROM {schema}.signals WHERE run_id = p_run AND name = p_name AND consumed_at IS NULL
    ) THEN
        INSERT INTO {schema}.signals (run_id, name, payload, idempotency_key)
        VALUES (p_run, p_name, p_payload, p_key);
        RETURN 'buffered';
    END IF;
    IF v_key IS NULL THEN
        SELECT status, error INTO v_last FROM {schema}.steps
         WHERE run_id = p_run AND kind = 'signal' AND name = p_name
         ORDER BY seq DESC LIMIT 1;
        IF FOUND AND v_last.status = 'done' AND v_last.error->>'code' = 'SIGNAL_TIMEOUT' THEN
            RETURN 'expired';
        END IF;
    END IF;
    INSERT INTO {schema}.signals (run_id, name, payload, idempotency_key)
    VALUES (p_run, p_name, p_payload, p_key);
    IF v_key IS NOT NULL THEN
        PERFORM {schema}.wake_run(p_run);  -- (which announces it)
        RETURN 'delivered ' || v_key;
    END IF;
    IF v_status = 'running' THEN
        -- the run may be about to wait for this very name: make its suspend re-queue it
        PERFORM {schema}.wake_run(p_run);
    END IF;
    RETURN 'buffered';
END $$;

-- Consume signals for waits: per wait (the arrays hold its run, cursor key, cursor seq and
-- signal name), the oldest unconsumed signal of that name is consumed and recorded as the
-- wait's final record, unless the wait has one already. Returns the records written; a wait
-- with no signal queued has none. The caller holds the runs' row locks (resolve_signal, the
-- claim), so a delivery serializes with it.
CREATE OR REPLACE FUNCTION {schema}.take_signals(
    p_runs uuid[], p_keys text[], p_seqs integer[], p_names text[]
) RETURNS SETOF {schema}.steps
LANGUAGE plpgsql
-- One cached generic plan for the body's statements, whoever calls: a fresh custom plan of
-- this multi-CTE body on every call cost more than running it (~0.3 ms a call for one run
-- through the pure-Python core, which does not set plan_cache_mode as the Rust writer does).
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY
    WITH x AS (
        SELECT * FROM unnest(p_runs, p_keys, p_seqs, p_names) AS x(run_id, key, seq, name)
    ), pick AS (
        SELECT x.run_id, x.key, x.seq, x.name, g.id AS signal_id, g.payload
          FROM x
         CROSS JOIN LATERAL (
               -- (the check for a final record sits in here so that it is probed by both key
               -- columns; as a join it was planned as a scan of every run's record of that key)
               SELECT u.id, u.payload FROM {schema}.signals u
                WHERE u.run_id = x.run_id AND u.name = x.name AND u.consumed_at IS NULL
                  AND NOT EXISTS (SELECT 1 FROM {schema}.steps d
                                   WHERE d.run_id = x.run_id AND d.key = x.key AND d.status = 'done')
                ORDER BY u.id LIMIT 1) g
    ), used AS (
        UPDATE {schema}.signals u SET consumed_at = now(), consumed_by = pick.key
          FROM pick WHERE u.id = pick.signal_id
    ), got AS (
        INSERT INTO {schema}.steps AS s (run_id, key, seq, kind, name, status, result, finished_at)
        SELECT pick.run_id, pick.key, pick.seq, 'signal', pick.name, 'done', pick.payload, now()
          FROM pick
        ON CONFLICT (run_id, key) DO UPDATE
           SET status = 'done', result = excluded.result, finished_at = now(), deadline = NULL
        RETURNING s.*
    )
    SELECT * FROM got;
END $$;

-- Resolve a signal wait at replay: consume the oldest unconsumed entry of that name, or,
-- when the pinned deadline has passed and none arrived, record the timeout. Returns
-- ('signal', payload), ('timeout', NULL) or ('none', NULL). The stored record is final.
CREATE OR REPLACE FUNCTION {schema}.resolve_signal(
    p_run uuid, p_key text, p_seq integer, p_name text, p_deadline_passed boolean,
    p_timeout_error jsonb, OUT outcome text, OUT payload jsonb, OUT at timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    v_sig record;
BEGIN
    PERFORM 1 FROM {schema}.runs WHERE id = p_run FOR UPDATE;
    at := now();
    SELECT s.status, s.result, s.error, s.finished_at INTO v_sig FROM {schema}.steps s
     WHERE s.run_id = p_run AND s.key = p_key AND s.status = 'done';
    IF FOUND THEN
        outcome := CASE WHEN v_sig.error IS NULL THEN 'signal' ELSE 'timeout' END;
        payload := v_sig.result;
        at := v_sig.finished_at;
        RETURN;
    END IF;
    -- (the row lock above serializes with deliver_signal: nothing is queued meanwhile)
    IF EXISTS (SELECT 1 FROM {schema}.signals
                WHERE run_id = p_run AND name = p_name AND consumed_at IS NULL) THEN
        SELECT t.result INTO v_sig
          FROM {schema}.take_signals(ARRAY[p_run], ARRAY[p_key], ARRAY[p_seq], ARRAY[p_name]) t;
        IF FOUND THEN
            outcome := 'signal';
            payload := v_sig.result;
            RETURN;
        END IF;
    END IF;
    IF p_deadline_passed THEN
        INSERT INTO {schema}.steps (run_id, key, seq, kind, name, status, error, finished_at)
        VALUES (p_run, p_key, p_seq, 'signal', p_name, 'done', p_timeout_error, now())
        ON CONFLICT (run_id, key) DO UPDATE
           SET status = 'done', error = excluded.error, finished_at = now();
        outcome := 'timeout';
    ELSE
        outcome := 'none';
    END IF;
END $$;

-- Retrying a run keeps its key on the queue row it makes.
CREATE OR REPLACE FUNCTION {schema}.retry_run(p_run uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_run record;
BEGIN
    SELECT id, name, priority, status, concurrency_key INTO v_run FROM {schema}.runs WHERE id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'missing';
    END IF;
    IF v_run.status <> 'failed' THEN
        RETURN 'not_failed';
    END IF;
    DELETE FROM {schema}.steps
     WHERE run_id = p_run AND (status <> 'done' OR (error IS NOT NULL AND kind = 'step'));
    UPDATE {schema}.runs
       SET status = 'pending', attempts = 0, error = NULL, output = NULL, finished_at = NULL,
           waiting = NULL, cancel_reason = NULL, updated_at = now()
     WHERE id = p_run;
    INSERT INTO {schema}.queue (run_id, flow_name, priority, ready_at, concurrency_key)
    VALUES (p_run, v_run.name, v_run.priority, now(), coalesce(v_run.concurrency_key, ''))
    ON CONFLICT (run_id) DO UPDATE SET ready_at = now(), lease_owner = NULL, lease_token = NULL,
        lease_until = NULL;
    INSERT INTO {schema}.events (run_id, kind) VALUES (p_run, 'retried');
    PERFORM {schema}.wakeup('q ' || v_run.name);
    RETURN 'queued';
END $$;

-- Pick up to p_n ready runs of the limited flows p_flows, within their limits, and lock them
-- (and their runs rows, as the claim does) for the calling claim, which leases them. Each
-- flow's lock is taken first, in name order, so that this function's statements (each with a
-- snapshot of its own) count every lease committed before: two claims of one limited flow
-- never both take its last place. Among a flow's keys the runs of keys with the fewest
-- executing come first, so a key with 50,000 queued runs and one with 10 both progress;
-- priority, then ready_at, order within that.
CREATE OR REPLACE FUNCTION {schema}.claim_limited(p_flows text[], p_n int)
RETURNS TABLE (run_id uuid, was jsonb, priority int, ready_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('iterflow.flow_control.{schema}.' || f, 0))
       FROM unnest(p_flows) AS f ORDER BY f;
    RETURN QUERY
    WITH RECURSIVE lim AS (
        SELECT l.flow_name, l.concurrency, l.key_concurrency
          FROM {schema}.flow_limits l WHERE l.flow_name = ANY (p_flows)
    ), busy AS (
        SELECT q.flow_name, q.concurrency_key AS k, count(*)::int AS n
          FROM {schema}.queue q
         WHERE q.lease_until IS NOT NULL AND q.flow_name = ANY (p_flows)
         GROUP BY 1, 2
    ), keys AS (
        -- the keys with ready work, one index probe each
        SELECT lim.flow_name,
               (SELECT min(q.concurrency_key) FROM {schema}.queue q
                 WHERE q.flow_name = lim.flow_name AND q.lease_until IS NULL
                   AND q.ready_at <= now()) AS k
          FROM lim
        UNION ALL
        SELECT keys.flow_name,
               (SELECT min(q.concurrency_key) FROM {schema}.queue q
                 WHERE q.flow_name = keys.flow_name AND q.concurrency_key > keys.k
                   AND q.lease_until IS NULL AND q.ready_at <= now())
          FROM keys WHERE keys.k IS NOT NULL
    ), room AS (
        SELECT keys.flow_name, keys.k, coalesce(b.n, 0) AS running,
               LEAST(p_n, coalesce(lim.key_concurrency - coalesce(b.n, 0), p_n),
                     coalesce(lim.concurrency - (SELECT coalesce(sum(a.n), 0)::int FROM busy a
                                                  WHERE a.flow_name = keys.flow_name), p_n)) AS n
          FROM keys JOIN lim ON lim.flow_name = keys.flow_name
          LEFT JOIN busy b ON b.flow_name = keys.flow_name AND b.k = keys.k
         WHERE keys.k IS NOT NULL
    ), cand AS (
        -- read, not locked: only the runs finally picked are locked (below)
        SELECT room.flow_name, room.running, x.run_id, x.priority, x.ready_at,
               row_number() OVER (PARTITION BY room.flow_name, room.k
                                  ORDER BY x.priority DESC, x.ready_at) AS rk
          FROM room CROSS JOIN LATERAL (
                SELECT wq.run_id, wq.priority, wq.ready_at
                  FROM {schema}.queue wq
                 WHERE wq.flow_name = room.flow_name AND wq.concurrency_key = room.k
                   AND wq.lease_until IS NULL AND wq.ready_at <= now()
                 ORDER BY wq.priority DESC, wq.ready_at
                 LIMIT room.n) x
         WHERE room.n > 0
    ), fair AS (
        SELECT cand.*, row_number() OVER (PARTITION BY cand.flow_name
                                          ORDER BY cand.running + cand.rk, cand.priority DESC,
                                                   cand.ready_at) AS fk
          FROM cand
    ), pick AS (
        SELECT fair.run_id, fair.running + fair.rk AS turn, fair.priority, fair.ready_at
          FROM fair JOIN lim ON lim.flow_name = fair.flow_name
         WHERE lim.concurrency IS NULL
            OR fair.fk <= lim.concurrency - (SELECT coalesce(sum(a.n), 0) FROM busy a
                                              WHERE a.flow_name = fair.flow_name)
         ORDER BY fair.running + fair.rk, fair.priority DESC, fair.ready_at
         LIMIT p_n
    )
    -- as the claim locks: the queue and runs rows, a busy one skipped (a signal being
    -- delivered), never waited for
    SELECT wq.run_id, wr.waiting, wq.priority, wq.ready_at
      FROM {schema}.queue wq JOIN {schema}.runs wr ON wr.id = wq.run_id
     WHERE wq.run_id = ANY (ARRAY(SELECT pick.run_id FROM pick)) AND wq.lease_until IS NULL
     FOR UPDATE OF wq, wr SKIP LOCKED;
END $$;

-- A lease counted against a limit that ends (finish, suspend, release, expiry) frees a place:
-- the flow's workers are told at once instead of at their next poll.
CREATE OR REPLACE FUNCTION {schema}.limited_lease_ended() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM {schema}.wakeup('q ' || OLD.flow_name);
    RETURN NULL;
END $$;

CREATE TRIGGER limited_lease_deleted AFTER DELETE ON {schema}.queue
    FOR EACH ROW WHEN (OLD.limited AND OLD.lease_token IS NOT NULL)
    EXECUTE FUNCTION {schema}.limited_lease_ended();
CREATE TRIGGER limited_lease_released AFTER UPDATE OF lease_token ON {schema}.queue
    FOR EACH ROW WHEN (OLD.limited AND OLD.lease_token IS NOT NULL AND NEW.lease_token IS NULL)
    EXECUTE FUNCTION {schema}.limited_lease_ended();

-- Continue a leased run as run p_new of the same flow and version, with input p_input. In one
-- transaction: the run ends `done` with no output and `continued_to = p_new`, and p_new starts
-- (pending, queued now, `continued_from = p_run`) with the run's tags, priority, parent, depth
-- and cancel request; the idempotency key moves to p_new, so a start with that key finds the
-- chain's live run; a parent waiting on the run (its `waiting` invoke record) waits on p_new.
-- Fenced by the lease token like finish_runs: a stale worker changes nothing (false). A repeat
-- of a call that committed (its answer lost) finds p_new made already and answers true again.
CREATE OR REPLACE FUNCTION {schema}.continue_run(
    p_run uuid, p_token bigint, p_new uuid, p_input jsonb
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_run record;
BEGIN
    -- runs row first, then queue row: see finish_runs
    SELECT * INTO v_run FROM {schema}.runs WHERE id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF v_run.continued_to IS NOT NULL THEN
        RETURN v_run.continued_to = p_new;
    END IF;
    IF v_run.status IN ('done', 'failed', 'canceled') THEN
        RETURN false;
    END IF;
    DELETE FROM {schema}.queue WHERE run_id = p_run AND lease_token = p_token;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    -- the key leaves this run before the successor takes it (the unique index is immediate)
    UPDATE {schema}.runs
       SET status = 'done', output = NULL, error = NULL, waiting = NULL, idempotency_key = NULL,
           continued_to = p_new, updated_at = now(), finished_at = now()
     WHERE id = p_run;
    INSERT INTO {schema}.runs (id, name, version, idempotency_key, status, input, tags, priority,
                               parent_id, depth, cancel_reason, continued_from, concurrency_key)
    VALUES (p_new, v_run.name, v_run.version, v_run.idempotency_key, 'pending', p_input,
            v_run.tags, v_run.priority, v_run.parent_id, v_run.depth, v_run.cancel_reason, p_run,
            v_run.concurrency_key);
    INSERT INTO {schema}.queue (run_id, flow_name, priority, ready_at, concurrency_key)
    VALUES (p_new, v_run.name, v_run.priority, now(), coalesce(v_run.concurrency_key, ''));
    IF v_run.parent_id IS NOT NULL THEN
        UPDATE {schema}.steps SET child_id = p_new
         WHERE run_id = v_run.parent_id AND child_id = p_run AND status = 'waiting';
    END IF;
    PERFORM {schema}.wakeup('d ' || p_run::text), {schema}.wakeup('q ' || v_run.name);
    RETURN true;
END $$;

-- Take a permit of limit p_limit for key p_key (at most p_max held at once) for step p_step of
-- run p_run under its lease p_token; a NULL p_key is the run's key (runs.concurrency_key,
-- migration 0008; '' without one). Concurrent acquires of one (limit, key) are serialized by
-- a transaction-level advisory lock on that pair only; each statement below reads after the
-- lock (plpgsql takes a snapshot per statement), so it sees every permit committed before.
-- Permits whose lease is gone are deleted on the way. A repeat by the same holder is granted
-- again (its first answer may have been lost). Denied: wait_ms is how long until the
-- earliest holder's lease runs out (the waiter's timer if no release is heard before).
-- permit_key: the key counted under.
CREATE OR REPLACE FUNCTION {schema}.acquire_permit(p_limit text, p_key text, p_run uuid, p_step text,
                                                  p_token bigint, p_max int)
RETURNS TABLE (granted boolean, wait_ms double precision, permit_key text)
LANGUAGE plpgsql AS $$
DECLARE
    v_key text := p_key;
    v_held int;
    v_until timestamptz;
BEGIN
    IF v_key IS NULL THEN
        v_key := coalesce((SELECT r.concurrency_key FROM {schema}.runs r WHERE r.id = p_run), '');
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('{schema_raw}.step_permits'), hashtext(p_limit || chr(31) || v_key));
    DELETE FROM {schema}.step_permits p
     WHERE p.limit_name = p_limit AND p.key = v_key
       AND NOT EXISTS (SELECT 1 FROM {schema}.queue q
                        WHERE q.run_id = p.run_id AND q.lease_token = p.lease_token AND q.lease_until > now());
    SELECT count(*) FILTER (WHERE NOT (p.run_id = p_run AND p.step_key = p_step)), min(q.lease_until)
      INTO v_held, v_until
      FROM {schema}.step_permits p JOIN {schema}.queue q ON q.run_id = p.run_id
     WHERE p.limit_name = p_limit AND p.key = v_key;
    IF v_held < p_max THEN
        INSERT INTO {schema}.step_permits AS p (limit_name, key, run_id, step_key, lease_token)
        VALUES (p_limit, v_key, p_run, p_step, p_token)
        ON CONFLICT ON CONSTRAINT step_permits_pkey
        DO UPDATE SET lease_token = excluded.lease_token, acquired_at = now();
        RETURN QUERY SELECT true, NULL::double precision, v_key;
    ELSE
        RETURN QUERY SELECT false, greatest(extract(epoch FROM v_until - now()) * 1000, 0)::double precision, v_key;
    END IF;
END $$;

-- Take one call of rate limit p_limit for key p_key (NULL: the run p_run's key, as in
-- acquire_permit): a GCRA with emission interval p_interval_ms and a burst of p_burst calls.
-- The call reserves the earliest slot the rate allows: granted with wait_ms > 0 means "go in
-- wait_ms" (the slot is yours; nothing to ask again). A slot further away than p_horizon_ms
-- is not reserved: denied, wait_ms is how long until one would be. The row lock of the
-- (limit, key) serializes callers of that pair only.
CREATE OR REPLACE FUNCTION {schema}.take_rate(p_limit text, p_key text, p_run uuid, p_interval_ms double precision,
                                             p_burst int, p_horizon_ms double precision)
RETURNS TABLE (granted boolean, wait_ms double precision)
LANGUAGE plpgsql AS $$
DECLARE
    v_key text := p_key;
    v_t interval := p_interval_ms * interval '1 millisecond';
    v_tat timestamptz;
    v_now timestamptz;
    v_at timestamptz;
BEGIN
    IF v_key IS NULL THEN
        v_key := coalesce((SELECT r.concurrency_key FROM {schema}.runs r WHERE r.id = p_run), '');
    END IF;
    SELECT r.tat INTO v_tat FROM {schema}.rate_limits r
     WHERE r.limit_name = p_limit AND r.key = v_key FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO {schema}.rate_limits (limit_name, key, tat) VALUES (p_limit, v_key, '-infinity')
        ON CONFLICT DO NOTHING;
        SELECT r.tat INTO v_tat FROM {schema}.rate_limits r
         WHERE r.limit_name = p_limit AND r.key = v_key FOR UPDATE;
    END IF;
    v_now := clock_timestamp();  -- after the lock: now() may be long past
    v_tat := greatest(v_tat, v_now);
    v_at := v_tat + v_t - p_burst * v_t;  -- when this call conforms
    IF v_at - v_now > p_horizon_ms * interval '1 millisecond' THEN
        RETURN QUERY SELECT false,
            (extract(epoch FROM v_at - v_now) * 1000 - p_horizon_ms)::double precision;
        RETURN;
    END IF;
    UPDATE {schema}.rate_limits r SET tat = v_tat + v_t WHERE r.limit_name = p_limit AND r.key = v_key;
    RETURN QUERY SELECT true, greatest(extract(epoch FROM v_at - v_now) * 1000, 0)::double precision;
END $$;

-- Start run p_id of p_name@p_version debounced by p_key: while a run of that flow, version
-- and key has not begun (pending, never claimed, not leased), its input becomes p_input and
-- its start moves to now + p_window_ms (trailing edge), and that run is the answer
-- (created: false); otherwise p_id is created, with p_key as its key (concurrency_key too,
-- migration 0008), to begin after the window. Debounced starts of one (flow, version, key)
-- are serialized by an advisory lock on it; the runs row is locked before the queue row, as
-- deliver_signal and cancel_tree do, and a claim skips locked rows.
-- A repeat of a start whose commit landed unacknowledged finds its own run (created: true).
CREATE OR REPLACE FUNCTION {schema}.debounce_start(p_id uuid, p_name text, p_version int, p_key text,
                                                  p_input jsonb, p_tags text[], p_priority int,
                                                  p_window_ms bigint)
RETURNS TABLE (run_id uuid, status text, created boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_run uuid;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('{schema_raw}.debounce'),
                                  hashtext(p_name || chr(31) || p_version::text || chr(31) || p_key));
    SELECT r.id INTO v_run FROM {schema}.runs r
     WHERE r.name = p_name AND r.version = p_version AND r.debounce_key = p_key
       AND r.status = 'pending' AND r.attempts = 0
     ORDER BY r.created_at DESC LIMIT 1
       FOR UPDATE;
    IF FOUND THEN
        PERFORM 1 FROM {schema}.queue q WHERE q.run_id = v_run AND q.lease_owner IS NULL FOR UPDATE;
        IF FOUND THEN
            UPDATE {schema}.runs r SET input = p_input, updated_at = now() WHERE r.id = v_run;
            UPDATE {schema}.queue q SET ready_at = now() + p_window_ms * interval '1 millisecond'
             WHERE q.run_id = v_run;
            RETURN QUERY SELECT v_run, 'pending'::text, v_run = p_id;
            RETURN;
        END IF;
    END IF;
    INSERT INTO {schema}.runs (id, name, version, status, input, tags, priority, concurrency_key, debounce_key)
    VALUES (p_id, p_name, p_version, 'pending', p_input, coalesce(p_tags, '{}'), p_priority, p_key, p_key)
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        INSERT INTO {schema}.queue (run_id, flow_name, priority, ready_at, concurrency_key)
        VALUES (p_id, p_name, p_priority, now() + p_window_ms * interval '1 millisecond', p_key);
    END IF;
    RETURN QUERY SELECT r.id, r.status, true FROM {schema}.runs r WHERE r.id = p_id;
END $$;
