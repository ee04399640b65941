"""The blocking API works from a thread that has no event loop (Django/Flask style)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from iterflow import RunNotFound, define_flow


@define_flow("sync-flow")
async def sync_flow(ctx, inp):
    got = await ctx.signal("go")
    return {"n": inp["n"], "got": got}


async def test_blocking_api_from_a_plain_thread(make_engine):
    engine = await make_engine(sync_flow)
    handle = engine.handle("sync-flow")
    outcome: dict[str, object] = {}

    def django_view() -> None:
        try:
            asyncio.get_running_loop()
            outcome["had_loop"] = True
        except RuntimeError:
            outcome["had_loop"] = False
        started = handle.sync.start({"n": 3}, idempotency_key="k")
        again = handle.sync.start({"n": 3}, idempotency_key="k")
        outcome["same"] = started.run_id == again.run_id and not again.created
        many = handle.sync.start_many([{"input": {"n": 1}}, {"input": {"n": 2}}])
        outcome["signal"] = engine.sync.signal(started.run_id, "go", "yes").kind
        for run in many:
            engine.sync.signal(run.run_id, "go", None)
        outcome["result"] = handle.sync.result(started.run_id, timeout=10)
        outcome["status"] = engine.sync.status(started.run_id).run.status
        outcome["listed"] = len(engine.sync.list_runs(name="sync-flow").runs)
        outcome["retry"] = engine.sync.retry(started.run_id).kind
        try:
            handle.sync.result("00000000-0000-0000-0000-000000000000")
        except RunNotFound as exc:
            outcome["not_found"] = exc.code
        engine.sync.close()

    thread = threading.Thread(target=django_view)
    await asyncio.to_thread(thread.run)
    assert outcome == {
        "had_loop": False, "same": True, "signal": outcome["signal"],
        "result": {"n": 3, "got": "yes"}, "status": "done", "listed": 3, "retry": "not_failed",
        "not_found": "RUN_NOT_FOUND",
    }
    assert outcome["signal"] in ("delivered", "buffered")


def test_blocking_api_needs_no_loop_at_all(dsn, schema_name):
    import iterflow

    asyncio.run(iterflow.migrate(dsn, schema_name))
    engine = iterflow.create_engine(dsn, schema=schema_name, core="python")
    handle = engine.handle("nobody-runs-this")
    run = handle.sync.start({"x": 1})
    assert engine.sync.status(run.run_id).run.status == "pending"
    with pytest.raises(TimeoutError):
        handle.sync.result(run.run_id, timeout=0.2)
    engine.sync.cancel(run.run_id, "not needed")
    assert engine.sync.status(run.run_id).run.status == "canceled"
    engine.sync.close()
