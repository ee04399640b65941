"""Builder loops: iteration keys name, name:1, ... and the channel threading through."""

from __future__ import annotations

from iterflow import flow


async def test_loop_runs_until_predicate_with_iteration_keys(make_engine):
    counter = (
        flow("counter")
        .step("init", lambda s: {"n": 0})
        .loop(until=lambda ch: ch["n"] >= 3, body=lambda b: b.step("inc", lambda s: {"n": s.input["n"] + 1}))
        .output(lambda v: v.input["n"])
        .build()
    )
    engine = await make_engine(counter)
    handle = engine.handle("counter")
    run = await handle.start(None)
    assert await handle.result(run.run_id, timeout=5) == 3
    keys = [s["key"] for s in (await engine.status(run.run_id)).steps]
    assert keys == ["init", "inc", "inc:1", "inc:2"]


async def test_loop_with_signal_per_turn(make_engine):
    chat = (
        flow("chat")
        .step("start", lambda s: {"turns": []})
        .loop(
            until=lambda ch: len(ch["turns"]) >= 2,
            body=lambda b: b.signal("msg", merge=lambda ch, p: {"turns": [*ch["turns"], p]})
            .step("reply", lambda s: s.input),
        )
        .output(lambda v: v.input["turns"])
        .build()
    )
    engine = await make_engine(chat)
    handle = engine.handle("chat")
    run = await handle.start(None)
    await engine.signal(run.run_id, "msg", "hi")
    await engine.signal(run.run_id, "msg", "bye")
    assert await handle.result(run.run_id, timeout=5) == ["hi", "bye"]
    keys = [s["key"] for s in (await engine.status(run.run_id)).steps]
    assert keys == ["start", "signal:msg", "reply", "signal:msg:1", "reply:1"]
