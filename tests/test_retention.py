"""Retention (docs/operations.md §6): only terminal runs older than the cutoff go; live runs stay."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from iterflow import RunFailed, define_flow
from iterflow.errors import InvalidArgument


@define_flow("short")
async def short(ctx, _inp):
    return await ctx.step("s", lambda: 1)


@define_flow("waits")
async def waits(ctx, _inp):
    await ctx.signal("never")


def _age(dsn: str, schema: str, run_id: str, hours: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f'UPDATE "{schema}".runs SET created_at = created_at - make_interval(hours => %s), '
            f"finished_at = finished_at - make_interval(hours => %s) WHERE id = %s",
            (hours, hours, run_id),
        )
        conn.execute(
            f'UPDATE "{schema}".events SET at = at - make_interval(hours => %s) WHERE run_id = %s', (hours, run_id)
        )


async def test_prune_removes_only_old_terminal_runs(make_engine, dsn, schema_name):
    engine = await make_engine(short, waits)
    old_done = await engine.handle("short").start(None)
    new_done = await engine.handle("short").start(None)
    old_live = await engine.handle("waits").start(None)
    for run in (old_done, new_done):
        await engine.handle("short").result(run.run_id, timeout=5)
    for run in (old_done, old_live):
        _age(dsn, schema_name, run.run_id, 48)
    counts = await engine.prune(runs_older_than="1d", events_older_than="1d")
    assert counts is not None and counts["runs"] == 1
    assert await engine.status(old_done.run_id) is None
    assert await engine.status(new_done.run_id) is not None
    assert (await engine.status(old_live.run_id)).run.status == "awaiting_signal"
    with pytest.raises(InvalidArgument):
        await engine.prune()


async def test_one_pruner_at_a_time(make_engine, dsn, schema_name):
    """While another process holds the retention lock, prune returns None; the lock is released
    with the transaction that took it, so the next prune runs."""
    engine = await make_engine(listen=False)
    with psycopg.connect(dsn) as other:
        other.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"iterflow.retention.{schema_name}",))
        assert await engine.prune(events_older_than="1d") is None
    for _ in range(3):  # each prune lets go of the lock: the next one (or another process) takes it
        assert await engine.prune(events_older_than="1d", runs_older_than="1d") == {"events": 0, "runs": 0}
    with psycopg.connect(dsn) as other:
        lock = other.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s))", (f"iterflow.retention.{schema_name}",))
        assert lock.fetchone() == (True,)


async def test_retention_runs_on_schedule(make_engine, dsn, schema_name):
    client = await make_engine(short, listen=False)
    run = await client.handle("short").start(None)
    worker = await make_engine(short, lease="1s", retention={"runs_older_than": "1h", "schedule": "1s"})
    await worker.handle("short").result(run.run_id, timeout=5)
    _age(dsn, schema_name, run.run_id, 2)
    for _ in range(100):
        if await client.status(run.run_id) is None:
            break
        await asyncio.sleep(0.05)
    assert await client.status(run.run_id) is None


async def test_pending_work_counts_claimable_runs(make_engine):
    client = await make_engine(listen=False)
    assert await client.pending_work() == 0
    await client.handle("short").start_many([{"input": i} for i in range(3)])
    await client.handle("other").start(None, delay="1h")
    assert await client.pending_work() == 3
    assert await client.pending_work(["other"]) == 0


async def _failed_long_ago(make_engine, dsn: str, schema: str) -> tuple:
    @define_flow("fails")
    async def fails(ctx, _inp):
        raise ValueError("boom")

    engine = await make_engine(fails)
    run = await engine.handle("fails").start(None)
    with pytest.raises(RunFailed):
        await engine.handle("fails").result(run.run_id, timeout=5)
    await engine.stop()
    _age(dsn, schema, run.run_id, 48)
    return engine, run.run_id


@pytest.mark.parametrize("delete", ["prune", "purge"])
async def test_a_run_retried_while_a_delete_waits_for_its_lock_is_kept(make_engine, dsn, schema_name, delete):
    """The retry commits while the delete runs: whether the delete skips the locked row or waits
    for its lock (it chose its rows from an older snapshot), it re-checks the terminal state
    under the lock and keeps the run, now live again."""
    _, run_id = await _failed_long_ago(make_engine, dsn, schema_name)
    client = await make_engine(listen=False)
    with psycopg.connect(dsn) as retrying:  # the retry, uncommitted: it holds the run's row lock
        assert retrying.execute(f'SELECT "{schema_name}".retry_run(%s)', (run_id,)).fetchone() == ("queued",)
        if delete == "prune":
            deleting = asyncio.ensure_future(client.prune(runs_older_than="1h"))
        else:
            deleting = asyncio.ensure_future(client.purge({"status": "failed"}))
        await asyncio.sleep(0.5)  # the delete has taken its snapshot (and may wait for the lock)
        retrying.commit()
    await asyncio.wait_for(deleting, 10)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f'SELECT status FROM "{schema_name}".runs WHERE id = %s', (run_id,)).fetchone()
        queued = conn.execute(f'SELECT count(*) FROM "{schema_name}".queue WHERE run_id = %s', (run_id,)).fetchone()
    assert row == ("pending",) and queued == (1,)
