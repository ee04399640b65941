"""Durable sleeps (docs/guide.md §2, "Waits"; docs/replay.md §4): pinned deadlines, past deadlines,
surviving a worker kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from iterflow import define_flow, flow


@define_flow("nap")
async def nap(ctx, inp):
    before = ctx.now()
    await ctx.sleep(inp["for"])
    after = ctx.now()
    woke = await ctx.step("woke", lambda: datetime.now(UTC).isoformat())
    return {"before": before.isoformat(), "after": after.isoformat(), "woke": woke}


async def test_sleep_waits_and_ctx_now_is_stable(make_engine):
    engine = await make_engine(nap, poll_interval=0.05)
    handle = engine.handle("nap")
    t0 = time.monotonic()
    run = await handle.start({"for": "400ms"})
    out = await handle.result(run.run_id, timeout=10)
    assert time.monotonic() - t0 >= 0.4
    detail = await engine.status(run.run_id)
    (sleep_rec,) = [s for s in detail.steps if s["kind"] == "sleep"]
    deadline = sleep_rec["deadline"]
    # the body's clock after the sleep is the pinned deadline, not wall time
    assert datetime.fromisoformat(out["after"]) == deadline
    assert datetime.fromisoformat(out["woke"]) >= deadline
    assert datetime.fromisoformat(out["before"]) < deadline


async def test_past_deadline_fires_at_once(make_engine):
    @define_flow("past")
    async def past(ctx, _inp):
        await ctx.sleep_until(datetime(2000, 1, 1, tzinfo=UTC))
        await ctx.sleep(0)
        return "ok"

    engine = await make_engine(past)
    run = await engine.handle("past").start(None)
    assert await engine.handle("past").result(run.run_id, timeout=5) == "ok"
    assert [s["kind"] for s in (await engine.status(run.run_id)).steps] == []


async def test_builder_sleep_and_waiting_line(make_engine):
    napper = flow("builder-nap").step("a", lambda s: 1).sleep("2s").step("b", lambda s: s.input + 1).build()
    engine = await make_engine(napper)
    handle = engine.handle("builder-nap")
    run = await handle.start(None)
    for _ in range(100):
        detail = await engine.status(run.run_id)
        if detail.run.status == "sleeping":
            break
        await asyncio.sleep(0.02)
    assert detail.run.status == "sleeping"
    assert str(detail.run.waiting).startswith("sleeping until ")
    assert any(t.get("deadline") for t in detail.timers)
    assert await handle.result(run.run_id, timeout=10) == 2


WORKER = textwrap.dedent(
    """
    import asyncio, os, sys
    from iterflow import create_engine, define_flow

    @define_flow("long-nap")
    async def long_nap(ctx, inp):
        await ctx.step("before", lambda: os.getpid())
        await ctx.sleep(inp["seconds"])
        return await ctx.step("after", lambda: os.getpid())

    async def main():
        engine = create_engine(sys.argv[1], schema=sys.argv[2], core=sys.argv[3], lease="1s",
                               poll_interval=0.1)
        engine.register(long_nap)
        await engine.listen()
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def _spawn(tmp_path: Path, dsn: str, schema: str, core: str) -> subprocess.Popen[str]:
    script = tmp_path / "sleep_worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "python"))
    proc = subprocess.Popen([sys.executable, str(script), dsn, schema, core], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


async def test_sleep_survives_worker_kill_and_restart(make_engine, dsn, schema_name, core, tmp_path):
    client = await make_engine(listen=False)
    handle = client.handle("long-nap")
    first = _spawn(tmp_path, dsn, schema_name, core)
    try:
        run = await handle.start({"seconds": 2})
        for _ in range(200):
            if (await client.status(run.run_id)).run.status == "sleeping":
                break
            await asyncio.sleep(0.02)
        assert (await client.status(run.run_id)).run.status == "sleeping"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    second = _spawn(tmp_path, dsn, schema_name, core)
    try:
        out = await handle.result(run.run_id, timeout=15)
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait()
    detail = await client.status(run.run_id)
    before = next(s for s in detail.steps if s["key"] == "before")
    sleep_rec = next(s for s in detail.steps if s["kind"] == "sleep")
    assert before["result"] == first.pid and out == second.pid
    after = next(s for s in detail.steps if s["key"] == "after")
    assert after["finished_at"] >= sleep_rec["deadline"]
    assert sleep_rec["deadline"] - before["finished_at"] >= timedelta(seconds=1.9)


async def _suspended_without_a_worker(make_engine, body, status):
    """A run of ``body`` suspended in ``status`` by a worker that then stopped (no sticky cache:
    nothing is held), and a client core: the claims below are the test's own."""
    worker = await make_engine(body, sticky_cache=0)
    run = await worker.handle(body.name).start(None)
    for _ in range(200):
        if (await worker.status(run.run_id)).run.status == status:
            break
        await asyncio.sleep(0.025)
    assert (await worker.status(run.run_id)).run.status == status
    await worker.stop()
    client = await make_engine(listen=False)
    return run, client, await client.client()


async def test_the_claim_closes_a_sleep_that_is_over(make_engine):
    """A run woken from its sleep gets the sleep's record closed by the claim itself, so the
    resumed body goes on without writing it first (queries.sql, claim_with_history)."""

    @define_flow("closed-by-claim")
    async def short(ctx, _inp):
        await ctx.sleep("200ms")
        return await ctx.step("after", lambda: "ok")

    run, _, core = await _suspended_without_a_worker(make_engine, short, "sleeping")
    await asyncio.sleep(0.3)
    (claimed,) = await core.claim(["closed-by-claim"], 10, "probe", 30_000)
    rec = claimed.history["sleep"]
    assert rec.status == "done" and rec.deadline is not None
    assert rec.finished_at is not None and rec.finished_at >= rec.deadline


async def test_the_claim_leaves_a_sleep_that_is_not_over(make_engine):
    """Woken early (a signal raced the sleep), the run's sleep record stays open."""

    @define_flow("woken-early")
    async def race(ctx, _inp):
        sig = asyncio.ensure_future(ctx.signal("go"))
        nap = asyncio.ensure_future(ctx.sleep("1h"))
        done, pending = await asyncio.wait({sig, nap}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return "signal" if sig in done else "slept"

    run, client, core = await _suspended_without_a_worker(make_engine, race, "sleeping")
    assert (await client.signal(run.run_id, "go", 1)).kind == "delivered"
    (claimed,) = await core.claim(["woken-early"], 10, "probe", 30_000)
    assert claimed.history["sleep"].status == "waiting"
    assert claimed.history["signal:go"].status == "done"
