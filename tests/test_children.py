"""Child flows (docs/replay.md §7): invoke, fan-out/fan-in, caps, failures, idempotent spawn."""

from __future__ import annotations

import asyncio
import time

import pytest

from iterflow import Code, FlowRuntimeError, RunFailed, define_flow


@define_flow("square")
async def square(ctx, inp):
    return await ctx.step("sq", lambda: inp["x"] * inp["x"])


@define_flow("boom")
async def boom(ctx, _inp):
    def fail():
        raise FlowRuntimeError("CHILD_BROKE", "nope", non_retryable=True)

    return await ctx.step("fail", fail)


@define_flow("parent")
async def parent(ctx, inp):
    one = await ctx.invoke(square, {"x": inp["x"]})
    return {"one": one}


@define_flow("fanout")
async def fanout(ctx, inp):
    outs = await ctx.invoke_all([(square, {"x": i}) for i in range(inp["n"])])
    return outs


@define_flow("catches")
async def catches(ctx, _inp):
    try:
        await ctx.invoke(boom, None)
    except FlowRuntimeError as exc:
        return {"code": exc.code, "retryable": not exc.non_retryable}
    return "unreachable"


async def test_invoke_returns_child_output_and_links_child(make_engine):
    engine = await make_engine(square, parent)
    handle = engine.handle("parent")
    run = await handle.start({"x": 7})
    assert await handle.result(run.run_id, timeout=10) == {"one": 49}
    detail = await engine.status(run.run_id)
    (child,) = detail.children
    assert child["status"] == "done" and child["parent_key"] == "invoke:square@1"
    # a replay of the parent never spawns twice: one child row for the key
    (rec,) = [s for s in detail.steps if s["kind"] == "invoke"]
    assert str(rec["child_id"]) == str(child["id"])


async def test_without_notify_a_child_and_its_parent_run_without_waiting_for_the_poll(make_engine):
    # nothing notifies this worker: a start in its own process wakes it, the parent's
    # suspension made its child claimable and the child's finish woke the parent, and the
    # worker claims again as each of them ends
    engine = await make_engine(square, parent, notify=False, poll_interval=30)
    handle = engine.handle("parent")
    await asyncio.sleep(0.3)  # the worker's first claim found nothing: it waits for a wake-up
    run = await handle.start({"x": 3})
    assert await handle.result(run.run_id, timeout=10) == {"one": 9}


@pytest.mark.parametrize("sticky_cache", [0, 1000], ids=["replay", "held"])
async def test_a_child_finished_in_another_process_wakes_its_parent_at_once(make_engine, sticky_cache):
    """The parent's worker serves no child flow and polls every 5 s: only the announcement of
    the parent's wake-up (`q`, or `h` to the worker holding it; migration 0013) can resume it
    within the 3 s asserted."""
    parents = await make_engine(parent, poll_interval=5.0, sticky_cache=sticky_cache)
    await make_engine(square, poll_interval=5.0, sticky_cache=sticky_cache)
    handle = parents.handle("parent")
    for x in (2, 3):  # the second parent is woken while the worker is idle, the first one too
        started = time.monotonic()
        run = await handle.start({"x": x})
        assert await handle.result(run.run_id, timeout=10) == {"one": x * x}
        assert time.monotonic() - started < 3.0


async def test_a_wake_up_racing_the_claim_is_not_lost(make_engine):
    """A child that finishes between a claim's snapshot and its lock on the parent's queue row
    is in that row (woken) but not in the history the claim returns. The claim used to clear
    the flag anyway: the parent, blind to the child, suspended for good (1 round in ~15 of
    this shape). The claim now keeps the flag for a row changed after its snapshot
    (queries.sql, claim_with_history), and every round finishes."""
    engine = await make_engine(square, fanout, concurrency=8, poll_interval=1.0)
    handle = engine.handle("fanout")
    for _ in range(40):
        runs = await handle.start_many([{"input": {"n": 10}}] * 3)
        for run in runs:
            assert await handle.result(run.run_id, timeout=10) == [i * i for i in range(10)]


async def test_fanout_of_200_joins_in_order(make_engine):
    engine = await make_engine(square, fanout, concurrency=20)
    handle = engine.handle("fanout")
    run = await handle.start({"n": 200})
    out = await handle.result(run.run_id, timeout=60)
    assert out == [i * i for i in range(200)]
    detail = await engine.status(run.run_id)
    assert len(detail.children) == 200


async def test_child_failure_raises_non_retryable_with_child_code(make_engine):
    engine = await make_engine(boom, catches)
    handle = engine.handle("catches")
    run = await handle.start(None)
    assert await handle.result(run.run_id, timeout=10) == {"code": "CHILD_BROKE", "retryable": False}


async def test_uncaught_child_failure_fails_parent(make_engine):
    @define_flow("parent-of-boom")
    async def p(ctx, _inp):
        return await ctx.invoke(boom, None)

    engine = await make_engine(boom, p)
    run = await engine.handle("parent-of-boom").start(None)
    with pytest.raises(RunFailed) as info:
        await engine.handle("parent-of-boom").result(run.run_id, timeout=10)
    assert info.value.code == "CHILD_BROKE"


@define_flow("recurse")
async def recurse(ctx, inp):
    if inp["depth"] <= 0:
        return 0
    return 1 + await ctx.invoke(recurse, {"depth": inp["depth"] - 1})


async def test_depth_cap(make_engine):
    engine = await make_engine(recurse, limits={"max_invoke_depth": 3})
    handle = engine.handle("recurse")
    ok = await handle.start({"depth": 2})
    assert await handle.result(ok.run_id, timeout=10) == 2
    deep = await handle.start({"depth": 5})
    with pytest.raises(RunFailed) as info:
        await handle.result(deep.run_id, timeout=10)
    assert info.value.code == Code.INVOKE_DEPTH_EXCEEDED


async def test_fanout_cap(make_engine):
    engine = await make_engine(square, fanout, limits={"max_children_per_run": 5})
    handle = engine.handle("fanout")
    run = await handle.start({"n": 6})
    with pytest.raises(RunFailed) as info:
        await handle.result(run.run_id, timeout=10)
    assert info.value.code == Code.INVOKE_FANOUT_EXCEEDED
    assert (await engine.status(run.run_id)).children == []


async def test_child_input_validated_before_spawn(make_engine):
    from pydantic import BaseModel

    class In(BaseModel):
        x: int

    @define_flow("typed-child", input=In)
    async def typed_child(ctx, inp):
        return inp.x

    @define_flow("bad-parent")
    async def bad_parent(ctx, _inp):
        return await ctx.invoke(typed_child, {"x": "not a number"})

    engine = await make_engine(typed_child, bad_parent)
    run = await engine.handle("bad-parent").start(None)
    with pytest.raises(RunFailed) as info:
        await engine.handle("bad-parent").result(run.run_id, timeout=10)
    assert info.value.code == Code.INPUT_INVALID
