"""Storage (docs/operations.md §1): the hot tables stay cheap to write. A live run's transitions (claimed,
suspended, woken) change no indexed column of ``runs``, so PostgreSQL updates the row in place
(a HOT update: no new index entries), and finished work leaves the queue table."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from iterflow import define_flow


@define_flow("hot-waiter")
async def hot_waiter(ctx: Any, _inp: Any) -> Any:
    first = await ctx.signal("go")
    await ctx.sleep("10ms")
    return first


async def _hot_updates(dsn: str, schema: str) -> tuple[int, int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE schemaname = %s AND relname = 'runs'",
            (schema,),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0]), int(row[1])


async def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await (await conn.execute(query)).fetchall()


async def test_live_transitions_update_runs_in_place_and_finished_work_leaves_the_queue(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    n = 20
    # every suspension written and every wake claimed (no sticky resume, no wait in place)
    engine = await make_engine(hot_waiter, sticky_cache=0)
    handle = engine.handle("hot-waiter")
    runs = [(await handle.start(i)).run_id for i in range(n)]
    for run_id in runs:
        for _ in range(250):
            if (await engine.status(run_id)).run.status == "awaiting_signal":
                break
            await asyncio.sleep(0.02)
        await engine.signal(run_id, "go", run_id)
    assert [await handle.result(r, timeout=10) for r in runs] == runs
    await engine.stop()  # its backends exit, which publishes their table statistics

    # per run: claim, suspend (signal), claim, suspend (sleep), claim are live transitions;
    # only the finish changes an indexed column (finished_at)
    updates, hot = 0, 0
    for _ in range(100):
        updates, hot = await _hot_updates(dsn, schema_name)
        if updates >= 6 * n:
            break
        await asyncio.sleep(0.05)
    assert updates >= 6 * n
    assert hot >= 3 * n, f"{hot} of {updates} updates of runs were HOT"
    assert await _rows(dsn, f'SELECT count(*) FROM "{schema_name}".queue') == [(0,)]
