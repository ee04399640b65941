-- iterflow schema, version 11: continue-as-new (ctx.continue_as_new, docs/guide.md). Idempotent,
-- like every migration.
--
-- A run that should loop forever ends its run and starts a fresh one of the same flow and
-- version, with a new input and an empty history, in one transaction (continue_run), so a
-- crash can never leave two successors or none. The two runs point at each other:
-- `continued_to` on the run that ended, `continued_from` on its successor; result() of any run
-- of the chain follows `continued_to` to the chain's last run.

ALTER TABLE {schema}.runs ADD COLUMN IF NOT EXISTS continued_from uuid;
ALTER TABLE {schema}.runs ADD COLUMN IF NOT EXISTS continued_to uuid;

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

INSERT INTO {schema}.schema_version (version) VALUES (11) ON CONFLICT DO NOTHING;
