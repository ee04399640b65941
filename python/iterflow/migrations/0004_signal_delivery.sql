-- iterflow schema, version 4: a delivery answers `delivered` only when its own payload is the
-- one the waiting run will consume. Idempotent, like every migration.
--
-- `runs.waiting` names the signals a suspended run waits for, and a delivery of one of those
-- names answered `delivered` and woke the run. But while an earlier signal of that name is
-- still unconsumed (delivered a moment ago, the run not yet resumed), that earlier payload is
-- the one the wait takes (single consumer, oldest first): a second delivery was also told
-- `delivered` although the run would resume with the first payload, and the second stays in
-- the inbox for a later wait, if any. It is now `buffered`, which is what happens to it.

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

INSERT INTO {schema}.schema_version (version) VALUES (4) ON CONFLICT DO NOTHING;
