-- iterflow schema, version 2: wake-up notifications can be deferred past the commit.
-- Idempotent, like every migration.
--
-- A transaction that sends NOTIFY holds one database-wide lock from its commit until its WAL
-- flush is done, so notifying commits serialize: with synchronous_commit=on that caps the
-- commit rate of every process sharing the database at one flush each. The transition
-- functions now send their wake-ups through wakeup(): by default it is pg_notify, as before;
-- a transaction that sets `iterflow.defer_notify` to `on` (SET LOCAL) collects them instead
-- in `iterflow.notify` (records separated by chr(30)), reads them before COMMIT and sends
-- them after it, in a transaction of their own that changes no data and so need not wait for
-- a flush (the Rust core's group-commit writer does this). Notifications stay hints: a
-- deferred one lost to a crash between the two commits is made up for by the workers' poll.

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

-- Make a run terminal. With a lease token the caller must still hold the lease (fencing:
-- a stale worker's completion is a no-op and returns false). Consequences commit with it:
-- the parent is woken, live children of a failed/canceled run are canceled, waiters notified.
CREATE OR REPLACE FUNCTION {schema}.finish_run(
    p_run uuid, p_token bigint, p_status text, p_output jsonb, p_error jsonb
) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_parent uuid;
BEGIN
    -- Lock order is runs row, then queue row (as deliver_signal and cancel_tree take them):
    -- the reverse deadlocks with a signal delivered while the run finishes.
    PERFORM 1 FROM {schema}.runs WHERE id = p_run FOR UPDATE;
    IF p_token IS NOT NULL THEN
        DELETE FROM {schema}.queue WHERE run_id = p_run AND lease_token = p_token;
        IF NOT FOUND THEN
            RETURN false;
        END IF;
    ELSE
        DELETE FROM {schema}.queue WHERE run_id = p_run;
    END IF;
    UPDATE {schema}.runs
       SET status = p_status, output = p_output, error = p_error, waiting = NULL,
           updated_at = now(), finished_at = now()
     WHERE id = p_run AND status NOT IN ('done', 'failed', 'canceled')
    RETURNING parent_id INTO v_parent;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    IF p_status <> 'done' THEN
        PERFORM {schema}.cancel_tree(id, coalesce(p_error->>'message', 'parent ' || p_status))
           FROM {schema}.runs WHERE parent_id = p_run AND status NOT IN ('done', 'failed', 'canceled');
    END IF;
    IF v_parent IS NOT NULL THEN
        PERFORM {schema}.wake_run(v_parent);
    END IF;
    PERFORM {schema}.wakeup('d ' || p_run::text);
    RETURN true;
END $$;

-- Park a leased run until `p_wake_at` (NULL = until woken) with a reason a human can read.
-- A wake that arrived during the lease re-queues it at once. p_reset_attempts marks forward
-- progress (sleep, signal and child waits), which resets the poison-pill counter.
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
        PERFORM {schema}.wakeup('q ' || (SELECT name FROM {schema}.runs WHERE id = p_run));
    END IF;
    RETURN true;
END $$;

-- Deliver a signal (docs/signals.md). Locks the run row so delivery and a timeout decision
-- (resolve_signal) serialize: whichever commits first wins, and nothing is lost.
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
    -- a suspended run lists every signal any of its branches waits for, with the cursor key
    v_key := CASE WHEN v_status <> 'running' THEN v_waiting->'signals'->>p_name END;
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
        PERFORM {schema}.wake_run(p_run);
        PERFORM {schema}.wakeup('q ' || (SELECT name FROM {schema}.runs WHERE id = p_run));
        RETURN 'delivered ' || v_key;
    END IF;
    IF v_status = 'running' THEN
        -- the run may be about to wait for this very name: make its suspend re-queue it
        PERFORM {schema}.wake_run(p_run);
    END IF;
    RETURN 'buffered';
END $$;

-- Put a failed run back to work (engine.retry, docs/guide.md §3): successful records kept, failed ones dropped.
CREATE OR REPLACE FUNCTION {schema}.retry_run(p_run uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_run record;
BEGIN
    SELECT id, name, priority, status INTO v_run FROM {schema}.runs WHERE id = p_run FOR UPDATE;
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
    INSERT INTO {schema}.queue (run_id, flow_name, priority, ready_at)
    VALUES (p_run, v_run.name, v_run.priority, now())
    ON CONFLICT (run_id) DO UPDATE SET ready_at = now(), lease_owner = NULL, lease_token = NULL,
        lease_until = NULL;
    INSERT INTO {schema}.events (run_id, kind) VALUES (p_run, 'retried');
    PERFORM {schema}.wakeup('q ' || v_run.name);
    RETURN 'queued';
END $$;

INSERT INTO {schema}.schema_version (version) VALUES (2) ON CONFLICT DO NOTHING;
