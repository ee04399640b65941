-- iterflow schema, version 14: a held run woken by another transaction is handed to its
-- holder in that transaction. Idempotent, like every migration.
--
-- Until now a woken held run was announced to its holder (`h ...`, migration 0013), which then
-- claimed it by id (claim_runs): a second round trip, about as long as the first, between a
-- signal's delivery and the resumed step. Now, when the holder asked for it (its mark
-- `waiting.sticky` carries `hand`: it listens, so the notice reaches it), wake_run does what
-- that claim would have done, in the waking transaction: it leases the run to the holder,
-- takes the signals it waits for, closes its sleeps that are over, and sends the outcome in
-- the notice itself: `H <run id> <held token> <owner> <json>` (docs/replay.md, "Handoff").
-- The holder resumes the body from the notice alone, then extends the lease, which is only
-- `hand` ms long: a holder that died just before leaves the run to the fleet about as soon
-- as its sticky window would have.
--
-- Not handed off (announced with `h` as before): a canceled run, a run of a flow with limits
-- (it waits for its place, see claim_limited), a run whose holder's registry row is stale
-- (the worker is gone), and a run whose holder did not ask.

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

-- Lease a woken held run (id, flow, parent, `waiting`) to the worker holding it, as
-- claim_runs would, and send it the records of the keys its body waits on
-- (`waiting.sticky.keys`). Returns false, having written nothing, when the run is not to be
-- handed off. Called by wake_run, with the run's rows locked, for a run not canceled.
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

-- wake_run: as in migration 0013, but a held run whose holder asked for it is handed off.
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

-- cancel_tree: as in migration 0001, but every run of the tree is marked canceled before the
-- first is finished, so that the wake-up a finish sends its parent sees the mark (a parent
-- handed to its holder unmarked would go on as if it were not canceled).
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

INSERT INTO {schema}.schema_version (version) VALUES (14) ON CONFLICT DO NOTHING;
