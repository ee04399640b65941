-- iterflow schema, version 8: flow control across a fleet (docs/guide.md, "Flow control").
-- Idempotent, like every migration.
--
-- A run may carry a key (`start(..., key=...)`, or the flow's key function), kept on the run
-- and on its queue row. Each flow's limits are configuration, written by every worker that
-- serves the flow when it starts (flow_limits; the last worker started wins): at most
-- `concurrency` runs of the flow executing at once fleet-wide, at most `key_concurrency` per
-- key, and claims that rotate among keys (a keyed flow is claimed fairly even without
-- limits). Executing means leased: a run that suspends, finishes or loses its lease (a dead
-- worker's lease expires and is swept) frees its place, and nothing else needs releasing.
-- The claim counts leases of such flows in claim_limited, under a transaction-scoped lock per
-- flow (never one lock for the fleet, and none for flows without limits).

ALTER TABLE {schema}.runs ADD COLUMN IF NOT EXISTS concurrency_key text;
ALTER TABLE {schema}.queue ADD COLUMN IF NOT EXISTS concurrency_key text NOT NULL DEFAULT '';
-- set by the claim on a lease counted against a limit: releasing it announces the free place
ALTER TABLE {schema}.queue ADD COLUMN IF NOT EXISTS limited boolean NOT NULL DEFAULT false;

CREATE TABLE IF NOT EXISTS {schema}.flow_limits (
    flow_name       text PRIMARY KEY,
    concurrency     int,
    key_concurrency int,
    -- claimed through claim_limited: any limit, or a keyed flow (fair rotation among keys)
    limited         boolean     NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- ready runs of a flow by key, in claim order (claim_limited's per-key picks and its walk over
-- the keys that have ready work)
CREATE INDEX IF NOT EXISTS queue_ready_key
    ON {schema}.queue (flow_name, concurrency_key, priority DESC, ready_at) WHERE lease_until IS NULL;
-- leases per flow and key (claim_limited's count of what is executing)
CREATE INDEX IF NOT EXISTS queue_leased_key
    ON {schema}.queue (flow_name, concurrency_key) WHERE lease_until IS NOT NULL;

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

DROP TRIGGER IF EXISTS limited_lease_deleted ON {schema}.queue;
CREATE TRIGGER limited_lease_deleted AFTER DELETE ON {schema}.queue
    FOR EACH ROW WHEN (OLD.limited AND OLD.lease_token IS NOT NULL)
    EXECUTE FUNCTION {schema}.limited_lease_ended();
DROP TRIGGER IF EXISTS limited_lease_released ON {schema}.queue;
CREATE TRIGGER limited_lease_released AFTER UPDATE OF lease_token ON {schema}.queue
    FOR EACH ROW WHEN (OLD.limited AND OLD.lease_token IS NOT NULL AND NEW.lease_token IS NULL)
    EXECUTE FUNCTION {schema}.limited_lease_ended();

-- Waking a run keeps its key on the queue row it makes.
CREATE OR REPLACE FUNCTION {schema}.wake_run(p_run uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {schema}.queue AS q (run_id, flow_name, priority, ready_at, woken, concurrency_key)
    SELECT r.id, r.name, r.priority, now(), true, coalesce(r.concurrency_key, '') FROM {schema}.runs r
     WHERE r.id = p_run AND r.status NOT IN ('done', 'failed', 'canceled')
    ON CONFLICT (run_id) DO UPDATE SET woken = true, ready_at = LEAST(q.ready_at, now());
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

INSERT INTO {schema}.schema_version (version) VALUES (8) ON CONFLICT DO NOTHING;
