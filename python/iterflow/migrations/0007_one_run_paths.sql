-- iterflow schema, version 7: the one-run paths of a run's finish and a signal wait are
-- as cheap as before version 6. Idempotent, like every migration.
--
-- Version 6 made finish_run and resolve_signal thin calls of the set-based finish_runs and
-- take_signals. For one run a set-based body costs the server ~0.1 ms more per call (its
-- statements build and join arrays, its generic plans cannot use the one key), and every run
-- pays it once per finish and once per signal wait: the signal round trip of the pure-Python
-- core became measurably slower under load (docs/benchmarks.md, issue 14). Now:
--   * finish_run makes one run terminal with one-key statements; what follows a finish (a
--     failed run's live children canceled, parents woken) is finish_consequences, which
--     finish_runs calls too, so it is written once. tests/test_transitions.py runs both
--     forms over the same cases and requires the same rows.
--   * resolve_signal calls take_signals only when a signal of that name is queued: a wait
--     reached before its signal (the common first pass) no longer runs the consuming body.
--   * waking is wake_run again, one statement on the one key (a signal's delivery wakes one
--     run, and the call through wake_runs cost ~0.1 ms); wake_runs is gone, and a finish
--     wakes its few distinct parents one by one.

-- Wake a live run now: a signal arrived, a child finished, or a run was canceled. Works
-- whether or not the run is queued or leased (a leased run sees `woken` when it suspends).
CREATE OR REPLACE FUNCTION {schema}.wake_run(p_run uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {schema}.queue AS q (run_id, flow_name, priority, ready_at, woken)
    SELECT r.id, r.name, r.priority, now(), true FROM {schema}.runs r
     WHERE r.id = p_run AND r.status NOT IN ('done', 'failed', 'canceled')
    ON CONFLICT (run_id) DO UPDATE SET woken = true, ready_at = LEAST(q.ready_at, now());
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

DROP FUNCTION IF EXISTS {schema}.wake_runs(uuid[]);

INSERT INTO {schema}.schema_version (version) VALUES (7) ON CONFLICT DO NOTHING;
