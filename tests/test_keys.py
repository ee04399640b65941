"""Cursor keys are unambiguous whatever names users pick (docs/replay.md §2), and histories
written with the keys of earlier versions stay readable."""

from __future__ import annotations

import psycopg
from psycopg import sql

from iterflow import define_flow
from iterflow.keys import base_of, key_of, legacy_key, occurrence_of


def test_no_name_produces_another_calls_key():
    names = ["a", "a:1", "a:1:1", "a%3A1", "sleep", "signal", "step:a", "x:", ":", "%", "", "log:2"]
    keys = {}
    for kind in ("step", "signal", "invoke", "sleep", "log"):
        for name in names:
            for n in range(3):
                key = key_of(kind, name, n)
                call = (kind, name if kind not in ("sleep", "log") else kind, n)
                assert keys.setdefault(key, call) == call, f"{call} and {keys[key]} share {key!r}"
                assert occurrence_of(key, kind, call[1]) == n


def test_plain_names_keep_the_keys_earlier_versions_wrote():
    assert key_of("step", "charge", 0) == legacy_key("step", "charge", 0) == "charge"
    assert key_of("step", "charge", 2) == "charge:2"
    assert key_of("signal", "survey", 1) == "signal:survey:1"
    assert key_of("invoke", "ship@2", 0) == "invoke:ship@2"
    assert key_of("sleep", "sleep", 3) == "sleep:3"
    assert base_of("step", "a:1") == "step:a%3A1"
    assert base_of("step", "sleep") == "step:sleep"


async def test_step_names_that_look_like_occurrences_do_not_collide(make_engine):
    calls: list[str] = []

    def step(value: str):
        return lambda: calls.append(value) or value

    @define_flow("colliding")
    async def colliding(ctx, _inp):
        first = await ctx.step("a", step("first"))
        second = await ctx.step("a", step("second"))
        third = await ctx.step("a:1", step("third"))
        await ctx.sleep("50ms")  # the rest runs on a replay of the history above
        fourth = await ctx.step("sleep", step("fourth"))
        return [first, second, third, fourth]

    engine = await make_engine(colliding, poll_interval=0.05)
    handle = engine.handle("colliding")
    run = await handle.start(None)
    assert await handle.result(run.run_id, timeout=10) == ["first", "second", "third", "fourth"]
    assert calls == ["first", "second", "third", "fourth"]
    detail = await engine.status(run.run_id)
    assert {s["key"]: s["name"] for s in detail.steps if s["kind"] == "step"} == {
        "a": "a", "a:1": "a", "step:a%3A1": "a:1", "step:sleep": "sleep",
    }


async def test_signal_names_that_look_like_occurrences_do_not_collide(make_engine):
    @define_flow("signals-colliding")
    async def flow(ctx, _inp):
        return [await ctx.signal("x"), await ctx.signal("x"), await ctx.signal("x:1")]

    engine = await make_engine(flow, poll_interval=0.05)
    handle = engine.handle("signals-colliding")
    run = await handle.start(None)
    await engine.signal(run.run_id, "x:1", "third")
    await engine.signal(run.run_id, "x", "first")
    await engine.signal(run.run_id, "x", "second")
    assert await handle.result(run.run_id, timeout=10) == ["first", "second", "third"]


async def test_history_written_with_legacy_keys_replays(make_engine, dsn, schema_name):
    """A run suspended by an earlier version (step "fetch:user" stored under its bare name)
    resumes without running the step again, and a record of another call under an
    ambiguous legacy key is not mistaken for this one."""
    calls: list[str] = []

    @define_flow("legacy")
    async def legacy(ctx, _inp):
        user = await ctx.step("fetch:user", lambda: calls.append("fetch") or "fresh")
        go = await ctx.signal("go")
        return [user, go]

    # replay reads the edited history: the run must not resume from a sticky-cached body
    engine = await make_engine(legacy, poll_interval=0.05, sticky_cache=0)
    handle = engine.handle("legacy")
    run = await handle.start(None)
    await handle.wait(run.run_id, step="fetch:user", timeout=10)
    with psycopg.connect(dsn, autocommit=True) as conn:  # what an earlier version wrote
        conn.execute(
            sql.SQL("UPDATE {}.steps SET key = 'fetch:user', result = '\"recorded\"' "
                    "WHERE run_id = %s AND name = 'fetch:user'").format(sql.Identifier(schema_name)),
            (run.run_id,),
        )
    await engine.signal(run.run_id, "go", 1)
    assert await handle.result(run.run_id, timeout=10) == ["recorded", 1]
    assert calls == ["fetch"]
