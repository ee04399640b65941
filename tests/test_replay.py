"""Replay semantics (docs/replay.md §2, §4): cursor keys, parallel branches, swallowed suspensions."""

from __future__ import annotations

import asyncio
import time

from iterflow import define_flow


async def test_parallel_branches_start_when_a_sibling_suspends(make_engine):
    ran: list[str] = []

    @define_flow("parallel")
    async def parallel(ctx, _inp):
        async def branch_a():
            await ctx.sleep("300ms")
            return await ctx.step("a", lambda: ran.append("a") or "a")

        async def branch_b():
            return await ctx.step("b", lambda: ran.append("b") or "b")

        async def branch_c():
            await ctx.signal("slow-signal", timeout="10s")

        results = await asyncio.gather(branch_a(), branch_b(), asyncio.wait_for(branch_c(), None),
                                       return_exceptions=False)
        return results[:2]

    engine = await make_engine(parallel, poll_interval=0.05)
    handle = engine.handle("parallel")
    run = await handle.start(None)
    t0 = time.monotonic()
    await handle.wait(run.run_id, step="b", timeout=5)
    detail = await engine.status(run.run_id)
    deadline = time.monotonic() + 5
    while len(detail.steps) < 3 and time.monotonic() < deadline:  # branches' records land independently
        await asyncio.sleep(0.01)
        detail = await engine.status(run.run_id)
    # b ran although a and c suspended in the same pass; keys follow call order
    assert [s["key"] for s in sorted(detail.steps, key=lambda s: s["seq"])][:3] == ["sleep", "b", "signal:slow-signal"]
    # the run wakes at the earliest deadline (the 300ms sleep), not the 10s signal timeout
    await handle.wait(run.run_id, step="a", timeout=5)
    assert time.monotonic() - t0 < 3
    await engine.signal(run.run_id, "slow-signal", 1)
    assert await handle.result(run.run_id, timeout=5) == ["a", "b"]
    assert ran.count("b") == 1 and ran.count("a") == 1


async def test_swallowed_suspension_still_suspends(make_engine):
    @define_flow("swallow")
    async def swallow(ctx, _inp):
        try:
            await ctx.signal("go")
        except BaseException:  # noqa: BLE001 - deliberately hostile user code
            pass
        return "returned early"

    engine = await make_engine(swallow)
    handle = engine.handle("swallow")
    run = await handle.start(None)
    for _ in range(100):
        if (await engine.status(run.run_id)).run.status == "awaiting_signal":
            break
        await asyncio.sleep(0.02)
    assert (await engine.status(run.run_id)).run.status == "awaiting_signal"
    await engine.signal(run.run_id, "go")
    assert await handle.result(run.run_id, timeout=5) == "returned early"


async def test_log_is_emitted_once_across_replays(make_engine, caplog):
    @define_flow("logger")
    async def logger_flow(ctx, _inp):
        ctx.log("hello once", who="test")
        await ctx.sleep("100ms")
        ctx.log("after sleep")
        return "ok"

    engine = await make_engine(logger_flow, poll_interval=0.05)
    with caplog.at_level("INFO", logger="iterflow"):
        run = await engine.handle("logger").start(None)
        assert await engine.handle("logger").result(run.run_id, timeout=5) == "ok"
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("hello once") == 1
    assert messages.count("after sleep") == 1
    keys = [s["key"] for s in (await engine.status(run.run_id)).steps if s["kind"] == "log"]
    assert keys == ["log", "log:1"]
