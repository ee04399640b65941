-- iterflow schema, version 6: each transition is written once. Idempotent, like every migration.
--
-- Finishing a run was written twice: the finish_run function, and a statement of its own for
-- the Rust core's group commit (finish_run_many in queries.sql) that repeated it for many runs
-- at once, wake_run's insert included. Consuming a signal was written twice too: in
-- resolve_signal, and in the claim (claim_with_history), which consumes the signals a woken
-- run waits for. Now each has one definition, for many rows, whose one-row use is the old
-- function: finish_runs (finish_run; finish_run_many calls it), wake_runs (wake_run) and
-- take_signals (resolve_signal calls it for one wait, the claim for every wait of the runs it
-- claims). Behaviour is unchanged.

-- Wake live runs now: a signal arrived, a child finished, or a run was canceled. Works
-- whether or not a run is queued or leased (a leased run sees `woken` when it suspends).
CREATE OR REPLACE FUNCTION {schema}.wake_runs(p_runs uuid[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {schema}.queue AS q (run_id, flow_name, priority, ready_at, woken)
    SELECT r.id, r.name, r.priority, now(), true FROM {schema}.runs r
     WHERE r.id = ANY (p_runs) AND r.status NOT IN ('done', 'failed', 'canceled')
    ON CONFLICT (run_id) DO UPDATE SET woken = true, ready_at = LEAST(q.ready_at, now());
END $$;

-- Wake one live run: wake_runs for one run.
CREATE OR REPLACE FUNCTION {schema}.wake_run(p_run uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM {schema}.wake_runs(ARRAY[p_run]);
END $$;

-- Make runs terminal: the arrays hold, per run, the run, its lease token (NULL: no lease to
-- check), its status, output and error; no run twice. With a lease token the caller must still
-- hold the lease (fencing: a stale worker's completion is a no-op). Returns, per run, its
-- 1-based position and whether it was finished here. Consequences commit with it: live
-- children of a run that failed or was canceled are canceled, parents are woken, waiters
-- notified.
CREATE OR REPLACE FUNCTION {schema}.finish_runs(
    p_runs uuid[], p_tokens bigint[], p_statuses text[], p_outputs jsonb[], p_errors jsonb[]
) RETURNS TABLE (ord bigint, finished boolean)
LANGUAGE plpgsql
-- One cached generic plan for the body's statements, whoever calls: a fresh custom plan of
-- this multi-CTE body on every call cost more than running it (~0.3 ms a call for one run
-- through the pure-Python core, which does not set plan_cache_mode as the Rust writer does).
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
    IF v_failed IS NOT NULL THEN
        PERFORM {schema}.cancel_tree(c.id, coalesce(p.error->>'message', 'parent ' || p.status))
           FROM {schema}.runs c JOIN {schema}.runs p ON p.id = c.parent_id
          WHERE c.parent_id = ANY (v_failed) AND c.status NOT IN ('done', 'failed', 'canceled');
    END IF;
    IF v_parents IS NOT NULL THEN
        -- a parent that finished here too is terminal now: wake_runs leaves it alone
        PERFORM {schema}.wake_runs(v_parents);
    END IF;
    RETURN QUERY
        SELECT i.pos, i.pos = ANY (coalesce(v_finished, '{}'))
          FROM generate_series(1::bigint, cardinality(p_runs)) AS i(pos);
END $$;

-- Make one run terminal: finish_runs for one run.
CREATE OR REPLACE FUNCTION {schema}.finish_run(
    p_run uuid, p_token bigint, p_status text, p_output jsonb, p_error jsonb
) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RETURN (SELECT f.finished
              FROM {schema}.finish_runs(ARRAY[p_run], ARRAY[p_token], ARRAY[p_status],
                                        ARRAY[p_output], ARRAY[p_error]) f);
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
    SELECT t.result INTO v_sig
      FROM {schema}.take_signals(ARRAY[p_run], ARRAY[p_key], ARRAY[p_seq], ARRAY[p_name]) t;
    IF FOUND THEN
        outcome := 'signal';
        payload := v_sig.result;
    ELSIF p_deadline_passed THEN
        INSERT INTO {schema}.steps (run_id, key, seq, kind, name, status, error, finished_at)
        VALUES (p_run, p_key, p_seq, 'signal', p_name, 'done', p_timeout_error, now())
        ON CONFLICT (run_id, key) DO UPDATE
           SET status = 'done', error = excluded.error, finished_at = now();
        outcome := 'timeout';
    ELSE
        outcome := 'none';
    END IF;
END $$;

INSERT INTO {schema}.schema_version (version) VALUES (6) ON CONFLICT DO NOTHING;
