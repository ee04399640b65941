"""Recovery without a coordinator: forward progress resets attempts; the reconciler re-drives
stranded runs (lost queue rows, parents whose children finished, orphans of dead parents)."""

from __future__ import annotations

import asyncio

import psycopg

from iterflow import define_flow


@define_flow("simple")
async def simple(ctx, _inp):
    return await ctx.step("s", lambda: "ok")


@define_flow("child")
async def child(ctx, _inp):
    await ctx.signal("go")
    return "child-done"


@define_flow("holder")
async def holder(ctx, _inp):
    return await ctx.invoke(child, None)


def _sql(dsn: str, statement: str, *params: object) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


async def test_reconciler_requeues_a_run_whose_queue_row_was_lost(make_engine, dsn, schema_name):
    client = await make_engine(listen=False)
    run = await client.handle("simple").start(None)
    _sql(dsn, f'DELETE FROM "{schema_name}".queue WHERE run_id = %s', run.run_id)
    _sql(dsn, f"UPDATE \"{schema_name}\".runs SET updated_at = now() - interval '1 hour' WHERE id = %s", run.run_id)
    worker = await make_engine(simple, reconciler=False)
    await asyncio.sleep(0.3)
    assert (await client.status(run.run_id)).run.status == "pending"
    counts = await worker.reconcile()
    assert counts is not None and counts["lost"] == 1
    assert await client.handle("simple").result(run.run_id, timeout=5) == "ok"


async def test_reconciler_wakes_parent_whose_children_finished(make_engine, dsn, schema_name):
    engine = await make_engine(child, holder, reconciler=False)
    run = await engine.handle("holder").start(None)
    for _ in range(200):
        detail = await engine.status(run.run_id)
        if detail.children and detail.run.status == "awaiting_child":
            break
        await asyncio.sleep(0.02)
    child_id = str(detail.children[0]["id"])
    await engine.stop()
    # finish the child behind the engine's back, losing the parent's wake-up
    _sql(dsn, f"SELECT \"{schema_name}\".finish_run(%s, NULL, 'done', '\"x\"'::jsonb, NULL)", child_id)
    _sql(dsn, f'DELETE FROM "{schema_name}".queue WHERE run_id = %s', run.run_id)
    _sql(dsn, f"UPDATE \"{schema_name}\".runs SET updated_at = now() - interval '1 hour' WHERE id = %s", run.run_id)
    again = await make_engine(child, holder, reconciler=False)
    counts = await again.reconcile()
    assert counts is not None and counts["parents"] == 1
    assert await again.handle("holder").result(run.run_id, timeout=5) == "x"


async def test_reconciler_cancels_orphans(make_engine, dsn, schema_name):
    engine = await make_engine(child, holder, reconciler=False)
    run = await engine.handle("holder").start(None)
    for _ in range(200):
        detail = await engine.status(run.run_id)
        if detail.children:
            break
        await asyncio.sleep(0.02)
    child_id = str(detail.children[0]["id"])
    await engine.stop()
    _sql(dsn, f"UPDATE \"{schema_name}\".runs SET status = 'failed' WHERE id = %s", run.run_id)
    again = await make_engine(listen=False)
    counts = await again.reconcile()
    assert counts is not None and counts["orphans"] == 1
    assert (await again.status(child_id)).run.status == "canceled"


async def test_reconciler_runs_once_per_fleet(make_engine, dsn, schema_name):
    a = await make_engine(listen=False)
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"iterflow.reconcile.{schema_name}",))
        assert await a.reconcile() is None
    assert await a.reconcile() is not None


async def test_forward_progress_resets_attempts(make_engine):
    @define_flow("progress")
    async def progress(ctx, _inp):
        await ctx.sleep("50ms")
        await ctx.sleep("50ms")
        return "ok"

    engine = await make_engine(progress, poll_interval=0.05)
    run = await engine.handle("progress").start(None)
    assert await engine.handle("progress").result(run.run_id, timeout=5) == "ok"
    # three claims happened, but each wait reset the counter
    assert (await engine.status(run.run_id)).run.attempts == 1


async def test_a_starting_worker_reclaims_expired_leases_at_once(make_engine, dsn, schema_name):
    """A run whose worker died (its lease expired long ago) is taken by a worker that has just
    started, not after that worker's first sweep interval (a crash-looping fleet never gets
    that far)."""
    client = await make_engine(listen=False)
    run = await client.handle("simple").start(None)
    _sql(dsn, f"UPDATE \"{schema_name}\".queue SET lease_owner = 'dead-worker', lease_token = -1, "
              f"lease_until = now() - interval '1 second' WHERE run_id = %s", run.run_id)
    _sql(dsn, f"UPDATE \"{schema_name}\".runs SET status = 'running' WHERE id = %s", run.run_id)
    await make_engine(simple, lease="30s")
    assert await client.handle("simple").result(run.run_id, timeout=4) == "ok"
