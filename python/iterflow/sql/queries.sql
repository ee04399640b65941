-- Every statement both cores send, by name. `{schema}` is the quoted schema name,
-- `{schema_raw}` the validated bare name; parameters are native $n placeholders. The comment
-- lines that open an entry document it and are not sent (sql.py, queries.rs); the rest of its
-- text is sent as it stands. The code adds only bare transaction control (BEGIN, COMMIT,
-- ROLLBACK, or psycopg's own); the tables and the functions these statements call are in
-- schema.sql (built by the migrations).

-- name: schema_version
SELECT coalesce(max(version), 0) FROM {schema}.schema_version

-- name: insert_runs
-- $1: jsonb array of run specs. Returns only the rows this statement created; callers
-- look up the rest (idempotent repeats) with find_existing_runs.
WITH x AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS x(
        ord int, id uuid, name text, version int, idempotency_key text, input jsonb,
        tags text[], priority int, parent_id uuid, parent_key text, depth int, delay_ms bigint,
        concurrency_key text)
), ins AS (
    INSERT INTO {schema}.runs (id, name, version, idempotency_key, status, input, tags, priority,
                               parent_id, parent_key, depth, concurrency_key)
    SELECT id, name, version, idempotency_key, 'pending', input, coalesce(tags, '{}'), priority,
           parent_id, parent_key, depth, concurrency_key
      FROM x ORDER BY ord
    ON CONFLICT DO NOTHING
    RETURNING id
), q AS (
    INSERT INTO {schema}.queue (run_id, flow_name, priority, ready_at, concurrency_key)
    SELECT x.id, x.name, x.priority, now() + x.delay_ms * interval '1 millisecond',
           coalesce(x.concurrency_key, '')
      FROM x JOIN ins ON ins.id = x.id
)
SELECT x.ord, x.id, x.name FROM x JOIN ins ON ins.id = x.id

-- name: find_existing_runs
-- $1: jsonb array of {ord, id, name, version, idempotency_key, parent_id, parent_key}
-- A run is found by its idempotency key, as the child of its parent's call, or by its own id:
-- a start retried after its commit landed unacknowledged (the connection dropped) finds the
-- row it wrote itself.
SELECT x.ord, r.id, r.status
  FROM jsonb_to_recordset($1::jsonb) AS x(ord int, id uuid, name text, version int,
                                          idempotency_key text, parent_id uuid, parent_key text)
  JOIN {schema}.runs r
    ON (x.idempotency_key IS NOT NULL AND r.name = x.name AND r.version = x.version
        AND r.idempotency_key = x.idempotency_key)
    OR (x.parent_id IS NOT NULL AND r.parent_id = x.parent_id AND r.parent_key = x.parent_key)
    OR (x.id IS NOT NULL AND r.id = x.id)

-- name: listen
-- The one statement of each core's LISTEN connection: the schema's channel carries wake-ups
-- (`q <flow>`), finishes (`d <run id>`), progress of watched runs (`p <run id>`) and permits
-- given back (`l <limit>`, `l <limit> <key>`: release_permit).
LISTEN "iterflow.{schema_raw}"

-- name: relay_notify
-- Wake-ups (`q <flow>`, `d <run id>`) sent after the commit of the work they announce (the
-- Rust core's outbox relay, the Python core's starts).
-- This transaction changes no data, so it commits without waiting for a WAL flush: that wait
-- would hold the lock every notifying commit of the database takes in turn.
SELECT set_config('synchronous_commit', 'off', true), pg_notify('iterflow.{schema_raw}', p)
  FROM unnest($1::text[]) AS p

-- name: batch_begin
-- Opens every transaction of the Rust core's group-commit writer (writer.rs), in one round
-- trip with whichever of batch_defer_notify and batch_skip_flush apply (joined by "; ").
-- Its statements find rows by key, so they run on cached generic plans that must never scan
-- a table. plan_cache_mode = force_generic_plan: under the default mode the claim (whose
-- LIMIT a generic plan cannot see) and the multi-row statements (whose array lengths it
-- cannot see) would be planned again on every execution, which costs more than running them.
-- enable_seqscan = off: a plan is cached when a connection first runs its statement (perhaps
-- while the tables were nearly empty) and kept until the next ANALYZE, while the tables grow.
BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off

-- name: batch_defer_notify
-- Appended to batch_begin by a writer with an outbox (outbox.rs): wakeup() collects the
-- transaction's wake-ups in `iterflow.notify` instead of sending them (migration 0002), and
-- the relay sends them after the commit (relay_notify), so the commit does not hold the
-- database-wide notify lock through its WAL flush.
SET LOCAL iterflow.defer_notify = on

-- name: batch_skip_flush
-- Appended to batch_begin for a batch of claims only. A claim is the one write that need not
-- be durable when it resolves: if a crash loses it, the run is simply claimed again (at least
-- once), and any durable commit after it (the run's first step record, a delivery that saw
-- it) flushes it too, the WAL being one sequence. Skipping the flush wait takes a WAL flush
-- off the critical path of every start and wake-up.
SET LOCAL synchronous_commit = off

-- name: batch_collected
-- Read just before a deferring writer's COMMIT: the wake-ups its transaction collected.
SELECT current_setting('iterflow.notify', true)

-- name: read_snapshot
-- Run detail: the reads of one run's parts must agree with each other (a run claimed between
-- two of them consumes its signals as it leases it and must not show up as still waiting with
-- consumed signals), so they share one snapshot.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY

-- name: migrate_lock
-- Held by `iterflow migrate` for its one transaction ($1: `iterflow.migrate.<schema>`), so a
-- fleet starting at once applies each migration once.
SELECT pg_advisory_xact_lock(hashtext($1))

-- name: record_step
-- First writer of a final record wins; a later writer gets the stored row back instead.
WITH ins AS (
    INSERT INTO {schema}.steps (run_id, key, seq, kind, name, status, result, error, attempts,
                                deadline, child_id, finished_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
            CASE WHEN $6 = 'done' THEN now() END)
    ON CONFLICT (run_id, key) DO UPDATE
       SET status = excluded.status, result = excluded.result, error = excluded.error,
           attempts = excluded.attempts, deadline = excluded.deadline,
           child_id = excluded.child_id, finished_at = excluded.finished_at
     WHERE {schema}.steps.status <> 'done'
    RETURNING status, result, error, true AS written, finished_at
), watched AS (
    -- progress wake-up for a watched run (migration 0005; an unwatched run: one index probe)
    SELECT count({schema}.wakeup('p ' || w.run_id::text))
      FROM (SELECT DISTINCT run_id FROM {schema}.watches WHERE run_id = $1 AND expires_at > now()) w
)
SELECT status, result, error, written, finished_at FROM ins, watched
UNION ALL
SELECT status, result, error, false, finished_at FROM {schema}.steps
 WHERE run_id = $1 AND key = $2 AND NOT EXISTS (SELECT 1 FROM ins)

-- name: record_step_many
-- record_step for many records at once (the Rust core's group commit): each parameter is the
-- array of that record_step parameter. No (run_id, key) may appear twice: ON CONFLICT cannot
-- touch one row twice in a statement. Returns, per record, `ord` (its 1-based position) and
-- the row record_step would return.
WITH x AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::text[],
                         $7::jsonb[], $8::jsonb[], $9::int[], $10::timestamptz[], $11::uuid[])
             WITH ORDINALITY AS x(run_id, key, seq, kind, name, status, result, error, attempts,
                                  deadline, child_id, ord)
), ins AS (
    INSERT INTO {schema}.steps AS s (run_id, key, seq, kind, name, status, result, error,
                                     attempts, deadline, child_id, finished_at)
    SELECT run_id, key, seq, kind, name, status, result, error, attempts, deadline, child_id,
           CASE WHEN status = 'done' THEN now() END
      FROM x
    ON CONFLICT (run_id, key) DO UPDATE
       SET status = excluded.status, result = excluded.result, error = excluded.error,
           attempts = excluded.attempts, deadline = excluded.deadline,
           child_id = excluded.child_id, finished_at = excluded.finished_at
     WHERE s.status <> 'done'
    RETURNING s.run_id, s.key, s.status, s.result, s.error, s.finished_at
), watched AS (
    -- progress wake-ups for watched runs (migration 0005; unwatched ones: an index probe each)
    SELECT count({schema}.wakeup('p ' || w.run_id::text))
      FROM (SELECT DISTINCT run_id FROM {schema}.watches
             WHERE run_id = ANY (ARRAY(SELECT run_id FROM ins)) AND expires_at > now()) w
)
SELECT x.ord, ins.status, ins.result, ins.error, true AS written, ins.finished_at
  FROM ins JOIN x ON x.run_id = ins.run_id AND x.key = ins.key CROSS JOIN watched
UNION ALL
-- a record left alone was final already: its stored row, as the snapshot shows it
SELECT x.ord, s.status, s.result, s.error, false, s.finished_at
  FROM x JOIN {schema}.steps s ON s.run_id = x.run_id AND s.key = x.key
 WHERE s.status = 'done'

-- name: finish_run
SELECT {schema}.finish_run($1, $2, $3, $4, $5)

-- name: finish_run_many
-- finish_run for many runs at once (the Rust core's group commit): each parameter is the array
-- of that finish_run parameter, no run twice. Returns `ord` (1-based position) and whether
-- that run was finished, as finish_run does. Both are the one function finish_runs.
SELECT ord, finished FROM {schema}.finish_runs($1, $2, $3, $4, $5)

-- name: continue_run
-- ctx.continue_as_new: end the leased run $1 (lease token $2) and start its successor $3 with
-- input $4, in one transaction (the function continue_run, migration 0011).
SELECT {schema}.continue_run($1, $2, $3, $4)

-- name: suspend_run
SELECT {schema}.suspend_run($1, $2, $3, $4, $5, $6)

-- name: resolve_signal
SELECT outcome, payload, at FROM {schema}.resolve_signal($1, $2, $3, $4, $5, $6)

-- name: deliver_signal
-- The function's answer first; a watched run also announces the arrival (migration 0005).
SELECT {schema}.deliver_signal($1, $2, $3, $4),
       (SELECT count({schema}.wakeup('p ' || w.run_id::text))
          FROM (SELECT DISTINCT run_id FROM {schema}.watches
                 WHERE run_id = $1::uuid AND expires_at > now()) w)

-- name: cancel_tree
SELECT {schema}.cancel_tree($1, $2)

-- name: retry_run
SELECT {schema}.retry_run($1)

-- name: add_event
INSERT INTO {schema}.events (run_id, kind, data) VALUES ($1, $2, $3)

-- name: heartbeat
-- Renew this worker's leases; report which are lost and which runs were asked to cancel.
WITH t AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[]) AS t(run_id, token)
), renewed AS (
    UPDATE {schema}.queue q SET lease_until = now() + $3 * interval '1 millisecond'
      FROM t WHERE q.run_id = t.run_id AND q.lease_token = t.token
    RETURNING q.run_id
)
SELECT t.run_id, renewed.run_id IS NOT NULL AS held, r.cancel_reason
  FROM t
  LEFT JOIN renewed ON renewed.run_id = t.run_id
  LEFT JOIN {schema}.runs r ON r.id = t.run_id

-- name: expire_leases
-- Leases whose holder stopped renewing become claimable again (bounded per sweep).
UPDATE {schema}.queue q
   SET lease_owner = NULL, lease_token = NULL, lease_until = NULL, ready_at = now()
 WHERE q.run_id IN (SELECT run_id FROM {schema}.queue
                     WHERE lease_until < now() ORDER BY lease_until LIMIT $1
                     FOR UPDATE SKIP LOCKED)
RETURNING q.flow_name

-- name: unstick_runs
-- Hand the runs a stopping worker held in its sticky cache ($1 run ids, $2 the lease tokens
-- they suspended under) back to the fleet: without `waiting.sticky`, any worker claims them
-- when due instead of after the window (docs/replay.md, "Sticky execution"). A run claimed
-- since (another token, or no `sticky`) is left alone; workers of flows due now are woken.
WITH unstuck AS (
    UPDATE {schema}.runs r SET waiting = r.waiting - 'sticky'
      FROM unnest($1::uuid[], $2::bigint[]) AS t(run_id, token)
     WHERE r.id = t.run_id AND (r.waiting->'sticky'->>'token')::bigint = t.token
    RETURNING r.name
)
SELECT (SELECT count(*) FROM unstuck) AS unstuck,
       (SELECT count(*) FROM (SELECT pg_notify('iterflow.{schema_raw}', 'q ' || name)
                                FROM (SELECT DISTINCT name FROM unstuck) f) n) AS notified

-- name: release_leases
-- Give up leases this worker holds ($1 run ids, $2 their lease tokens: fenced, so a lease
-- already lost or finished is left alone): the runs become claimable at once by any worker.
-- Used by a graceful stop for the runs it did not finish, and for executions abandoned
-- because the database failed under them.
WITH released AS (
    UPDATE {schema}.queue q
       SET lease_owner = NULL, lease_token = NULL, lease_until = NULL, ready_at = now(), woken = false
      FROM unnest($1::uuid[], $2::bigint[]) AS t(run_id, token)
     WHERE q.run_id = t.run_id AND q.lease_token = t.token
    RETURNING q.flow_name
)
SELECT (SELECT count(*) FROM released) AS released,
       (SELECT count(*) FROM (SELECT pg_notify('iterflow.{schema_raw}', 'q ' || flow_name)
                                FROM (SELECT DISTINCT flow_name FROM released) f) n) AS notified

-- name: next_due
-- When the earliest unleased queue row of these flows becomes ready (for the local timer).
-- A run held in a worker's sticky cache (`waiting.sticky`, docs/replay.md "Sticky
-- execution") counts from the end of its window: its holder resumes it by id, and every
-- other claim skips it until then, so counting it from `ready_at` would spin those claims.
-- Only the earliest rows are looked at, so the runs rows are read a bounded number of times.
SELECT min(e.ready_at + coalesce((r.waiting->'sticky'->>'ms')::int, 0) * interval '1 millisecond') - now()
  FROM (SELECT run_id, ready_at FROM {schema}.queue
         WHERE lease_until IS NULL AND flow_name = ANY ($1::text[])
         ORDER BY ready_at LIMIT 64) e
  JOIN {schema}.runs r ON r.id = e.run_id

-- name: requeue_parked
UPDATE {schema}.queue q SET ready_at = now()
  FROM {schema}.runs r
 WHERE r.id = q.run_id AND r.finished_at IS NULL AND r.status = 'parked' AND r.name = ANY ($1::text[])
   AND q.lease_until IS NULL

-- name: get_run
SELECT id, name, version, status, tags, attempts, created_at, updated_at, error, waiting,
       input, output, parent_id, idempotency_key, cancel_reason, finished_at, continued_from,
       continued_to
  FROM {schema}.runs WHERE id = $1

-- name: wait_runs
-- The runs that result() waiters wait for, read together (waiters.py): one row per id asked,
-- status NULL when there is no such run, output and error only once the run is terminal (a
-- live run's row stays small). `continued_to`: the run ended by continuing as new, and its
-- waiters follow the chain (handle.py).
SELECT x.id, r.status, r.cancel_reason, r.continued_to,
       CASE WHEN r.status IN ('done', 'failed', 'canceled') THEN r.output END AS output,
       CASE WHEN r.status IN ('done', 'failed', 'canceled') THEN r.error END AS error
  FROM unnest($1::uuid[]) AS x(id)
  LEFT JOIN {schema}.runs r ON r.id = x.id

-- name: watch_run
-- $1 run, $2 watcher (a fresh uuid per wait() call), $3 seconds the watch lives unrenewed
INSERT INTO {schema}.watches (run_id, watcher, expires_at)
VALUES ($1, $2, now() + make_interval(secs => $3::float8))
ON CONFLICT (run_id, watcher) DO UPDATE SET expires_at = excluded.expires_at

-- name: unwatch_run
-- the watch of one wait() call, and any that a dead waiter left to expire
DELETE FROM {schema}.watches WHERE (run_id = $1 AND watcher = $2) OR expires_at < now()

-- name: run_steps
SELECT key, seq, kind, name, status, result, error, attempts, deadline, child_id, created_at,
       finished_at
  FROM {schema}.steps WHERE run_id = $1 ORDER BY seq, key

-- name: run_signals
SELECT id, name, payload, idempotency_key, received_at, consumed_at, consumed_by
  FROM {schema}.signals WHERE run_id = $1 ORDER BY id

-- name: run_children
SELECT id, name, version, status, parent_key, created_at, finished_at
  FROM {schema}.runs WHERE parent_id = $1 ORDER BY created_at, id

-- name: run_events
SELECT id, at, kind, data FROM {schema}.events WHERE run_id = $1 ORDER BY id

-- name: run_timer
SELECT ready_at, lease_owner, lease_until FROM {schema}.queue WHERE run_id = $1

-- name: chain_last
-- The last run of the continue-as-new chain from run $1 (the run itself when it never
-- continued; no row when there is no such run): where a cancel or a signal naming an earlier
-- run of the chain goes (engine.py).
WITH RECURSIVE chain(id, next) AS (
    SELECT id, continued_to FROM {schema}.runs WHERE id = $1::uuid
    UNION ALL
    SELECT r.id, r.continued_to FROM {schema}.runs r JOIN chain c ON r.id = c.next
)
SELECT id FROM chain WHERE next IS NULL

-- name: list_runs
-- Newest first, keyset-paginated on (created_at, id). NULL filters match everything.
SELECT id, name, version, status, tags, attempts, created_at, updated_at, error, waiting
  FROM {schema}.runs
 WHERE ($1::text IS NULL OR name = $1)
   AND ($2::text[] IS NULL OR status = ANY ($2))
   AND ($3::text IS NULL OR tags @> ARRAY[$3::text])
   AND ($4::timestamptz IS NULL OR created_at >= $4)
   AND ($5::timestamptz IS NULL OR created_at < $5)
   AND ($6::timestamptz IS NULL OR (created_at, id) < ($6, $7::uuid))
 ORDER BY created_at DESC, id DESC
 LIMIT $8

-- name: select_runs_by_filter
-- Bulk operations: ids of runs matching a filter (at least one filter is enforced by callers).
SELECT id FROM {schema}.runs
 WHERE ($1::text IS NULL OR name = $1)
   AND ($2::text[] IS NULL OR status = ANY ($2))
   AND ($3::text IS NULL OR tags @> ARRAY[$3::text])
   AND ($4::timestamptz IS NULL OR created_at >= $4)
   AND ($5::timestamptz IS NULL OR created_at < $5)
 ORDER BY created_at, id
 LIMIT $6

-- name: purge_runs
-- The terminal check is on the deleted row itself, so it is re-checked under the row lock: a
-- run retried (made live again) while this statement waited for its lock is kept.
DELETE FROM {schema}.runs WHERE id = ANY ($1::uuid[]) AND status IN ('done', 'failed', 'canceled')

-- name: reconcile_lost
-- Live runs that should be queued but have no queue row (e.g. a wake lost with a crash).
-- `finished_at IS NULL` (live) lets each reconcile statement scan `runs_live` only.
INSERT INTO {schema}.queue (run_id, flow_name, priority, ready_at, concurrency_key)
SELECT r.id, r.name, r.priority, now(), coalesce(r.concurrency_key, '') FROM {schema}.runs r
 WHERE r.finished_at IS NULL AND r.status IN ('pending', 'running', 'retrying', 'sleeping', 'parked')
   AND r.updated_at < now() - $1 * interval '1 millisecond'
   AND NOT EXISTS (SELECT 1 FROM {schema}.queue q WHERE q.run_id = r.id)
ON CONFLICT DO NOTHING
RETURNING run_id

-- name: reconcile_parents
-- Parents waiting on children that are all terminal, with no queued work.
SELECT {schema}.wake_run(p.id) FROM {schema}.runs p
 WHERE p.finished_at IS NULL AND p.status = 'awaiting_child'
   AND p.updated_at < now() - $1 * interval '1 millisecond'
   AND NOT EXISTS (SELECT 1 FROM {schema}.queue q WHERE q.run_id = p.id)
   AND NOT EXISTS (SELECT 1 FROM {schema}.runs c WHERE c.parent_id = p.id
                    AND c.status NOT IN ('done', 'failed', 'canceled'))

-- name: reconcile_orphans
-- Live children whose parent is already failed or canceled.
SELECT {schema}.cancel_tree(c.id, 'parent ' || p.status) FROM {schema}.runs c
  JOIN {schema}.runs p ON p.id = c.parent_id
 WHERE c.finished_at IS NULL AND p.status IN ('failed', 'canceled')

-- name: try_lock
-- Released at the end of the transaction: the reconciler takes it in the transaction that does
-- the work, retention in one that stays open beside its batch transactions. Nothing is held by
-- the session, so it works behind a transaction-mode pooler.
SELECT pg_try_advisory_xact_lock(hashtext($1))

-- name: prune_events
-- Retention: one batch of old events; callers loop until a batch comes back short.
DELETE FROM {schema}.events
 WHERE id IN (SELECT id FROM {schema}.events WHERE at < now() - $1 * interval '1 millisecond' LIMIT $2)

-- name: prune_runs
-- Retention: one batch of terminal runs finished before the cutoff (records cascade). The
-- batch is chosen from a snapshot; the outer conditions are re-checked on each row under the
-- lock the delete takes, so a run retried since that snapshot (live again, finished_at
-- cleared) is kept. Rows locked by a transition in flight are left for the next sweep.
DELETE FROM {schema}.runs r
 WHERE r.id IN (SELECT id FROM {schema}.runs
                 WHERE finished_at < now() - $1 * interval '1 millisecond'
                   AND status IN ('done', 'failed', 'canceled')
                 LIMIT $2 FOR UPDATE SKIP LOCKED)
   AND r.finished_at < now() - $1 * interval '1 millisecond'
   AND r.status IN ('done', 'failed', 'canceled')

-- name: pending_work
SELECT {schema}.pending_work($1::text[])

-- name: upsert_cron
-- Register a cron definition. An unchanged definition keeps its schedule position; a
-- changed schedule, zone or target takes effect from $9 (the next fire time under it).
INSERT INTO {schema}.crons AS c (name, schedule, timezone, flow_name, flow_version, input, overlap,
                                 jitter_ms, backfill_ms, next_fire_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $10, $9, now())
ON CONFLICT (name) DO UPDATE
   SET schedule = excluded.schedule, timezone = excluded.timezone, flow_name = excluded.flow_name,
       flow_version = excluded.flow_version, input = excluded.input, overlap = excluded.overlap,
       jitter_ms = excluded.jitter_ms, backfill_ms = excluded.backfill_ms,
       next_fire_at = CASE WHEN (c.schedule, c.timezone) IS DISTINCT FROM (excluded.schedule, excluded.timezone)
                           THEN excluded.next_fire_at ELSE c.next_fire_at END,
       updated_at = now()
 WHERE (c.schedule, c.timezone, c.flow_name, c.flow_version, c.input, c.overlap, c.jitter_ms, c.backfill_ms)
       IS DISTINCT FROM (excluded.schedule, excluded.timezone, excluded.flow_name, excluded.flow_version,
                         excluded.input, excluded.overlap, excluded.jitter_ms, excluded.backfill_ms)

-- name: due_crons
-- Crons of these names whose next fire time has come ($2 is "now": the database clock unless
-- a test clock is in use). No lock: firing is made exactly-once by run idempotency keys and
-- the compare-and-set in advance_cron.
SELECT name, schedule, timezone, flow_name, flow_version, input, overlap, jitter_ms, backfill_ms,
       next_fire_at, coalesce($2::timestamptz, now()) AS now
  FROM {schema}.crons
 WHERE name = ANY ($1::text[]) AND next_fire_at <= coalesce($2::timestamptz, now())

-- name: advance_cron
UPDATE {schema}.crons SET next_fire_at = $3, last_fire_at = $4, updated_at = now()
 WHERE name = $1 AND next_fire_at = $2

-- name: cron_live_run
SELECT EXISTS (SELECT 1 FROM {schema}.runs
                WHERE tags @> ARRAY[$1::text] AND status NOT IN ('done', 'failed', 'canceled'))

-- name: list_crons
SELECT name, schedule, timezone, flow_name, flow_version, overlap, next_fire_at, last_fire_at, updated_at
  FROM {schema}.crons ORDER BY name

-- name: delete_cron
DELETE FROM {schema}.crons WHERE name = $1

-- name: analyze_hot
-- After a bulk start: fresh statistics keep the claim on its ordered index scan. With the
-- planner believing the queue is near-empty, every claim would join and sort all ready rows.
ANALYZE {schema}.queue, {schema}.runs

-- name: shift_time
-- Test clock (iterflow.testing): move every pending deadline $1 ms closer, as if that much
-- time had passed. Leased rows are left alone; their runs are executing now.
WITH q AS (
    UPDATE {schema}.queue SET ready_at = ready_at - $1 * interval '1 millisecond'
     WHERE lease_until IS NULL AND ready_at > now() RETURNING 1
), s AS (
    UPDATE {schema}.steps SET deadline = deadline - $1 * interval '1 millisecond'
     WHERE status = 'waiting' AND deadline IS NOT NULL RETURNING 1
), c AS (
    UPDATE {schema}.crons SET next_fire_at = next_fire_at - $1 * interval '1 millisecond' RETURNING 1
)
SELECT (SELECT count(*) FROM q) AS timers, (SELECT count(*) FROM s) AS deadlines, (SELECT count(*) FROM c) AS crons

-- name: next_wake
-- How long until the earliest timer or cron fire (NULL when nothing is scheduled).
SELECT least((SELECT min(ready_at) FROM {schema}.queue WHERE lease_until IS NULL),
             (SELECT min(next_fire_at) FROM {schema}.crons)) - now() AS wait

-- name: schema_exists
-- $1: the quoted, schema-qualified name of the schema_version table.
SELECT to_regclass($1) IS NOT NULL

-- name: claim_with_history
-- Lease up to $2 ready runs of the flows this worker knows ($1), for $4 ms, as owner $3, and
-- return their history in the same statement (one round trip, one commit):
-- rows of kind 'run' carry the claimed run, rows of kind 'step' one record of its history.
-- Each step reaches the claimed rows by `= ANY (ARRAY(SELECT ...))`: one index probe per
-- claimed run, also in a cached generic plan, whose row estimates know nothing of the LIMIT
-- (a join of two of these sets could become a nested loop re-probing the index per row).
-- The runs row is locked too, and a busy one skipped, never waited for: deliver_signal and
-- cancel_tree lock the runs row, then the queue row; waiting here would deadlock with them.
-- A claimed run that suspended on signals (`waiting.signal_seqs`: name -> cursor seq, beside
-- `waiting.signals`: name -> key) has them resolved here by take_signals, as resolve_signal
-- does at replay: the oldest unconsumed entry of each name is consumed and recorded, and the
-- record comes back with the history, so a woken run resumes without another durable write
-- first. A wait with no signal queued yet is left to resolve_signal.
-- `held_token` is the lease token under which a worker holds the run in its sticky cache
-- (`waiting.sticky.token`; NULL: none): that worker goes on with its held body, without a
-- replay, when it is the one that claims the run and the token is the one it holds.
-- A claimed run that suspended on a sleep (`waiting.kind` 'sleep') has its sleep records whose
-- deadline has passed closed here (`slept`), as the resumed sleep would close them, so the body
-- goes on without that durable write first. Losing this commit (a claim does not wait for the
-- flush) loses nothing: a record still 'waiting' is closed at the next resume.
-- A run another worker holds in its sticky cache (`waiting.sticky`: owner, lease token, window
-- in ms; docs/replay.md "Sticky execution") is left to that worker, which claims it by id
-- (claim_runs), until the window after its wake-up has passed.
-- Flows with limits or keys (flow_limits.limited) are picked by claim_limited, which locks
-- and counts per flow; it is not called at all when none of $1 is limited.
-- A wake-up that commits between this statement's snapshot and its row locks (a child
-- finishing, a signal arriving) is in the queue row it locks but not in the history it reads
-- (READ COMMITTED: the locked row is re-read at its latest version, every other table at the
-- snapshot). Clearing `woken` then would lose that wake-up: the body, blind to it, suspends
-- with nothing to re-queue it. So a claimed row whose latest version is not the one in the
-- snapshot (another `xmin`) keeps `woken`, and suspend_run re-queues the run at once.
WITH lim AS MATERIALIZED (
    SELECT array_agg(flow_name) AS names FROM {schema}.flow_limits
     WHERE flow_name = ANY ($1::text[]) AND limited
), picked AS MATERIALIZED (
    SELECT p.* FROM lim CROSS JOIN LATERAL {schema}.claim_limited(lim.names, $2) p
     WHERE lim.names IS NOT NULL
), unlimited AS (
    SELECT wq.run_id, wr.waiting AS was, wq.priority, wq.ready_at
      FROM {schema}.queue wq JOIN {schema}.runs wr ON wr.id = wq.run_id
     WHERE wq.lease_until IS NULL AND wq.ready_at <= now()
       -- the names without limits, as one array: a filter of its own on flow_name made the
       -- planner expect a handful of rows and sort the whole queue instead of reading
       -- queue_ready in order up to the LIMIT (10x slower at 20,000 queued runs)
       AND wq.flow_name = ANY (ARRAY(SELECT f FROM unnest($1::text[]) AS f
                                      WHERE f <> ALL (coalesce((SELECT names FROM lim), '{}'))))
       -- (a check of no row, so the scan is not started at all when every name is limited)
       AND EXISTS (SELECT 1 FROM unnest($1::text[]) AS f
                    WHERE f <> ALL (coalesce((SELECT names FROM lim), '{}')))
       AND (wr.waiting->'sticky' IS NULL OR wr.waiting->'sticky'->>'owner' = $3::text
            OR wq.ready_at <= now() - (wr.waiting->'sticky'->>'ms')::int * interval '1 millisecond')
     ORDER BY wq.priority DESC, wq.ready_at
     LIMIT $2
     FOR UPDATE OF wq, wr SKIP LOCKED
), c AS (
    SELECT u.run_id, u.was, u.limited FROM (
        SELECT unlimited.*, false AS limited FROM unlimited
        UNION ALL
        SELECT picked.*, true FROM picked
    ) u
     ORDER BY u.priority DESC, u.ready_at
     LIMIT $2
), q AS (
    UPDATE {schema}.queue
       SET lease_owner = $3, lease_token = nextval('{schema}.lease_tokens'),
           lease_until = now() + $4 * interval '1 millisecond',
           -- woken after this statement's snapshot (see the header): keep the flag
           woken = CASE WHEN queue.woken THEN queue.xmin IS DISTINCT FROM
                       (SELECT s.xmin FROM {schema}.queue s WHERE s.run_id = queue.run_id) ELSE false END,
           limited = run_id = ANY (ARRAY(SELECT run_id FROM c WHERE c.limited))
     WHERE run_id = ANY (ARRAY(SELECT run_id FROM c))
    RETURNING run_id, lease_token
), r AS (
    UPDATE {schema}.runs r
       SET status = 'running', attempts = r.attempts + 1, updated_at = now(),
           waiting = jsonb_build_object('kind', 'running', 'worker', $3::text,
                                        'until', now() + $4 * interval '1 millisecond')
     WHERE r.id = ANY (ARRAY(SELECT run_id FROM q))
    RETURNING r.id, r.name, r.version, r.input, r.attempts, r.cancel_reason, r.parent_id, r.depth,
              r.created_at,
              (SELECT p.status FROM {schema}.runs p WHERE p.id = r.parent_id) AS parent_status
), got AS (
    -- every signal wait of the claimed runs, resolved in one call (none: no call)
    SELECT t.* FROM (
           SELECT array_agg(c.run_id) AS runs, array_agg(w.value) AS keys,
                  array_agg((c.was->'signal_seqs'->>w.key)::int) AS seqs, array_agg(w.key) AS names
             FROM c CROSS JOIN LATERAL jsonb_each_text(c.was->'signals') w
            WHERE c.was ? 'signal_seqs' AND c.was->'signal_seqs' ? w.key) a
     CROSS JOIN LATERAL {schema}.take_signals(a.runs, a.keys, a.seqs, a.names) t
     WHERE a.runs IS NOT NULL
), slept AS (
    UPDATE {schema}.steps s SET status = 'done', finished_at = now()
     WHERE s.run_id = ANY (ARRAY(SELECT c.run_id FROM c JOIN r ON r.id = c.run_id WHERE c.was->>'kind' = 'sleep'))
       AND s.kind = 'sleep' AND s.status = 'waiting' AND s.deadline <= now()
    RETURNING s.*
), slept_watched AS (
    -- progress wake-ups for watched runs, as record_step sends them
    SELECT count({schema}.wakeup('p ' || w.run_id::text)) AS n
      FROM (SELECT DISTINCT run_id FROM {schema}.watches
             WHERE run_id = ANY (ARRAY(SELECT run_id FROM slept)) AND expires_at > now()) w
)
SELECT 'run' AS kind, r.id AS run_id, q.lease_token, r.name, r.version, r.input, r.attempts,
       r.cancel_reason, r.parent_id, r.depth, r.created_at, r.parent_status, now() AS db_now,
       (c.was->'sticky'->>'token')::bigint AS held_token, NULL::text AS key, NULL::int AS seq, NULL::text AS step_kind, NULL::text AS status,
       NULL::jsonb AS result, NULL::jsonb AS error, NULL::int AS step_attempts,
       NULL::timestamptz AS deadline, NULL::uuid AS child_id, NULL::text AS child_status,
       NULL::jsonb AS child_output, NULL::jsonb AS child_error, NULL::timestamptz AS finished_at
  FROM r JOIN q ON q.run_id = r.id JOIN c ON c.run_id = r.id
UNION ALL
SELECT 'step', s.run_id, NULL, s.name, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       s.key, s.seq, s.kind, s.status, s.result, s.error, s.attempts, s.deadline, s.child_id,
       c.status, c.output, c.error, s.finished_at
  FROM {schema}.steps s
  LEFT JOIN {schema}.runs c ON s.status = 'waiting' AND c.id = s.child_id
 WHERE s.run_id = ANY (ARRAY(SELECT id FROM r))
   AND NOT EXISTS (SELECT 1 FROM got WHERE got.run_id = s.run_id AND got.key = s.key)
   AND NOT EXISTS (SELECT 1 FROM slept WHERE slept.run_id = s.run_id AND slept.key = s.key)
UNION ALL
SELECT 'step', got.run_id, NULL, got.name, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       got.key, got.seq, got.kind, got.status, got.result, got.error, got.attempts, got.deadline,
       got.child_id, NULL, NULL, NULL, got.finished_at
  FROM got
UNION ALL
SELECT 'step', slept.run_id, NULL, slept.name, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       slept.key, slept.seq, slept.kind, slept.status, slept.result, slept.error, slept.attempts,
       slept.deadline, slept.child_id, NULL, NULL, NULL, slept.finished_at
  FROM slept CROSS JOIN slept_watched

-- name: claim_runs
-- Lease the runs $1 for $3 ms, as owner $2, each when it is ready and still exactly as the
-- worker that holds it in its sticky cache left it: its `waiting.sticky.token` is its entry
-- of $4, the lease token of the attempt that suspended it (tokens come from one sequence, and
-- every claim replaces `waiting`, so an equal token means nobody claimed it since), and no
-- cancel is asked. Returns the claim_with_history columns, without the history: the 'run'
-- rows, and the current records of the keys the held bodies wait on (`waiting.sticky.keys`),
-- with the signal waits resolved by take_signals and the sleeps over closed, as the claim
-- does. A run not claimable that way (not due yet, another worker advanced it, canceled,
-- busy) is left out: its holder drops its copy, and the run takes the normal claim and
-- replay. Every held run due at once is claimed by one statement (a burst of wake-ups).
WITH x AS (
    SELECT * FROM unnest($1::uuid[], $4::bigint[]) AS x(run_id, token)
), c AS (
    SELECT wq.run_id, wr.waiting AS was
      FROM x JOIN {schema}.queue wq ON wq.run_id = x.run_id JOIN {schema}.runs wr ON wr.id = wq.run_id
     WHERE wq.lease_until IS NULL AND wq.ready_at <= now()
       AND (wr.waiting->'sticky'->>'token')::bigint = x.token AND wr.cancel_reason IS NULL
       -- a run of a limited flow waits for its place like any other (claim_limited); its
       -- holder adopts it when its own claim takes it
       AND NOT EXISTS (SELECT 1 FROM {schema}.flow_limits l WHERE l.flow_name = wq.flow_name AND l.limited)
       FOR UPDATE OF wq, wr SKIP LOCKED
), k AS (
    SELECT c.run_id, k.key FROM c CROSS JOIN LATERAL jsonb_array_elements_text(c.was->'sticky'->'keys') AS k(key)
), q AS (
    UPDATE {schema}.queue
       SET lease_owner = $2, lease_token = nextval('{schema}.lease_tokens'),
           lease_until = now() + $3 * interval '1 millisecond',
           -- woken after this statement's snapshot (see claim_with_history): keep the flag
           woken = CASE WHEN queue.woken THEN queue.xmin IS DISTINCT FROM
                       (SELECT s.xmin FROM {schema}.queue s WHERE s.run_id = queue.run_id) ELSE false END
     WHERE run_id = ANY (ARRAY(SELECT run_id FROM c))
    RETURNING run_id, lease_token
), r AS (
    UPDATE {schema}.runs r
       SET status = 'running', attempts = r.attempts + 1, updated_at = now(),
           waiting = jsonb_build_object('kind', 'running', 'worker', $2::text,
                                        'until', now() + $3 * interval '1 millisecond')
     WHERE r.id = ANY (ARRAY(SELECT run_id FROM q))
    RETURNING r.id, r.name, r.version, r.input, r.attempts, r.cancel_reason, r.parent_id, r.depth,
              r.created_at,
              (SELECT p.status FROM {schema}.runs p WHERE p.id = r.parent_id) AS parent_status
), got AS (
    SELECT t.* FROM (
           SELECT array_agg(c.run_id) AS runs, array_agg(w.value) AS keys,
                  array_agg((c.was->'signal_seqs'->>w.key)::int) AS seqs, array_agg(w.key) AS names
             FROM c CROSS JOIN LATERAL jsonb_each_text(c.was->'signals') w
            WHERE c.was ? 'signal_seqs' AND c.was->'signal_seqs' ? w.key) a
     CROSS JOIN LATERAL {schema}.take_signals(a.runs, a.keys, a.seqs, a.names) t
     WHERE a.runs IS NOT NULL
), slept AS (
    UPDATE {schema}.steps s SET status = 'done', finished_at = now()
      FROM k
     WHERE s.run_id = k.run_id AND s.key = k.key
       AND k.run_id = ANY (ARRAY(SELECT c.run_id FROM c JOIN r ON r.id = c.run_id WHERE c.was->>'kind' = 'sleep'))
       AND s.kind = 'sleep' AND s.status = 'waiting' AND s.deadline <= now()
    RETURNING s.*
), slept_watched AS (
    -- progress wake-ups for watched runs, as record_step sends them
    SELECT count({schema}.wakeup('p ' || w.run_id::text)) AS n
      FROM (SELECT DISTINCT run_id FROM {schema}.watches
             WHERE run_id = ANY (ARRAY(SELECT run_id FROM slept)) AND expires_at > now()) w
)
SELECT 'run' AS kind, r.id AS run_id, q.lease_token, r.name, r.version, r.input, r.attempts,
       r.cancel_reason, r.parent_id, r.depth, r.created_at, r.parent_status, now() AS db_now,
       (c.was->'sticky'->>'token')::bigint AS held_token, NULL::text AS key, NULL::int AS seq, NULL::text AS step_kind, NULL::text AS status,
       NULL::jsonb AS result, NULL::jsonb AS error, NULL::int AS step_attempts,
       NULL::timestamptz AS deadline, NULL::uuid AS child_id, NULL::text AS child_status,
       NULL::jsonb AS child_output, NULL::jsonb AS child_error, NULL::timestamptz AS finished_at
  FROM r JOIN q ON q.run_id = r.id JOIN c ON c.run_id = r.id
UNION ALL
SELECT 'step', s.run_id, NULL, s.name, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       s.key, s.seq, s.kind, s.status, s.result, s.error, s.attempts, s.deadline, s.child_id,
       c.status, c.output, c.error, s.finished_at
  FROM k JOIN {schema}.steps s ON s.run_id = k.run_id AND s.key = k.key
  LEFT JOIN {schema}.runs c ON s.status = 'waiting' AND c.id = s.child_id
 WHERE k.run_id = ANY (ARRAY(SELECT id FROM r))
   AND NOT EXISTS (SELECT 1 FROM got WHERE got.run_id = s.run_id AND got.key = s.key)
   AND NOT EXISTS (SELECT 1 FROM slept WHERE slept.run_id = s.run_id AND slept.key = s.key)
UNION ALL
SELECT 'step', got.run_id, NULL, got.name, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       got.key, got.seq, got.kind, got.status, got.result, got.error, got.attempts, got.deadline,
       got.child_id, NULL, NULL, NULL, got.finished_at
  FROM got
UNION ALL
SELECT 'step', slept.run_id, NULL, slept.name, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       slept.key, slept.seq, slept.kind, slept.status, slept.result, slept.error, slept.attempts,
       slept.deadline, slept.child_id, NULL, NULL, NULL, slept.finished_at
  FROM slept CROSS JOIN slept_watched

-- name: handed_records
-- The records of keys $3 of run $1 as a handoff's notice carries them (held_records), while
-- the run is leased under token $2 (no row otherwise): read by the holder of a run handed off
-- to it whose records were too large for the notice (migration 0014).
SELECT {schema}.held_records($1::uuid, $3::text[]) AS steps
 WHERE EXISTS (SELECT 1 FROM {schema}.queue q WHERE q.run_id = $1::uuid AND q.lease_token = $2)

-- name: upsert_flow_limits
-- A starting worker states the limits of the flows it serves ($1: a JSON array of {name,
-- concurrency, key_concurrency, keyed}, as text; null: none): configuration, so the last
-- worker started wins.
INSERT INTO {schema}.flow_limits AS l (flow_name, concurrency, key_concurrency, limited)
SELECT f.name, f.concurrency, f.key_concurrency,
       f.concurrency IS NOT NULL OR f.key_concurrency IS NOT NULL OR f.keyed
  FROM jsonb_to_recordset($1::text::jsonb) AS f(name text, concurrency int, key_concurrency int, keyed boolean)
ON CONFLICT (flow_name) DO UPDATE
   SET concurrency = excluded.concurrency, key_concurrency = excluded.key_concurrency,
       limited = excluded.limited, updated_at = now()
 WHERE (l.concurrency, l.key_concurrency, l.limited)
       IS DISTINCT FROM (excluded.concurrency, excluded.key_concurrency, excluded.limited)

-- name: upsert_worker
-- A worker's row in the registry (migration 0009), written at its start and once per
-- heartbeat interval: $1 owner, $2 host, $3 pid, $4 flows served (name@version), $5 core,
-- $6 concurrency, $7 lease in ms (a row unseen for that long is a gone worker). The same
-- statement prunes rows unseen for a day (crashed workers), a table of a few rows.
WITH gone AS (
    DELETE FROM {schema}.workers WHERE last_seen < now() - interval '1 day'
)
INSERT INTO {schema}.workers (owner, host, pid, flows, core, concurrency, lease_ms)
VALUES ($1, $2, $3, $4::text[], $5, $6, $7)
ON CONFLICT (owner) DO UPDATE
   SET flows = excluded.flows, concurrency = excluded.concurrency, lease_ms = excluded.lease_ms,
       last_seen = now()

-- name: delete_worker
-- A graceful stop takes the worker out of the registry.
DELETE FROM {schema}.workers WHERE owner = $1

-- name: list_workers
-- The registry, newest first; `alive`: seen within its lease (it writes every third of one).
SELECT owner, host, pid, flows, core, concurrency, lease_ms, started_at, last_seen,
       last_seen > now() - lease_ms * interval '1 millisecond' AS alive
  FROM {schema}.workers
 ORDER BY started_at DESC, owner

-- name: explain_run
-- One run as engine.explain reads it (explain.py): the run, its queue row and when the
-- holder of its lease last wrote its registry row, the signals in its inbox, the record of
-- the step it waits to retry, and how many ready, unleased runs of its flow a claim takes
-- first (higher priority, or the same priority and ready earlier). Read-only.
SELECT r.id, r.name, r.version, r.status, r.attempts, r.error, r.waiting, r.cancel_reason,
       r.parent_id, r.created_at, r.updated_at, r.finished_at, now() AS db_now,
       q.run_id IS NOT NULL AS queued, q.ready_at, q.lease_owner, q.lease_until,
       w.last_seen AS owner_seen,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('name', s.name, 'received_at', s.received_at)
                                  ORDER BY s.id), '[]'::jsonb)
          FROM {schema}.signals s
         WHERE s.run_id = r.id AND s.consumed_at IS NULL) AS inbox,
       (SELECT jsonb_build_object('attempts', st.attempts, 'error', st.error)
          FROM {schema}.steps st
         WHERE st.run_id = r.id AND st.key = r.waiting->>'step') AS retry_step,
       (SELECT count(*) FROM {schema}.queue a
         WHERE q.lease_until IS NULL AND a.flow_name = q.flow_name AND a.lease_until IS NULL
           AND a.ready_at <= now() AND a.run_id <> q.run_id
           AND (a.priority > q.priority OR (a.priority = q.priority AND a.ready_at < q.ready_at))) AS ahead,
       -- its flow's limits (flow control) and how much of them is taken now
       r.concurrency_key, l.concurrency AS flow_limit, l.key_concurrency AS key_limit,
       (SELECT count(*) FROM {schema}.queue a
         WHERE l.concurrency IS NOT NULL AND a.flow_name = r.name AND a.lease_until IS NOT NULL) AS flow_running,
       (SELECT count(*) FROM {schema}.queue a
         WHERE l.key_concurrency IS NOT NULL AND a.flow_name = r.name AND a.lease_until IS NOT NULL
           AND a.concurrency_key = coalesce(r.concurrency_key, '')) AS key_running
  FROM {schema}.runs r
  LEFT JOIN {schema}.queue q ON q.run_id = r.id
  LEFT JOIN {schema}.workers w ON w.owner = q.lease_owner
  LEFT JOIN {schema}.flow_limits l ON l.flow_name = r.name AND l.limited
 WHERE r.id = $1

-- name: dashboard_runs
-- The dashboard's runs list: newest first, keyset-paginated on (created_at, id), never OFFSET.
-- NULL filters match everything. $1 flow, $2 version, $3 status, $4 tag, $5/$6 created range,
-- $7/$8 an id prefix as the uuid range it covers, $9/$10 the cursor, $11 the page size, $12
-- the scan window ($11 without a status filter). No index covers `status` (a live run's status changes stay HOT updates,
-- migration 0003), so the status filter applies to a window of at most $12 runs that match
-- the other filters: a status that is rare among them costs $12 rows read, not all of them
-- (dashboard_window_end gives where the window ended, to search on from there).
SELECT id, name, version, status, tags, attempts, created_at, updated_at, finished_at, waiting
  FROM (SELECT id::text AS id, name, version, status, tags, attempts, created_at, updated_at,
               finished_at, waiting
          FROM {schema}.runs
         WHERE ($1::text IS NULL OR name = $1)
           AND ($2::int IS NULL OR version = $2)
           AND ($4::text IS NULL OR tags @> ARRAY[$4::text])
           AND ($5::timestamptz IS NULL OR created_at >= $5)
           AND ($6::timestamptz IS NULL OR created_at < $6)
           AND ($7::uuid IS NULL OR id BETWEEN $7 AND $8::uuid)
           AND ($9::timestamptz IS NULL OR (created_at, id) < ($9, $10::uuid))
         ORDER BY created_at DESC, id DESC
         LIMIT $12) AS w
 WHERE ($3::text IS NULL OR status = $3)
 ORDER BY created_at DESC, id DESC
 LIMIT $11

-- name: dashboard_window_end
-- Where dashboard_runs' scan window ended: its oldest run and how many runs it held. $1..$9
-- as dashboard_runs' $1, $2 and $4..$10, $10 the window. Reads the same index entries as the
-- window did (index-only where the visibility map allows).
WITH w AS (
    SELECT created_at, id FROM {schema}.runs
     WHERE ($1::text IS NULL OR name = $1)
       AND ($2::int IS NULL OR version = $2)
       AND ($3::text IS NULL OR tags @> ARRAY[$3::text])
       AND ($4::timestamptz IS NULL OR created_at >= $4)
       AND ($5::timestamptz IS NULL OR created_at < $5)
       AND ($6::uuid IS NULL OR id BETWEEN $6 AND $7::uuid)
       AND ($8::timestamptz IS NULL OR (created_at, id) < ($8, $9::uuid))
     ORDER BY created_at DESC, id DESC
     LIMIT $10
)
SELECT created_at, id::text AS id, count(*) OVER () AS scanned FROM w ORDER BY created_at, id LIMIT 1

-- name: dashboard_live_counts
-- Live runs per status (exact), matching the dashboard's filter ($1..$8 as in dashboard_runs),
-- at most $9 runs read: live runs are found through runs_live, and there are few of them.
SELECT status, count(*) AS n
  FROM (SELECT status FROM {schema}.runs
         WHERE finished_at IS NULL
           AND ($1::text IS NULL OR name = $1)
           AND ($2::int IS NULL OR version = $2)
           AND ($3::text IS NULL OR status = $3)
           AND ($4::text IS NULL OR tags @> ARRAY[$4::text])
           AND ($5::timestamptz IS NULL OR created_at >= $5)
           AND ($6::timestamptz IS NULL OR created_at < $6)
           AND ($7::uuid IS NULL OR id BETWEEN $7 AND $8::uuid)
         LIMIT $9) AS live
 GROUP BY status

-- name: dashboard_recent_counts
-- Runs per status among the newest $9 runs matching the dashboard's filter ($1..$8 as in
-- dashboard_runs): one bounded scan in the list's own order.
SELECT status, count(*) AS n
  FROM (SELECT status FROM {schema}.runs
         WHERE ($1::text IS NULL OR name = $1)
           AND ($2::int IS NULL OR version = $2)
           AND ($3::text IS NULL OR status = $3)
           AND ($4::text IS NULL OR tags @> ARRAY[$4::text])
           AND ($5::timestamptz IS NULL OR created_at >= $5)
           AND ($6::timestamptz IS NULL OR created_at < $6)
           AND ($7::uuid IS NULL OR id BETWEEN $7 AND $8::uuid)
         ORDER BY created_at DESC, id DESC
         LIMIT $9) AS recent
 GROUP BY status

-- name: dashboard_status_estimates
-- Runs per status in the whole table, estimated from the planner's statistics (the row count
-- of the last VACUUM/ANALYZE times each status's share in ANALYZE's sample): no table read.
-- Empty until the table was analyzed once.
SELECT v.status, round(greatest(c.reltuples, 0) * v.freq)::bigint AS n
  FROM pg_class c
  JOIN pg_namespace ns ON ns.oid = c.relnamespace
  JOIN pg_stats s ON s.schemaname = ns.nspname AND s.tablename = c.relname AND s.attname = 'status'
 CROSS JOIN LATERAL unnest(s.most_common_vals::text::text[], s.most_common_freqs) AS v(status, freq)
 WHERE c.oid = '{schema}.runs'::regclass

-- name: dashboard_flows
-- Every flow version that has runs, with its newest run's creation: a loose index scan of
-- runs_name_version_created (one index probe per flow version, not a table read).
WITH RECURSIVE f AS (
    (SELECT name, version FROM {schema}.runs ORDER BY name, version LIMIT 1)
    UNION ALL
    SELECT n.name, n.version
      FROM f CROSS JOIN LATERAL (
          SELECT r.name, r.version FROM {schema}.runs r
           WHERE (r.name, r.version) > (f.name, f.version)
           ORDER BY r.name, r.version LIMIT 1) AS n
)
SELECT f.name, f.version,
       (SELECT r.created_at FROM {schema}.runs r WHERE r.name = f.name AND r.version = f.version
         ORDER BY r.created_at DESC, r.id DESC LIMIT 1) AS last_created
  FROM f

-- name: dashboard_flow_live
-- Live runs per flow version and status (exact; through runs_live).
SELECT name, version, status, count(*) AS n
  FROM {schema}.runs WHERE finished_at IS NULL
 GROUP BY name, version, status

-- name: dashboard_flow_throughput
-- Runs that finished in the last hour, per flow version and status, and those of the last
-- five minutes (through runs_finished: as many rows as finished in that hour).
SELECT name, version, status, count(*) AS last_hour,
       count(*) FILTER (WHERE finished_at > now() - interval '5 minutes') AS last_5m
  FROM {schema}.runs WHERE finished_at > now() - interval '1 hour'
 GROUP BY name, version, status

-- name: dashboard_workers
-- The owners of the queue's leases (the workers executing runs now), from queue_leased.
SELECT lease_owner AS owner, count(*) AS runs, min(lease_until) AS first_expiry,
       max(lease_until) AS last_expiry, count(*) FILTER (WHERE lease_until < now()) AS expired,
       array_agg(DISTINCT flow_name ORDER BY flow_name) AS flows, now() AS db_now
  FROM {schema}.queue WHERE lease_until IS NOT NULL
 GROUP BY lease_owner ORDER BY lease_owner

-- name: acquire_permit
-- A permit of step limit $1 for key $2 ('' for a global limit, NULL for the run's key), held
-- by step $4 of run $3 under lease token $5, at most $6 held at once (the function: migration
-- 0012). Denied: wait_ms until the earliest holder's lease runs out. permit_key: the key.
SELECT granted, wait_ms, permit_key
  FROM {schema}.acquire_permit($1::text, $2::text, $3::uuid, $4::text, $5::bigint, $6::int)

-- name: release_permit
-- Give back the permit of step $4 of run $3 for limit $1, key $2 ($5: the limit's maximum).
-- When the (limit, key) was full before (this statement's snapshot does not see its own
-- delete), waiters may take the permit: `l <limit>` (`l <limit> <key>`) announces it. A
-- lost release costs nothing durable (the permit ends with the lease), so the commit does
-- not wait for its WAL flush, which a notifying commit would make everyone wait for.
WITH gone AS (
    DELETE FROM {schema}.step_permits
     WHERE limit_name = $1::text AND key = $2::text AND run_id = $3::uuid AND step_key = $4::text
    RETURNING 1
)
SELECT set_config('synchronous_commit', 'off', true) AS commit_mode,
       (SELECT count(*) FROM gone) AS released,
       (SELECT count({schema}.wakeup('l ' || $1::text || CASE WHEN $2::text = '' THEN '' ELSE ' ' || $2::text END))
          FROM gone
         WHERE (SELECT count(*) FROM {schema}.step_permits
                 WHERE limit_name = $1::text AND key = $2::text) >= $5::int) AS notified

-- name: take_rate
-- One call of rate limit $1 for key $2 (NULL: the key of run $3): emission interval $4 ms,
-- burst $5, reservations up to $6 ms ahead (the function: migration 0012). granted with
-- wait_ms: go after wait_ms; denied: ask again after wait_ms.
SELECT granted, wait_ms
  FROM {schema}.take_rate($1::text, $2::text, $3::uuid, $4::double precision, $5::int, $6::double precision)

-- name: debounce_start
-- A debounced start (the function: migration 0012): $1 run id, $2 flow, $3 version, $4 key,
-- $5 input, $6 tags, $7 priority, $8 window in ms. Answers the run that will begin (a new one,
-- or the one not yet begun whose input it replaced) and whether it is $1.
SELECT run_id, status, created
  FROM {schema}.debounce_start($1::uuid, $2::text, $3::int, $4::text, $5::jsonb, $6::text[], $7::int, $8::bigint)
