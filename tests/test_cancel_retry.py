"""Cancellation (sticky, cascading, abort tokens), retry, bulk operations, pause/resume."""

from __future__ import annotations

import asyncio
import time

import pytest

from iterflow import Code, FlowRuntimeError, RunCanceled, RunFailed, RunNotFound, define_flow
from iterflow.errors import InvalidArgument


@define_flow("waiter")
async def waiter(ctx, _inp):
    await ctx.signal("never")


@define_flow("middle")
async def middle(ctx, _inp):
    return await ctx.invoke(waiter, None)


@define_flow("top")
async def top(ctx, _inp):
    return await ctx.invoke(middle, None)


async def _until(engine, run_id, pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        detail = await engine.status(run_id)
        if pred(detail):
            return detail
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not reached; run is {detail.run.status}")


async def test_cancel_grandparent_cancels_grandchildren(make_engine):
    engine = await make_engine(waiter, middle, top)
    run = await engine.handle("top").start(None)
    detail = await _until(engine, run.run_id, lambda d: d.children and d.run.status == "awaiting_child")
    mid_id = str(detail.children[0]["id"])
    mid = await _until(engine, mid_id, lambda d: d.children)
    leaf_id = str(mid.children[0]["id"])
    await _until(engine, leaf_id, lambda d: d.run.status == "awaiting_signal")
    await engine.cancel(run.run_id, "customer left")
    for rid in (run.run_id, mid_id, leaf_id):
        d = await _until(engine, rid, lambda d: d.run.status == "canceled")
        assert d.run.error["code"] == Code.RUN_CANCELED
    with pytest.raises(RunCanceled) as info:
        await engine.handle("top").result(run.run_id, timeout=1)
    assert info.value.message == "customer left"
    # sticky: a signal to the canceled leaf is refused, a second cancel changes nothing
    assert (await engine.signal(leaf_id, "never", 1)).kind == "closed"
    await engine.cancel(run.run_id, "again")
    assert (await engine.status(run.run_id)).run.error["message"] == "customer left"


async def test_cancel_fires_abort_token_of_running_step_in_this_process(make_engine):
    seen: dict[str, object] = {}

    async def slow(s):
        seen["reason"] = await s.abort.wait()
        return "stopped"

    @define_flow("slow")
    async def slow_flow(ctx, _inp):
        await ctx.step("slow", slow)
        await ctx.step("after", lambda: 1)

    engine = await make_engine(slow_flow)
    run = await engine.handle("slow").start(None)
    await _until(engine, run.run_id, lambda d: d.run.status == "running")
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await engine.cancel(run.run_id, "stop it")
    with pytest.raises(RunCanceled):
        await engine.handle("slow").result(run.run_id, timeout=5)
    assert seen["reason"] == "stop it"
    assert time.monotonic() - t0 < 2
    steps = [s["key"] for s in (await engine.status(run.run_id)).steps]
    assert "after" not in steps


async def test_cancel_reaches_other_worker_at_lease_renewal(make_engine):
    seen: dict[str, object] = {}

    def blocking(s):
        while not s.abort.aborted:
            time.sleep(0.01)
        seen["reason"] = s.abort.reason

    @define_flow("remote-slow")
    async def remote(ctx, _inp):
        await ctx.step("block", blocking)

    await make_engine(remote, lease="900ms")
    client = await make_engine(listen=False)
    run = await client.handle("remote-slow").start(None)
    await _until(client, run.run_id, lambda d: d.run.status == "running")
    await client.cancel(run.run_id, "from elsewhere")
    with pytest.raises(RunCanceled):
        await client.handle("remote-slow").result(run.run_id, timeout=5)
    assert seen["reason"] == "from elsewhere"


async def test_cancel_unknown_run(make_engine):
    engine = await make_engine(listen=False)
    with pytest.raises(RunNotFound):
        await engine.cancel("00000000-0000-0000-0000-000000000000")


attempts: dict[str, int] = {}


def flaky_once(s):
    attempts["n"] = attempts.get("n", 0) + 1
    if attempts["n"] == 1:
        raise RuntimeError("first time fails")
    return attempts["n"]


@define_flow("retryable")
async def retryable(ctx, _inp):
    first = await ctx.step("first", lambda: "kept")
    second = await ctx.step("second", flaky_once)
    return [first, second]


async def test_retry_keeps_memos_drops_failures_and_zeroes_attempts(make_engine):
    attempts.clear()
    engine = await make_engine(retryable)
    handle = engine.handle("retryable")
    run = await handle.start(None)
    with pytest.raises(RunFailed):
        await handle.result(run.run_id, timeout=5)
    first_before = next(s for s in (await engine.status(run.run_id)).steps if s["key"] == "first")
    assert (await engine.retry(run.run_id)).kind == "queued"
    assert await handle.result(run.run_id, timeout=5) == ["kept", 2]
    detail = await engine.status(run.run_id)
    first_after = next(s for s in detail.steps if s["key"] == "first")
    assert first_after["finished_at"] == first_before["finished_at"]
    assert detail.run.attempts <= 1
    assert (await engine.retry(run.run_id)).kind == "not_failed"
    assert (await engine.retry("00000000-0000-0000-0000-000000000000")).kind == "missing"


@define_flow("fails")
async def fails(ctx, _inp):
    def bad():
        raise FlowRuntimeError("BAD", "bad", non_retryable=True)

    await ctx.step("bad", bad)


async def test_bulk_operations_filter_and_refuse_empty(make_engine):
    engine = await make_engine(fails, waiter)
    f, w = engine.handle("fails"), engine.handle("waiter")
    failed = [await f.start(None, tags=["batch:a"]) for _ in range(3)]
    other = await f.start(None, tags=["batch:b"])
    waiting = [await w.start(None, tags=["batch:a"]) for _ in range(2)]
    for r in [*failed, other]:
        with pytest.raises(RunFailed):
            await f.result(r.run_id, timeout=5)
    for bulk in (engine.cancel_many, engine.retry_many, engine.purge):
        with pytest.raises(InvalidArgument):
            await bulk({})
    # the tag filter really filters: only batch:a's waiting runs get canceled
    assert await engine.cancel_many({"tag": "batch:a", "status": ["pending", "running", "awaiting_signal"]}) == 2
    for r in waiting:
        await _until(engine, r.run_id, lambda d: d.run.status == "canceled")
    assert await engine.retry_many({"tag": "batch:b"}) == 1
    with pytest.raises(RunFailed):
        await f.result(other.run_id, timeout=5)
    purged = await engine.purge({"tag": "batch:a"})
    assert purged == 5
    assert await engine.status(failed[0].run_id) is None
    assert await engine.status(other.run_id) is not None


async def test_pause_stops_claiming_and_resume_continues(make_engine):
    @define_flow("quick")
    async def quick(ctx, _inp):
        return await ctx.step("q", lambda: 1)

    engine = await make_engine(quick)
    engine.pause()
    run = await engine.handle("quick").start(None)
    await asyncio.sleep(0.5)
    assert (await engine.status(run.run_id)).run.status == "pending"
    engine.resume()
    assert await engine.handle("quick").result(run.run_id, timeout=5) == 1


async def test_handle_wait_for_step_and_signal(make_engine):
    @define_flow("waitable")
    async def waitable(ctx, _inp):
        await ctx.step("one", lambda: 1)
        await ctx.signal("go")
        return "done"

    engine = await make_engine(waitable)
    handle = engine.handle("waitable")
    run = await handle.start(None)
    await handle.wait(run.run_id, step="one", timeout=5)
    with pytest.raises(TimeoutError):
        await handle.wait(run.run_id, signal="go", timeout=0.2)
    await engine.signal(run.run_id, "go")
    await handle.wait(run.run_id, signal="go", timeout=5)
    assert await handle.result(run.run_id, timeout=5) == "done"
