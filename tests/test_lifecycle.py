"""Engine lifecycle: async with, idempotent listen/stop, shutdown signals, health."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import iterflow
from iterflow import create_engine, define_flow
from iterflow.errors import InvalidArgument


@define_flow("life")
async def life(ctx, _inp):
    return await ctx.step("s", lambda: "ok")


async def test_async_with_listens_and_stops(dsn, schema_name, core):
    await iterflow.migrate(dsn, schema_name)
    engine = create_engine(dsn, schema=schema_name, core=core, poll_interval=0.1)
    handle = engine.register(life)
    async with engine:
        await engine.listen()  # idempotent
        assert engine.health()["listening"] is True
        run = await handle.start(None)
        assert await handle.result(run.run_id, timeout=5) == "ok"
    assert engine.health()["open"] is False
    await engine.stop()  # idempotent


async def test_shutdown_signal_stops_gracefully_and_detaches(make_engine):
    engine = await make_engine(life)
    detach = engine.attach_shutdown_signals(("SIGTERM",))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            if not engine.health()["open"]:
                break
            await asyncio.sleep(0.02)
        assert engine.health()["open"] is False
    finally:
        detach()
    with pytest.raises(InvalidArgument):
        engine.attach_shutdown_signals(("SIGNOPE",))


async def test_stop_releases_the_leases_of_runs_it_did_not_finish(make_engine):
    """stop() with steps still running gives their leases back: another worker finishes the
    runs at once, not when the leases (30 s here) run out."""
    attempts: list[int] = []

    @define_flow("stuck-once")
    async def stuck_once(ctx, _inp):
        async def body():
            attempts.append(1)
            if len(attempts) <= 5:
                await asyncio.sleep(60)
            return "ok"

        return await ctx.step("s", body)

    first = await make_engine(stuck_once, lease="30s", shutdown_timeout="500ms")
    runs = [await first.handle("stuck-once").start(i) for i in range(5)]
    while len(attempts) < 5:
        await asyncio.sleep(0.02)
    await first.stop()
    second = await make_engine(stuck_once)
    for run in runs:
        assert await second.handle("stuck-once").result(run.run_id, timeout=5) == "ok"
