"""``ctx.continue_as_new`` (docs/guide.md, "Loops that run forever"): the run ends and its
successor starts in one transaction; callers holding the first id follow the chain."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg import sql
from pydantic import BaseModel

from iterflow import Code, Limits, RunCanceled, RunFailed, define_flow
from iterflow.cli import _show_text
from iterflow.errors import IterflowError
from iterflow.services import new_id
from iterflow.testing import Harness


@define_flow("looper")
async def looper(ctx, inp):
    n = await ctx.step("inc", lambda: inp["n"] + 1)
    if n < inp["until"]:
        ctx.continue_as_new({"n": n, "until": inp["until"]})
    return {"final": n}


@define_flow("agent")
async def agent(ctx, inp):
    turn = await ctx.signal("turn")
    if turn == "stop":
        return {"turns": inp["turns"]}
    ctx.continue_as_new({"turns": inp["turns"] + 1})


class Count(BaseModel):
    n: int
    note: str = ""


@define_flow("typed", input=Count)
async def typed(ctx, inp):
    try:
        ctx.continue_as_new({"n": "not a number"})
    except IterflowError as exc:
        bad_schema = exc.code
    try:
        ctx.continue_as_new({"n": 1, "note": "x" * 2000})  # over max_input_bytes
    except IterflowError as exc:
        too_large = exc.code
    return {"schema": bad_schema, "size": too_large, "n": inp.n}


@define_flow("misuse")
async def misuse(ctx, inp):
    if inp == "step":
        async def inside():
            ctx.continue_as_new(None)

        return await ctx.step("inside", inside)

    async def other_branch():
        await asyncio.sleep(0)
        ctx.continue_as_new(None)

    await asyncio.gather(ctx.sleep("1h"), other_branch())
    return "unreachable"


@define_flow("swallows")
async def swallows(ctx, n):
    await ctx.step("work", lambda: n)
    if n == 0:
        try:
            ctx.continue_as_new(1)
        except BaseException:  # noqa: BLE001 - user code that swallows everything
            pass
        try:
            await ctx.step("after", lambda: "never runs")
        except BaseException:  # noqa: BLE001
            pass
        return "swallowed"
    return {"n": n}


@define_flow("child_loop")
async def child_loop(ctx, inp):
    if inp < 3:
        ctx.continue_as_new(inp + 1)
    return inp * 10


@define_flow("loop_parent")
async def loop_parent(ctx, _inp):
    return await ctx.invoke(child_loop, 0)


async def chain_of(engine, run_id):
    """The runs of the chain from ``run_id``, walked through status()."""
    runs = []
    while run_id is not None:
        detail = await engine.status(run_id)
        runs.append(detail)
        run_id = detail.run.continued_to
    return runs


async def test_chain_of_five_continuations_ends_with_the_output_and_result_of_the_first_id_follows(
    make_engine, dsn, schema_name
):
    continued = []
    engine = await make_engine(looper, metrics={"run_continued": lambda: continued.append(1)})
    handle = engine.handle("looper")
    first = await handle.start({"n": 0, "until": 6}, tags=["nightly"], priority=3)
    assert await handle.result(first.run_id, timeout=20) == {"final": 6}
    assert len(continued) == 5
    runs = await chain_of(engine, first.run_id)
    assert len(runs) == 6  # five continuations
    assert runs[0].run.continued_from is None
    for before, after in zip(runs, runs[1:], strict=False):
        assert after.run.continued_from == before.run.run_id
        assert before.run.status == "done" and before.run.output is None
        assert after.run.tags == ("nightly",)
    assert runs[-1].run.output == {"final": 6} and runs[-1].run.continued_to is None
    assert [d.run.input["n"] for d in runs] == [0, 1, 2, 3, 4, 5]
    # every run has its own, bounded history: one step each
    assert all(len(d.steps) == 1 for d in runs)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(sql.SQL("SELECT DISTINCT priority, depth FROM {}").format(
            sql.Identifier(schema_name, "runs")))
        assert await cur.fetchall() == [(3, 1)]


async def test_idempotent_start_returns_the_chain_and_signals_follow_it(make_engine):
    engine = await make_engine(agent)
    handle = engine.handle("agent")
    first = await handle.start({"turns": 0}, idempotency_key="conversation-1")
    await engine.signal(first.run_id, "turn", "go")
    second = None
    for _ in range(200):  # until the continuation committed
        second = (await engine.status(first.run_id)).run.continued_to
        if second is not None:
            break
        await asyncio.sleep(0.05)
    assert second is not None
    again = await handle.start({"turns": 99}, idempotency_key="conversation-1")
    assert again.created is False and again.run_id == second  # the key moved to the live run
    assert (await engine.status(first.run_id)).run.status == "done"
    # a signal naming the first run goes to the chain's live run
    sent = await engine.signal(first.run_id, "turn", "stop")
    assert sent.kind in ("delivered", "buffered")
    assert await handle.result(first.run_id, timeout=20) == {"turns": 1}
    assert await handle.result(second, timeout=5) == {"turns": 1}


async def test_cancel_of_the_first_id_cancels_the_chain(make_engine):
    engine = await make_engine(agent)
    handle = engine.handle("agent")
    first = await handle.start({"turns": 0})
    await engine.signal(first.run_id, "turn", "go")
    await engine.signal(first.run_id, "turn", "go")
    await engine.cancel(first.run_id, "user left")
    with pytest.raises(RunCanceled):
        await handle.result(first.run_id, timeout=20)
    runs = await chain_of(engine, first.run_id)
    assert runs[-1].run.status == "canceled"
    assert all(d.run.status == "done" for d in runs[:-1])


async def test_bad_input_is_rejected_in_the_body_with_nothing_written(make_engine):
    engine = await make_engine(typed, limits=Limits(max_input_bytes=1000))
    handle = engine.handle("typed", input_schema=Count)
    run = await handle.start({"n": 5})
    out = await handle.result(run.run_id, timeout=20)
    assert out == {"schema": Code.INPUT_INVALID, "size": Code.INPUT_TOO_LARGE, "n": 5}
    page = await engine.list_runs(name="typed")
    assert [r.run_id for r in page.runs] == [run.run_id]  # no successor was made
    assert (await engine.status(run.run_id)).run.continued_to is None


@pytest.mark.parametrize(("where", "code"), [
    ("step", Code.STEP_INVALID_AWAIT),
    ("branch", Code.CONTINUE_AS_NEW_INVALID),
])
async def test_continue_as_new_inside_a_step_or_beside_a_live_branch_fails_typed(make_engine, where, code):
    engine = await make_engine(misuse)
    handle = engine.handle("misuse")
    run = await handle.start(where)
    with pytest.raises(RunFailed) as failed:
        await handle.result(run.run_id, timeout=20)
    assert failed.value.code == code
    page = await engine.list_runs(name="misuse")
    assert len(page.runs) == 1


async def test_a_swallowed_continuation_still_continues(make_engine):
    engine = await make_engine(swallows)
    handle = engine.handle("swallows")
    run = await handle.start(0)
    assert await handle.result(run.run_id, timeout=20) == {"n": 1}
    first = await engine.status(run.run_id)
    assert [s["key"] for s in first.steps] == ["work"]  # the ctx call after it did nothing
    assert first.run.output is None and first.run.continued_to is not None
    text = _show_text(first)
    assert f"continued as new: {first.run.continued_to}" in text
    assert f"continues {run.run_id}" in _show_text(await engine.status(first.run.continued_to))


async def test_a_child_that_continues_keeps_its_parent_waiting_for_the_chain(make_engine):
    engine = await make_engine(child_loop, loop_parent)
    handle = engine.handle("loop_parent")
    run = await handle.start()
    assert await handle.result(run.run_id, timeout=20) == 30
    children = (await engine.status(run.run_id)).children
    assert len(children) == 4  # the first child and its three successors, all under the parent


@define_flow("daily")
async def daily(ctx, day):
    await ctx.sleep("1d")
    if day < 3:
        ctx.continue_as_new(day + 1)
    return day


async def test_the_harness_settles_a_chain_across_its_timers(make_engine):
    engine = await make_engine(daily, listen=False, poll_interval=0.05)
    async with Harness(engine) as h:
        handle = engine.handle("daily")
        run = await handle.start(0)
        assert await h.settle(handle, run.run_id) == 3
        assert len((await engine.list_runs(name="daily")).runs) == 4


async def test_continue_run_is_fenced_and_a_repeat_changes_nothing(make_engine):
    engine = await make_engine(looper, listen=False)
    handle = engine.handle("looper")
    first = await handle.start({"n": 0, "until": 2})
    core = await engine.client()
    (claimed,) = await core.claim(["looper"], 1, "test-worker", 60_000)
    successor = new_id()
    assert await core.continue_run(first.run_id, claimed.lease_token, successor, '{"n": 1, "until": 2}')
    # the same call again (its answer lost): true, and nothing new
    assert await core.continue_run(first.run_id, claimed.lease_token, successor, '{"n": 1, "until": 2}')
    # a stale worker's continuation (another successor id) is fenced
    assert not await core.continue_run(first.run_id, claimed.lease_token, new_id(), '{"n": 9, "until": 2}')
    page = await engine.list_runs(name="looper")
    assert sorted(r.run_id for r in page.runs) == sorted([first.run_id, successor])
    after = await engine.status(successor)
    assert after.run.status == "pending" and after.run.continued_from == first.run_id
    assert after.run.input == {"n": 1, "until": 2}


GATE = {"entered": None, "release": None}


@define_flow("gated")
async def gated(ctx, inp):
    async def wait_for_test():
        GATE["entered"].set()
        await GATE["release"].wait()
        return inp

    n = await ctx.step("gate", wait_for_test)
    if n == 0:
        ctx.continue_as_new(1)
    return n


async def test_a_backend_killed_during_the_continuation_never_yields_two_successors(make_engine, dsn, schema_name):
    GATE["entered"], GATE["release"] = asyncio.Event(), asyncio.Event()
    engine = await make_engine(gated, database_retry_timeout="30s")
    handle = engine.handle("gated")
    first = await handle.start(0)
    await asyncio.wait_for(GATE["entered"].wait(), 10)
    runs = sql.Identifier(schema_name, "runs")
    async with await psycopg.AsyncConnection.connect(dsn) as blocker:
        # hold the run's row (not against the step record's key-share check, against the
        # continuation's FOR UPDATE): the continuation blocks inside its transaction
        await blocker.execute(sql.SQL("SELECT 1 FROM {} WHERE id = %s FOR NO KEY UPDATE").format(runs),
                              (first.run_id,))
        GATE["release"].set()
        killed = 0
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
            for _ in range(400):
                cur = await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND query LIKE %s AND pid <> pg_backend_pid()",
                    ("%continue_run%",),
                )
                killed += len(await cur.fetchall())
                if killed >= 2:
                    break
                await asyncio.sleep(0.05)
        assert killed >= 2  # two attempts died mid-transaction; the retry layer tried again
        await blocker.rollback()
    GATE["entered"], GATE["release"] = asyncio.Event(), asyncio.Event()
    GATE["release"].set()
    assert await handle.result(first.run_id, timeout=30) == 1
    page = await engine.list_runs(name="gated")
    assert len(page.runs) == 2  # the first run and exactly one successor
    (chain_end,) = [r for r in page.runs if r.run_id != first.run_id]
    assert (await engine.status(first.run_id)).run.continued_to == chain_end.run_id


async def test_a_bad_continuation_input_fails_the_run_when_uncaught(make_engine):
    @define_flow("unstorable")
    async def unstorable(ctx, _inp):
        ctx.continue_as_new({"x": object()})

    engine = await make_engine(unstorable)
    handle = engine.handle("unstorable")
    run = await handle.start()
    with pytest.raises(RunFailed) as failed:
        await handle.result(run.run_id, timeout=20)
    assert failed.value.code == Code.INVALID_ARGUMENT
    assert [r.run_id for r in (await engine.list_runs(name="unstorable")).runs] == [run.run_id]
