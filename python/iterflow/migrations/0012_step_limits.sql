-- iterflow schema, version 12: per-step limits (fleet-wide permits and rates) and debounced
-- starts (docs/guide.md, "Flow control"). Idempotent, like every migration.
--
--   * step_permits: one row per step call holding a permit of a concurrency limit. A permit
--     lives as long as its holder's lease: it counts only while the queue row of its run
--     still carries the lease token it was taken under, unexpired. A dead worker's permits
--     therefore come back when its lease expires, with nothing to renew beside the lease.
--   * rate_limits: one GCRA row (theoretical arrival time) per rate-limited (limit, key).
--   * runs.debounce_key: the key of a debounced start; a later debounced start of the same
--     flow, version and key replaces the input of the run while it has not begun.
-- The limits themselves are configuration (create_engine(step_limits=...)), not rows.

ALTER TABLE {schema}.runs ADD COLUMN IF NOT EXISTS debounce_key text;
-- name, version and debounce_key never change once written: live runs stay HOT-updatable
CREATE INDEX IF NOT EXISTS runs_debounce
    ON {schema}.runs (name, version, debounce_key) WHERE debounce_key IS NOT NULL;

CREATE TABLE IF NOT EXISTS {schema}.step_permits (
    limit_name  text        NOT NULL,
    key         text        NOT NULL,
    run_id      uuid        NOT NULL,
    step_key    text        NOT NULL,
    lease_token bigint      NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (limit_name, key, run_id, step_key)
);

CREATE TABLE IF NOT EXISTS {schema}.rate_limits (
    limit_name text        NOT NULL,
    key        text        NOT NULL,
    tat        timestamptz NOT NULL,
    PRIMARY KEY (limit_name, key)
);

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

INSERT INTO {schema}.schema_version (version) VALUES (12) ON CONFLICT DO NOTHING;
