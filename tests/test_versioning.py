"""Versioning and drift (docs/replay.md §6): pinned versions, parking, drift="fail", resume on deploy."""

from __future__ import annotations

import asyncio
import time

import pytest

from iterflow import Code, RunFailed, define_flow, flow


async def _until_status(engine, run_id, status, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        detail = await engine.status(run_id)
        if detail.run.status == status:
            return detail
        await asyncio.sleep(0.02)
    raise AssertionError(f"run is {detail.run.status}, wanted {status}")


def _body_v1(step_name: str):
    @define_flow("onboard", version=1)
    async def onboard(ctx, _inp):
        await ctx.step(step_name, lambda: "created")
        await ctx.signal("go")
        return await ctx.step("finish", lambda: "finished")

    return onboard


async def test_renamed_step_parks_and_original_resumes(make_engine):
    original = await make_engine(_body_v1("create"))
    handle = original.handle("onboard")
    run = await handle.start(None)
    await _until_status(original, run.run_id, "awaiting_signal")
    await original.stop()

    renamed = await make_engine(_body_v1("create-account"))
    await renamed.signal(run.run_id, "go")
    parked = await _until_status(renamed, run.run_id, "parked")
    assert parked.run.waiting.kind == "parked"
    assert parked.run.waiting.code == Code.REPLAY_NON_DETERMINISTIC
    assert "create" in str(parked.run.waiting)
    # parking does not burn the run's attempts: the claim that found the drift is given back
    assert parked.run.attempts == 0
    await renamed.stop()

    fixed = await make_engine(_body_v1("create"))
    assert await fixed.handle("onboard").result(run.run_id, timeout=10) == "finished"


def _builder(step: str, version: int = 1):
    return flow("shipping").version(version).step(step, lambda s: 1).signal("go").step("b", lambda s: 2).build()


async def test_builder_static_check_parks_before_executing(make_engine):
    first = await make_engine(_builder("a"))
    run = await first.handle("shipping").start(None)
    await _until_status(first, run.run_id, "awaiting_signal")
    await first.stop()

    drifted = await make_engine(_builder("a-renamed"))
    await drifted.signal(run.run_id, "go")
    parked = await _until_status(drifted, run.run_id, "parked")
    assert parked.run.waiting.code == Code.REPLAY_INCOMPATIBLE_VERSION
    await drifted.stop()

    back = await make_engine(_builder("a"))
    assert await back.handle("shipping").result(run.run_id, timeout=10) == 2


async def test_drift_fail_mode_fails_the_run(make_engine):
    first = await make_engine(_builder("a"))
    run = await first.handle("shipping").start(None)
    await _until_status(first, run.run_id, "awaiting_signal")
    await first.stop()
    strict = await make_engine(_builder("zzz"), drift="fail")
    await strict.signal(run.run_id, "go")
    with pytest.raises(RunFailed) as info:
        await strict.handle("shipping").result(run.run_id, timeout=10)
    assert info.value.code == Code.REPLAY_INCOMPATIBLE_VERSION


async def test_unknown_version_parks_until_a_worker_knows_it(make_engine):
    v2 = flow("shipping").version(2).step("v2-only", lambda s: "v2").build()
    old = await make_engine(_builder("a"))
    run = await old.handle("shipping", 2).start(None)
    parked = await _until_status(old, run.run_id, "parked")
    assert parked.run.waiting.code == Code.FLOW_UNKNOWN
    await old.stop()
    new = await make_engine(_builder("a"), v2)
    assert await new.handle("shipping", 2).result(run.run_id, timeout=10) == "v2"


async def test_versions_side_by_side(make_engine):
    v2 = flow("shipping").version(2).step("a", lambda s: 10).build()
    engine = await make_engine(_builder("a"), v2)
    r1 = await engine.handle("shipping", 1).start(None, idempotency_key="same")
    r2 = await engine.handle("shipping", 2).start(None, idempotency_key="same")
    assert r1.run_id != r2.run_id
    assert await engine.handle("shipping", 2).result(r2.run_id, timeout=5) == 10
    await engine.signal(r1.run_id, "go")
    assert await engine.handle("shipping", 1).result(r1.run_id, timeout=5) == 2


async def test_builder_occurrence_count_drift(make_engine):
    two = flow("repeat").sleep("10ms").sleep("10ms").signal("go").build()
    first = await make_engine(two)
    run = await first.handle("repeat").start(None)
    await _until_status(first, run.run_id, "awaiting_signal")
    await first.stop()
    one = flow("repeat").sleep("10ms").signal("go").build()
    drifted = await make_engine(one)
    await drifted.signal(run.run_id, "go")
    parked = await _until_status(drifted, run.run_id, "parked")
    assert parked.run.waiting.code == Code.REPLAY_NON_DETERMINISTIC


async def test_check_reports_runs_the_new_code_would_strand(make_engine):
    old = await make_engine(_builder("a"), _body_v1("create"))
    drifting = await old.handle("shipping").start(None)
    fine = await old.handle("onboard").start(None)
    orphan = await old.handle("legacy", 3).start(None)
    for run in (drifting, fine):
        await _until_status(old, run.run_id, "awaiting_signal")
    await old.stop()
    new = await make_engine(_builder("a-renamed"), _body_v1("create"), listen=False)
    report = {r["run_id"]: r["code"] for r in await new.check()}
    assert report == {
        drifting.run_id: Code.REPLAY_INCOMPATIBLE_VERSION,
        orphan.run_id: Code.FLOW_UNKNOWN,
    }
