-- iterflow schema, version 13: a woken run is announced, to the worker that holds it when one
-- does. Idempotent, like every migration.
--
--   * wake_run (a signal arrived, a child finished, a reconcile found a stranded parent) made
--     a suspended run ready without a notification: a worker in another process found it at
--     its next poll, so a parent whose child finished elsewhere resumed up to a poll interval
--     late. Now a run that is not leased is announced as it is woken: `q <flow>` (new work of
--     that flow), or, when a worker holds the run in its sticky cache (`waiting.sticky`),
--     `h <run id> <lease token> <owner>` instead. The holder claims the run by id (claim_run:
--     no history, no replay); other workers are not woken, as their claims would leave the
--     run to its holder for the sticky window anyway (docs/replay.md, "Sticky execution").
--     A leased run is not announced: its worker sees `woken` when it suspends.
--   * deliver_signal no longer sends its own `q` after wake_run.
--   * suspend_run announces a run it makes ready at once (woken during its lease, or a wake-up
--     time already past) the same way: `h ...` to the worker that holds it, else `q <flow>`.

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

CREATE OR REPLACE FUNCTION {schema}.wake_run(p_run uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_run record;
    v_leased boolean;
BEGIN
    SELECT id, name, priority, concurrency_key, waiting INTO v_run FROM {schema}.runs
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
    PERFORM {schema}.announce_ready(p_run, v_run.waiting);
END $$;

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

INSERT INTO {schema}.schema_version (version) VALUES (13) ON CONFLICT DO NOTHING;
