"""Engines behind a real PgBouncer in transaction mode (docs/operations.md, "Behind PgBouncer").

These run in every test run (skipped only where the pgbouncer binary is missing), on both
cores: ``dsn`` is the pooler, ``listen_dsn`` the server itself, ``prepared_statements=False``.
The whole engine suite can also run this way: ``ITERFLOW_VIA_PGBOUNCER=1`` (see conftest.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from tests.engines import Build, engine_builder
from tests.pgbouncer import Bouncer

import iterflow
from iterflow import IterflowError, create_engine, define_flow


@define_flow("bouncer_child")
async def bouncer_child(ctx, n):
    return await ctx.step("double", lambda: n * 2)


@define_flow("bouncer_parent")
async def bouncer_parent(ctx, n):
    first = await ctx.step("one", lambda: n + 1)
    await ctx.sleep("100ms")
    got = await ctx.signal("go", timeout="30s")
    doubled = await ctx.invoke(bouncer_child, first)
    return {"first": first, "got": got, "doubled": doubled}


@pytest.fixture
async def pooled(dsn: str, schema_name: str, core: str, pgbouncer: Bouncer) -> AsyncIterator[Build]:
    """Engines whose every statement goes through pgbouncer, LISTEN aside (stopped at teardown)."""
    await iterflow.migrate(dsn, schema_name)
    async with engine_builder(pgbouncer.dsn, schema_name, core, listen_dsn=dsn, prepared_statements=False,
                              poll_interval=0.2) as build:
        yield build


def _database(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def _direct_application_names(dsn: str, schema: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT application_name FROM pg_stat_activity WHERE application_name LIKE %s",
                            (f"%:{schema}",)).fetchall()
    return [r[0] for r in rows]


async def test_a_flow_with_steps_sleep_signal_and_child_completes_through_pgbouncer(
    pooled: Build, pgbouncer: Bouncer, dsn: str, schema_name: str
) -> None:
    before = pgbouncer.xact_count(_database(dsn))
    engine = await pooled(bouncer_parent, bouncer_child)
    client = await pooled(listen=False)
    run = await client.handle("bouncer_parent").start(20)
    for _ in range(200):  # the run reaches its signal wait (after the durable sleep)
        detail = await client.status(run.run_id)
        if detail is not None and detail.run.status == "awaiting_signal":
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the run never waited for its signal")
    assert (await client.signal(run.run_id, "go", {"ok": True})).kind == "delivered"
    assert await client.handle("bouncer_parent").result(run.run_id, timeout=30) == {
        "first": 21, "got": {"ok": True}, "doubled": 42,
    }
    # the traffic went through the pooler: its clients carry the engines' names, and it
    # relayed their transactions; LISTEN is a direct session of its own
    clients = {c["application_name"] for c in pgbouncer.show("CLIENTS")}
    assert f"iterflow:{schema_name}" in clients
    assert f"iterflow-listen:{schema_name}" not in clients
    assert pgbouncer.xact_count(_database(dsn)) - before >= 20
    assert f"iterflow-listen:{schema_name}" in _direct_application_names(dsn, schema_name)
    assert engine.health()["listening"]


async def test_the_fleet_locks_hold_through_pgbouncer(pooled: Build, dsn: str, schema_name: str) -> None:
    """Retention and the reconciler are one process at a time, and leave nothing behind in
    the pooled sessions (a session lock would stay on whichever server connection took it)."""
    first = await pooled(listen=False)
    second = await pooled(listen=False)
    for engine in (first, second):  # nothing to prune: counts, not None, and nothing leaked
        for _ in range(5):
            assert await engine.prune(events_older_than="1h") == {"events": 0, "runs": 0}
            assert await engine.reconcile() is not None
    retention = f"iterflow.retention.{schema_name}"
    with psycopg.connect(dsn) as holder:  # another process prunes: the engines stand aside
        assert holder.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s))", (retention,)).fetchone() == (True,)
        assert await first.prune(runs_older_than="1h") is None
        assert await second.prune(events_older_than="1h") is None
    # a batch that waits (an old event row locked elsewhere) holds the lock meanwhile
    run = await first.handle("x").start(None)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"INSERT INTO \"{schema_name}\".events (run_id, at, kind)"
                     " VALUES (%s, now() - interval '1 day', 'old')", (run.run_id,))
    with psycopg.connect(dsn) as blocker:
        blocker.execute(f'SELECT 1 FROM "{schema_name}".events WHERE run_id = %s FOR UPDATE', (run.run_id,))
        pruning = asyncio.ensure_future(first.prune(events_older_than="1h"))
        for _ in range(100):
            await asyncio.sleep(0.05)
            if _advisory_locks(dsn, retention) > 0:
                break
        assert await second.prune(events_older_than="1h") is None
        assert not pruning.done()
        blocker.rollback()
    counts = await asyncio.wait_for(pruning, 10)
    assert counts is not None and counts["events"] >= 1
    assert _advisory_locks(dsn, retention) == 0


def _advisory_locks(dsn: str, key: str) -> int:
    """Holders of the advisory lock on ``hashtext(key)`` (its low 32 bits are the objid)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
            " AND objid::bigint = (hashtext(%s)::bigint & 4294967295)", (key,),
        ).fetchone()
    return int(row[0]) if row else 0


async def test_named_statements_break_behind_transaction_pooling(
    dsn: str, schema_name: str, core: str, pgbouncer: Bouncer
) -> None:
    """Why ``prepared_statements=False`` exists: with the default, two engines' named
    statements meet on the pooler's shared server connections and PgBouncer 1.18 fails them
    (a name already taken there, or one that does not exist there)."""
    await iterflow.migrate(dsn, schema_name)
    engines = [create_engine(pgbouncer.dsn, schema=schema_name, core=core, listen_dsn=dsn,
                             database_retry_timeout=0) for _ in range(2)]
    failure: IterflowError | None = None
    try:
        for _ in range(20):
            calls = [e.pending_work() for e in engines for _ in range(4)]
            results = await asyncio.gather(*calls, return_exceptions=True)
            failure = next((r for r in results if isinstance(r, IterflowError)), None)
            if failure is not None:
                break
    finally:
        for engine in engines:
            await engine.stop()
    assert failure is not None, "named statements kept working behind transaction pooling"
    assert "prepared statement" in str(failure)
