"""The test harness: week-long flows settle in well under a second; stalls explain themselves."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from iterflow import Code, define_flow, flow
from iterflow.testing import Harness, Stalled


@define_flow("week")
async def week(ctx, _inp):
    await ctx.step("welcome", lambda: "sent")
    await ctx.sleep("7d")
    try:
        answer = await ctx.signal("survey", timeout="3d")
    except Exception as exc:  # noqa: BLE001 - the timeout is the interesting path here
        answer = {"timed_out": getattr(exc, "code", None)}
    return {"answer": answer}


async def test_settles_a_7_day_sleep_and_3_day_signal_timeout_quickly(make_engine):
    engine = await make_engine(week, listen=False, poll_interval=0.05)
    async with Harness(engine) as h:
        handle = engine.handle("week")
        started = time.monotonic()
        run = await handle.start(None)
        out = await h.settle(handle, run.run_id)
        assert time.monotonic() - started < 1.0
        assert out == {"answer": {"timed_out": Code.SIGNAL_TIMEOUT}}
        assert h.now() - (await engine.status(run.run_id)).run.created_at >= timedelta(days=10)


async def test_advance_moves_time_only_forward_and_signals_still_work(make_engine):
    engine = await make_engine(week, listen=False, poll_interval=0.05)
    async with Harness(engine) as h:
        handle = engine.handle("week")
        run = await handle.start(None)
        await h.drain()
        assert (await engine.status(run.run_id)).run.status == "sleeping"
        await h.advance("6d")
        assert (await engine.status(run.run_id)).run.status == "sleeping"
        await h.advance("1d")
        assert (await engine.status(run.run_id)).run.status == "awaiting_signal"
        await engine.signal(run.run_id, "survey", {"score": 9})
        assert await h.settle(handle, run.run_id) == {"answer": {"score": 9}}


async def test_stall_is_explained(make_engine):
    waits = flow("waits-forever").signal("approval").build()
    engine = await make_engine(waits, listen=False, poll_interval=0.05)
    async with Harness(engine) as h:
        handle = engine.handle("waits-forever")
        run = await handle.start(None)
        with pytest.raises(Stalled) as info:
            await h.settle(handle, run.run_id)
        assert "waiting for signal 'approval'" in str(info.value)
        assert "engine.signal(" in str(info.value)


async def test_advance_to_next_wake_and_crons(make_engine):
    @define_flow("daily")
    async def daily(ctx, inp):
        return inp

    engine = await make_engine(daily, listen=False, poll_interval=0.05)
    engine.define_cron("nightly", "0 3 * * *", daily, {"job": "report"}, timezone="Europe/Paris")
    async with Harness(engine) as h:
        jumped = await h.advance_to_next_wake()
        assert jumped is not None and jumped <= timedelta(days=1, minutes=1)
        page = await engine.list_runs(tag="cron:nightly")
        assert len(page.runs) == 1 and page.runs[0].status == "done"
