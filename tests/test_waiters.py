"""Many waiters, few connections: result()/wait() share one collector (waiters.py), reads are
batched, the engine's connections stay under its cap at any concurrency, and waiters ride out
a lost notification and a server restart. Both cores."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

import iterflow
from iterflow import define_flow, waiters
from test_crash import PrivateServer
from test_crash import private_server as private_server  # the private cluster fixture


async def engine_connections(dsn: str, schema: str) -> int:
    """Server connections the engines of ``schema`` hold (they name themselves after it)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s", (f"iterflow%:{schema}",)
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def _nap() -> int:
    await asyncio.sleep(0.01)
    return 1


@define_flow("napper")
async def napper(ctx: Any, n: int) -> int:
    a = await ctx.step("a", _nap)
    b = await ctx.step("b", _nap)
    return n + a + b


@define_flow("gated")
async def gated(ctx: Any, _input: Any) -> Any:
    await ctx.step("before", lambda: 1)
    got = await ctx.signal("go")
    await ctx.step("after", lambda: 2)
    return got


async def test_connections_stay_under_the_cap_at_high_concurrency(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    """concurrency=512 with max_connections=6: 1,000 runs drain (their result() awaited in
    the worker's own process) while the engine never holds more than 6 server connections."""
    engine = await make_engine(napper, concurrency=512, max_connections=6)
    handle = engine.handle("napper")
    runs = await handle.start_many([{"input": i} for i in range(1000)])
    peak = 0
    gather = asyncio.ensure_future(asyncio.gather(*(handle.result(r.run_id, timeout=120) for r in runs)))
    while not gather.done():
        peak = max(peak, await engine_connections(dsn, schema_name))
        await asyncio.sleep(0.02)
    assert await gather == [i + 2 for i in range(1000)]
    assert 2 <= peak <= 6, f"peak {peak} connections"


async def test_result_waiters_share_batched_reads(make_engine: Any) -> None:
    """2,000 waiters registered at once are read in a handful of statements, not one each."""
    engine = await make_engine(napper, concurrency=64)
    handle = engine.handle("napper")
    runs = await handle.start_many([{"input": i} for i in range(2000)])
    outputs = await asyncio.gather(*(handle.result(r.run_id, timeout=120) for r in runs))
    assert outputs == [i + 2 for i in range(2000)]
    reads = engine.waiters.here(engine.core).reads
    assert 0 < reads < 400, f"{reads} reads for 2,000 waiters"


async def test_a_result_wakes_on_its_notification(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the safety read pushed out to a minute, a run finished by another process still
    returns its result() at once: the notification did it."""
    monkeypatch.setattr(waiters, "SAFETY", 60.0)
    await make_engine(gated)
    client = await make_engine(listen=False)
    run = await client.handle("gated").start(None)
    waiting = asyncio.ensure_future(client.handle("gated").result(run.run_id, timeout=30))
    await _until_status(client, run.run_id, "awaiting_signal")
    await asyncio.sleep(0.2)  # the waiter is registered and read once
    assert not waiting.done()
    await client.signal(run.run_id, "go", "yes")
    started = time.monotonic()
    assert await waiting == "yes"
    assert time.monotonic() - started < 5


async def test_a_waiter_whose_notification_is_lost_returns_on_the_safety_read(
    make_engine: Any, dsn: str, schema_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run made terminal behind the engine's back (no NOTIFY at all) still releases its
    result() waiters: the batched safety read finds it."""
    monkeypatch.setattr(waiters, "SAFETY", 0.5)
    await make_engine(gated)
    client = await make_engine(listen=False)
    run = await client.handle("gated").start(None)
    await _until_status(client, run.run_id, "awaiting_signal")
    waiting = [asyncio.ensure_future(client.handle("gated").result(run.run_id, timeout=30)) for _ in range(3)]
    await asyncio.sleep(0.3)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            f"UPDATE \"{schema_name}\".runs SET status = 'done', output = '\"quiet\"', finished_at = now() "
            "WHERE id = %s", (run.run_id,),
        )
    started = time.monotonic()
    assert await asyncio.gather(*waiting) == ["quiet"] * 3
    assert time.monotonic() - started < 5


async def test_wait_wakes_on_a_progress_notification(
    make_engine: Any, dsn: str, schema_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wait(step=) and wait(signal=) return on the watched run's `p` notification, with the
    safety read a minute away; the watch rows are gone afterwards."""
    monkeypatch.setattr(waiters, "SAFETY", 60.0)
    client, handle, run = await _gated_run_waiting(make_engine)
    for_signal = asyncio.ensure_future(handle.wait(run.run_id, signal="go", timeout=30))
    for_step = asyncio.ensure_future(handle.wait(run.run_id, step="after", timeout=30))
    await asyncio.sleep(0.3)
    assert not for_signal.done() and not for_step.done()
    assert await _count(dsn, f'SELECT count(*) FROM "{schema_name}".watches') == 2
    await client.signal(run.run_id, "go", 1)
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(for_signal, for_step), 5)
    assert time.monotonic() - started < 5
    assert await _count(dsn, f'SELECT count(*) FROM "{schema_name}".watches') == 0


async def test_a_step_recorded_as_the_watch_begins_ends_the_wait_without_a_wake_up(
    make_engine: Any, dsn: str, schema_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step record whose statement began before wait()'s watch committed sends no `p`
    wake-up, and may commit after wait()'s first read. Modelled by a record written in a
    transaction open across the start of the wait (no wake-up at all): wait() reads the run
    again once shortly after its watch began (handle.WATCH_SETTLE), not at the next safety
    read, a minute away here."""
    monkeypatch.setattr(waiters, "SAFETY", 60.0)
    client, handle, run = await _gated_run_waiting(make_engine)
    # the client's LISTEN connection up first: its first connect asks for a full read, which
    # would find the record too
    await handle.wait(run.run_id, step="before", timeout=5)
    await asyncio.sleep(0.5)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute(
            f'INSERT INTO "{schema_name}".steps (run_id, key, seq, kind, name, status, result, finished_at)'
            " VALUES (%s, 'after', 9, 'step', 'after', 'done', '2', now())", (run.run_id,),
        )
        for_step = asyncio.ensure_future(handle.wait(run.run_id, step="after", timeout=10))
        await asyncio.sleep(0.1)  # the watch is registered, and the first reads found nothing
        assert not for_step.done()
        await conn.commit()
    started = time.monotonic()
    await asyncio.wait_for(for_step, 5)
    assert time.monotonic() - started < 1.0


async def test_stopping_the_engine_ends_its_waiters(make_engine: Any) -> None:
    """A result() still waiting when its engine stops raises ENGINE_STATE instead of hanging."""
    await make_engine(gated)
    client = await make_engine(listen=False)
    run = await client.handle("gated").start(None)
    waiting = asyncio.ensure_future(client.handle("gated").result(run.run_id))
    await asyncio.sleep(0.3)
    await client.stop()
    with pytest.raises(iterflow.IterflowError) as info:
        await asyncio.wait_for(waiting, 5)
    assert info.value.code == "ENGINE_STATE"


async def test_a_thousand_waiters_ride_out_a_server_restart(
    private_server: PrivateServer, core: str
) -> None:
    """1,000 result() waiters, a `pg_ctl restart` (fast) while they wait: every one returns
    its own run's output."""
    dsn, schema = private_server.dsn, "waiters"
    await iterflow.migrate(dsn, schema)
    gate = asyncio.Event()

    @define_flow("held")
    async def held(ctx: Any, n: int) -> int:
        async def hold() -> int:
            await gate.wait()
            return n * 2
        return int(await ctx.step("hold", hold))

    engine = iterflow.create_engine(dsn, schema=schema, core=core, concurrency=1000, poll_interval=0.2,
                                    lease="10s")
    engine.register(held)
    try:
        await engine.listen()
        handle = engine.handle("held")
        runs = await handle.start_many([{"input": i} for i in range(1000)])
        waiting = asyncio.ensure_future(asyncio.gather(*(handle.result(r.run_id, timeout=90) for r in runs)))
        await asyncio.sleep(1.0)
        await asyncio.to_thread(private_server.stop, "fast")
        gate.set()
        await asyncio.sleep(0.5)
        await asyncio.to_thread(private_server.start)
        assert await waiting == [i * 2 for i in range(1000)]
    finally:
        await engine.stop()


async def _gated_run_waiting(make_engine: Any) -> tuple[Any, Any, Any]:
    """A worker serving ``gated``; a client-only engine, its handle of ``gated``, and a run it
    started that now waits for its signal."""
    await make_engine(gated)
    client = await make_engine(listen=False)
    handle = client.handle("gated")
    run = await handle.start(None)
    await _until_status(client, run.run_id, "awaiting_signal")
    return client, handle, run


async def _until_status(engine: Any, run_id: str, status: str) -> None:
    deadline = time.monotonic() + 10
    while (detail := await engine.status(run_id)) is None or detail.run.status != status:
        assert time.monotonic() < deadline, f"the run never became {status}"
        await asyncio.sleep(0.02)


async def _count(dsn: str, query: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        row = await (await conn.execute(query)).fetchone()
        return int(row[0]) if row else 0
