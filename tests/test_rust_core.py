"""The Rust core specifically (docs/architecture.md §4): one LISTEN connection and a bounded pool per engine,
group commit, and recovery from ``kill -9`` of a worker process under load."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import iterflow
from iterflow import define_flow

pytest.importorskip("iterflow._core")
from iterflow.cores.rust import RustCore


async def _rows(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, args or None)
        return await cur.fetchall() if cur.description else []


async def _connections(dsn: str, schema: str) -> tuple[int, int]:
    """(LISTEN connections, other connections) of Rust cores on ``schema``."""
    rows = await _rows(
        dsn,
        "SELECT count(*) FILTER (WHERE application_name = %s), count(*) FILTER (WHERE application_name = %s) "
        "FROM pg_stat_activity",
        f"iterflow-listen:{schema}", f"iterflow:{schema}",
    )
    return int(rows[0][0]), int(rows[0][1])


@define_flow("busy")
async def busy(ctx: Any, n: int) -> Any:
    a = await ctx.step("a", lambda: n)
    await ctx.step("b", lambda: time.sleep(0.002))
    return {"n": a}


async def test_one_listen_connection_and_a_bounded_pool(dsn: str, schema_name: str) -> None:
    await iterflow.migrate(dsn, schema_name)
    engine = iterflow.create_engine(dsn, schema=schema_name, core="rust", concurrency=6, poll_interval=0.2)
    assert isinstance(engine.core.inner, RustCore)  # (under the retry layer)
    handle = engine.register(busy)
    try:
        await engine.listen()
        pool_size = engine.core._pool_size
        runs = await handle.start_many([{"input": i} for i in range(300)])
        waiters = [asyncio.ensure_future(handle.result(r.run_id, timeout=60)) for r in runs]
        seen: list[tuple[int, int]] = []
        while not all(w.done() for w in waiters):
            seen.append(await _connections(dsn, schema_name))
            await asyncio.sleep(0.02)
        assert [w.result() for w in waiters] == [{"n": i} for i in range(300)]
        seen.append(await _connections(dsn, schema_name))
        assert len(seen) >= 3
        assert all(listen == 1 for listen, _ in seen), seen
        assert all(other <= pool_size for _, other in seen), (pool_size, seen)
        assert max(other for _, other in seen) >= 1
        stats = engine.core.stats()
        assert stats["listening"] is True
        # group commit: far fewer write transactions than writes (600 records + 300 finishes)
        assert stats["writes"] >= 900
        assert stats["write_transactions"] < stats["writes"], stats
    finally:
        await engine.stop()
    # closed: no connection of this engine is left behind
    deadline = time.monotonic() + 5
    while await _connections(dsn, schema_name) != (0, 0):
        assert time.monotonic() < deadline, await _connections(dsn, schema_name)
        await asyncio.sleep(0.05)


async def test_schema_mismatch_is_the_typed_error(dsn: str, schema_name: str) -> None:
    core = RustCore(dsn, schema=schema_name, pool_size=2, notify=False)
    await core.open()
    try:
        with pytest.raises(iterflow.errors.SchemaMismatch) as info:
            await core.check_schema()
        assert info.value.code == "SCHEMA_MISMATCH"
        assert f"iterflow migrate --schema {schema_name}" in info.value.message
    finally:
        await core.close()


_WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    import psycopg
    import iterflow
    from iterflow import define_flow

    dsn, schema, role, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    async def main():
        effects = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        lock = asyncio.Lock()

        async def effect(run_id, key):
            async with lock:
                await effects.execute(
                    f'INSERT INTO "{schema}".effects (run_id, key, pid) VALUES (%s, %s, %s)',
                    (run_id, key, role))

        @define_flow("crash")
        async def crash(ctx, n):
            async def a():
                await effect(ctx.run_id, "a")
                return n
            async def b():
                await effect(ctx.run_id, "b")
                await asyncio.sleep(0.005)  # mid-step when the kill lands
                return n * 2
            async def c():
                await effect(ctx.run_id, "c")
                return n * 3
            x = await ctx.step("a", a)
            y = await ctx.step("b", b)
            z = await ctx.step("c", c)
            return [x, y, z]

        engine = iterflow.create_engine(dsn, schema=schema, core="rust", concurrency=32, lease="1s",
                                        poll_interval=0.2, reconciler=False)
        engine.register(crash)
        await engine.listen()
        print("listening", flush=True)
        while True:
            await asyncio.sleep(0.1)
            if role == "second":
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
                    cur = await c.execute(f'SELECT count(*) FROM "{schema}".runs WHERE status = %s', ("done",))
                    if (await cur.fetchone())[0] >= total:
                        break
        await engine.stop()

    asyncio.run(main())
    """
)


def _spawn(script: Path, dsn: str, schema: str, role: str, total: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, str(script), dsn, schema, role, str(total)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "listening", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


async def test_kill_9_of_a_worker_mid_step_loses_nothing(dsn: str, schema_name: str, tmp_path: Path) -> None:
    total = 2000
    await iterflow.migrate(dsn, schema_name)
    await _rows(dsn, f'CREATE TABLE "{schema_name}".effects (run_id uuid, key text, pid text, '
                     'at timestamptz DEFAULT clock_timestamp())')
    client = iterflow.create_engine(dsn, schema=schema_name, core="rust", notify=False)
    handle = client.handle("crash")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    first = second = None
    try:
        started = await handle.start_many([{"input": i} for i in range(total)])
        assert len({s.run_id for s in started}) == total
        first = await asyncio.to_thread(_spawn, script, dsn, schema_name, "first", total)
        # let it get well into the load, then kill -9 while runs are leased mid-step
        deadline = time.monotonic() + 60
        while True:
            (done,), = await _rows(dsn, f'SELECT count(*) FROM "{schema_name}".runs WHERE status = %s', "done")
            if done >= total // 4:
                break
            assert time.monotonic() < deadline, f"first worker too slow: {done} done"
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            await asyncio.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        await asyncio.sleep(0.3)  # commits already sent by the killed worker land
        (leased,), = await _rows(dsn, f'SELECT count(*) FROM "{schema_name}".queue WHERE lease_until IS NOT NULL')
        (done_at_kill,), = await _rows(dsn, f'SELECT count(*) FROM "{schema_name}".runs WHERE status = %s', "done")
        assert leased > 0, "the kill landed while no run was leased: nothing was tested"
        assert done_at_kill < total

        second = await asyncio.to_thread(_spawn, script, dsn, schema_name, "second", total)
        await asyncio.to_thread(second.wait, 75)
        assert second.returncode == 0, second.stderr.read() if second.stderr else ""

        # every run finished with the right output: none lost
        rows = await _rows(dsn, f'SELECT status, output, input FROM "{schema_name}".runs')
        assert len(rows) == total
        assert all(st == "done" for st, _, _ in rows)
        assert all(out == [n, 2 * n, 3 * n] for _, out, n in rows)
        (queued,), = await _rows(dsn, f'SELECT count(*) FROM "{schema_name}".queue')
        assert queued == 0
        # exactly one final record per step of every run
        (records,), = await _rows(dsn, f"SELECT count(*) FROM \"{schema_name}\".steps WHERE status = 'done'")
        assert records == 3 * total
        # a recorded step never ran again: no side effect after its record was written
        (late,), = await _rows(
            dsn,
            f'SELECT count(*) FROM "{schema_name}".effects e JOIN "{schema_name}".steps s '
            f"ON s.run_id = e.run_id AND s.key = e.key WHERE e.at > s.finished_at",
        )
        assert late == 0
        # at-least-once: re-executions only for runs that were in flight at the kill
        (effects,), = await _rows(dsn, f'SELECT count(*) FROM "{schema_name}".effects')
        assert effects >= 3 * total
        (rerun_runs,), = await _rows(
            dsn,
            f'SELECT count(DISTINCT run_id) FROM (SELECT run_id, key FROM "{schema_name}".effects '
            f"GROUP BY run_id, key HAVING count(*) > 1) d",
        )
        assert rerun_runs <= leased, (rerun_runs, leased)
        (took_over,), = await _rows(
            dsn, f'SELECT count(DISTINCT run_id) FROM "{schema_name}".effects WHERE pid = %s', "second"
        )
        # the second worker did the rest (runs whose last record landed just before the kill
        # finish on replay without running a step, so this is a lower bound)
        assert took_over >= (total - done_at_kill) // 2, (took_over, total, done_at_kill, leased)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        await client.stop()
