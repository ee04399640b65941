"""engine.explain (why a run is stuck) and the workers registry, on real runs put in each state.

Every reason kind of docs/operations.md ("Why is this run stuck?") has a test here that
brings a run into that state through the engine (or, for a lease whose holder died, through
the core's own claim under a made-up owner), then reads the explanation.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql
from tests.test_cli import cli

from iterflow import Code, Explanation, FlowRuntimeError, RunNotFound, define_flow
from iterflow.errors import InvalidArgument
from iterflow.explain import explain_run


@define_flow("ex-survey")
async def survey(ctx: Any, _inp: Any) -> Any:
    return await ctx.signal("survey", timeout="1h")


@define_flow("ex-forever")
async def forever(ctx: Any, _inp: Any) -> Any:
    return await ctx.signal("survey")


@define_flow("ex-sleep")
async def sleeper(ctx: Any, _inp: Any) -> Any:
    await ctx.sleep("1h")


def _declined() -> None:
    raise FlowRuntimeError("CARD_DECLINED", "card declined")


@define_flow("ex-flaky")
async def flaky(ctx: Any, _inp: Any) -> Any:
    return await ctx.step("charge", _declined, retries=2, base_delay="1h", max_delay="2h")


@define_flow("ex-parent")
async def parent(ctx: Any, _inp: Any) -> Any:
    return await ctx.invoke(forever, None)


@define_flow("ex-grandparent")
async def grandparent(ctx: Any, _inp: Any) -> Any:
    return await ctx.invoke(parent, None)


@define_flow("ex-done")
async def done(ctx: Any, _inp: Any) -> Any:
    return await ctx.step("hello", lambda: "hi")


def _fatal() -> None:
    raise FlowRuntimeError("OUT_OF_STOCK", "nothing left", non_retryable=True)


@define_flow("ex-fails")
async def fails(ctx: Any, _inp: Any) -> Any:
    return await ctx.step("reserve", _fatal)


GATES: dict[str, asyncio.Event] = {}


@define_flow("ex-hold")
async def hold(ctx: Any, key: Any) -> Any:
    async def until_released() -> str:
        await GATES[key].wait()
        return "released"

    return await ctx.step("hold", until_released)


@define_flow("ex-park", version=2)
async def park_v2(ctx: Any, _inp: Any) -> Any:
    return "v2"


async def _until(engine: Any, run_id: str, status: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        detail = await engine.status(run_id)
        if detail is not None and detail.run.status == status:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} never became {status}")


async def _explained(engine: Any, run_id: str, check: Callable[[Explanation], bool],
                     timeout: float = 10.0) -> Explanation:
    """The first explanation that passes ``check`` (states settle asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await engine.explain(run_id)
        if check(got) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.02)


def _kinds(explanation: Explanation) -> list[str]:
    return [r.kind for r in explanation.reasons]


async def test_awaiting_signal_with_timeout_and_the_command_that_delivers_it(make_engine: Any) -> None:
    engine = await make_engine(survey)
    run = await engine.handle("ex-survey").start(None)
    await _until(engine, run.run_id, "awaiting_signal")
    got = await engine.explain(run.run_id)
    assert got.status == "awaiting_signal" and got.flow == "ex-survey@1"
    (reason,) = got.reasons
    assert reason.kind == "awaiting_signal" and reason.details["name"] == "survey"
    assert reason.until is not None and 3590 < (reason.until - got.at).total_seconds() <= 3600
    assert reason.since is not None and reason.since <= got.at
    assert reason.action is not None
    assert reason.action.startswith(f"iterflow signal {run.run_id} survey '") and "--schema" in reason.action
    assert "survey" in got.summary and "times out at" in got.summary


async def test_a_signal_queued_but_not_consumed_is_taken_at_the_next_claim(make_engine: Any) -> None:
    worker = await make_engine(forever)
    run = await worker.handle("ex-forever").start(None)
    await _until(worker, run.run_id, "awaiting_signal")
    await worker.stop()
    client = await make_engine(listen=False)
    assert (await client.signal(run.run_id, "survey", {"score": 9})).kind == "delivered"
    got = await client.explain(run.run_id)
    assert _kinds(got) == ["signal_queued", "no_worker"]
    assert got.reasons[0].details == {"name": "survey", "queued": 1}
    assert "next claim" in got.reasons[0].message


async def test_sleeping_until(make_engine: Any) -> None:
    engine = await make_engine(sleeper)
    run = await engine.handle("ex-sleep").start(None)
    await _until(engine, run.run_id, "sleeping")
    got = await engine.explain(run.run_id)
    (reason,) = got.reasons
    assert reason.kind == "sleeping" and reason.action is None
    assert reason.until is not None and 3590 < (reason.until - got.at).total_seconds() <= 3600


async def test_retry_backoff_with_attempt_and_last_error(make_engine: Any) -> None:
    engine = await make_engine(flaky)
    run = await engine.handle("ex-flaky").start(None)
    await _until(engine, run.run_id, "retrying")
    (reason,) = (await engine.explain(run.run_id)).reasons
    assert reason.kind == "retry_backoff"
    assert reason.details["attempt"] == 2 and reason.details["max_attempts"] == 3
    assert reason.details["code"] == "CARD_DECLINED" and reason.details["error_message"] == "card declined"
    assert "attempt 2 of 3" in reason.message and reason.until is not None


async def test_waiting_for_a_child_explains_the_child_a_few_levels_down(make_engine: Any) -> None:
    engine = await make_engine(forever, parent, grandparent)
    run = await engine.handle("ex-grandparent").start(None)
    got = await _explained(engine, run.run_id, lambda e: (
        e.reasons[0].child is not None and e.reasons[0].child.reasons[0].child is not None
        and e.reasons[0].child.reasons[0].child.status == "awaiting_signal"))
    top = got.reasons[0]
    assert top.kind == "awaiting_child" and top.details["child_status"] == "awaiting_child"
    assert top.child is not None
    middle = top.child.reasons[0]
    assert middle.kind == "awaiting_child" and middle.child is not None
    leaf = middle.child
    assert leaf.flow == "ex-forever@1" and _kinds(leaf) == ["awaiting_signal"]
    assert leaf.reasons[0].until is None and "no timeout" in leaf.summary
    # the JSON form nests the same way and is plain JSON
    nested = json.loads(json.dumps(got.to_dict()))
    assert nested["reasons"][0]["child"]["reasons"][0]["child"]["reasons"][0]["kind"] == "awaiting_signal"
    assert "awaiting_signal" in str(got)
    # past the depth cap the child is named, with the command that explains it
    capped = await explain_run(engine.core, engine.schema, run.run_id, depth=1)
    assert capped is not None and capped.reasons[0].child is None
    assert "runs explain" in capped.reasons[0].message


async def test_queued_with_no_live_worker_lists_the_workers_seen(make_engine: Any) -> None:
    other = await make_engine(survey)
    client = await make_engine(listen=False)
    run = await client.handle("ex-nobody").start(None)
    got = await client.explain(run.run_id)
    assert got.status == "pending" and _kinds(got) == ["no_worker"]
    reason = got.reasons[0]
    assert reason.details["flow"] == "ex-nobody@1"
    assert other._worker is not None
    seen = {w["owner"]: w for w in reason.details["workers"]}
    assert seen[other._worker.owner]["flows"] == ["ex-survey@1"] and seen[other._worker.owner]["alive"]
    assert "ex-survey@1" in reason.message and reason.action is not None and "ex-nobody@1" in reason.action


async def test_queued_behind_runs_claimed_first_and_a_leased_run(make_engine: Any) -> None:
    key = uuid.uuid4().hex
    GATES[key] = asyncio.Event()
    try:
        engine = await make_engine(hold, concurrency=1)
        handle = engine.handle("ex-hold")
        first = await handle.start(key)
        await _until(engine, first.run_id, "running")
        queued = [await handle.start(key) for _ in range(3)]
        got = await engine.explain(queued[-1].run_id)
        assert _kinds(got) == ["queued_behind"] and got.reasons[0].details["ahead"] == 2
        assert _kinds(await engine.explain(queued[0].run_id)) == ["ready"]
        # the run holding the one slot: leased by this worker, whose heartbeat the registry shows
        leased = (await engine.explain(first.run_id)).reasons[0]
        assert engine._worker is not None
        assert leased.kind == "leased" and leased.details["worker"] == engine._worker.owner
        assert leased.details["last_heartbeat"] is not None and leased.until is not None
    finally:
        GATES[key].set()


async def test_lease_expired_says_when_the_sweep_makes_it_claimable(make_engine: Any) -> None:
    client = await make_engine(listen=False)
    run = await client.handle("ex-ghost").start(None)
    core = await client.client()
    (claimed,) = await core.claim(["ex-ghost"], 1, "ghost-worker", 500)
    assert claimed.run_id == run.run_id
    leased = await client.explain(run.run_id)
    assert _kinds(leased) == ["leased"] and "not in the workers registry" in leased.summary
    await asyncio.sleep(0.7)
    got = await client.explain(run.run_id)
    (reason,) = got.reasons
    assert reason.kind == "lease_expired" and reason.details["worker"] == "ghost-worker"
    assert "half lease" in reason.message
    assert reason.action is not None and "iterflow worker" in reason.action  # no live worker to sweep


async def test_parked_on_an_unknown_version_says_how_to_resolve_it(make_engine: Any) -> None:
    client = await make_engine(listen=False)
    run = await client.handle("ex-park", version=1).start(None)
    worker = await make_engine(park_v2)
    await _until(worker, run.run_id, "parked")
    (reason,) = (await worker.explain(run.run_id)).reasons
    assert reason.kind == "parked" and reason.details["code"] == Code.FLOW_UNKNOWN
    assert "ex-park@1" in reason.details["reason"]
    assert reason.action is not None
    assert "registers ex-park@1" in reason.action and f"runs cancel {run.run_id}" in reason.action


async def test_terminal_runs_say_so_and_nothing_waits(make_engine: Any) -> None:
    engine = await make_engine(done, fails, forever)
    ok = await engine.handle("ex-done").start(None)
    bad = await engine.handle("ex-fails").start(None)
    gone = await engine.handle("ex-forever").start(None)
    await _until(engine, ok.run_id, "done")
    await _until(engine, bad.run_id, "failed")
    await _until(engine, gone.run_id, "awaiting_signal")
    await engine.cancel(gone.run_id, "customer left")
    (reason,) = (await engine.explain(ok.run_id)).reasons
    assert reason.kind == "done" and "nothing is waiting" in reason.message and reason.action is None
    (reason,) = (await engine.explain(bad.run_id)).reasons
    assert reason.kind == "failed" and reason.details["code"] == "OUT_OF_STOCK"
    assert "nothing left" in reason.message and reason.action is not None and "runs retry" in reason.action
    (reason,) = (await engine.explain(gone.run_id)).reasons
    assert reason.kind == "canceled" and reason.details["reason"] == "customer left"


async def test_cancel_requested_but_not_yet_applied(make_engine: Any) -> None:
    client = await make_engine(listen=False)
    run = await client.handle("ex-ghost").start(None)
    core = await client.client()
    await core.claim(["ex-ghost"], 1, "ghost-worker", 60_000)
    await client.cancel(run.run_id, "too slow")
    got = await client.explain(run.run_id)
    assert got.status == "running" and _kinds(got) == ["cancel_requested", "leased"]
    assert got.reasons[0].details["reason"] == "too slow"


async def test_a_delayed_start(make_engine: Any) -> None:
    client = await make_engine(listen=False)
    run = await client.handle("ex-later").start(None, delay="10m")
    (reason,) = (await client.explain(run.run_id)).reasons
    assert reason.kind == "delayed" and reason.until is not None


async def test_unknown_and_malformed_run_ids(make_engine: Any) -> None:
    client = await make_engine(listen=False)
    with pytest.raises(RunNotFound) as info:
        await client.explain(str(uuid.uuid4()))
    assert info.value.code == Code.RUN_NOT_FOUND
    with pytest.raises(RunNotFound):
        await client.explain("not-a-run-id")
    with pytest.raises(InvalidArgument) as bad:
        await client.explain(42)
    assert bad.value.code == Code.INVALID_ARGUMENT and bad.value.field == "run_id"


async def test_the_blocking_api_explains_too(make_engine: Any) -> None:
    engine = await make_engine(sleeper)
    run = await engine.handle("ex-sleep").start(None)
    await _until(engine, run.run_id, "sleeping")
    got = await asyncio.to_thread(engine.sync.explain, run.run_id)
    assert _kinds(got) == ["sleeping"]
    workers = await asyncio.to_thread(engine.sync.list_workers)
    assert [w.flows for w in workers] == [("ex-sleep@1",)]
    await asyncio.to_thread(engine.sync.close)


async def test_workers_registry_shows_a_listening_engine_until_it_stops(make_engine: Any, core: str) -> None:
    client = await make_engine(listen=False)
    assert await client.list_workers() == []
    engine = await make_engine(survey, sleeper, concurrency=7)
    (info,) = await client.list_workers()
    assert engine._worker is not None and info.owner == engine._worker.owner
    assert info.flows == ("ex-sleep@1", "ex-survey@1") and info.core == core and info.concurrency == 7
    assert info.alive and info.last_seen >= info.started_at and info.pid > 0 and info.host
    assert json.loads(json.dumps(info.to_dict()))["flows"] == ["ex-sleep@1", "ex-survey@1"]
    await engine.stop()
    assert await client.list_workers() == []


async def test_a_worker_that_stops_writing_is_gone_after_its_lease(make_engine: Any) -> None:
    client = await make_engine(listen=False)
    core = await client.client()
    # the row a worker with a 1 s lease wrote before it hung: nothing renews it any more
    await core.admin_query("upsert_worker", "hung:1:0", "hung", 1, ["ex-survey@1"], "python", 5, 1000)
    (info,) = await client.list_workers()
    assert info.alive
    await asyncio.sleep(1.1)
    (info,) = await client.list_workers()
    assert info.owner == "hung:1:0" and not info.alive


async def test_a_registry_that_cannot_be_written_never_stops_a_worker(
    make_engine: Any, dsn: str, schema_name: str, caplog: pytest.LogCaptureFixture,
) -> None:
    client = await make_engine(listen=False)
    await client.client()  # migrated and checked; now the registry table goes away
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE {}.workers").format(sql.Identifier(schema_name)))
    engine = await make_engine(done, lease="1s")
    run = await engine.handle("ex-done").start(None)
    assert await engine.handle("ex-done").result(run.run_id, timeout=10) == "hi"
    await asyncio.sleep(0.5)  # a refresh of the row fails too
    await engine.stop()
    failures = [r.getMessage() for r in caplog.records if "registry" in r.getMessage()]
    assert any("could not update" in m for m in failures) and any("could not remove" in m for m in failures)


def test_cli_runs_explain_text_and_json(dsn: str, schema_name: str) -> None:
    async def prepare() -> str:
        import iterflow

        await iterflow.migrate(dsn, schema_name)
        engine = iterflow.create_engine(dsn, schema=schema_name, core="python", notify=False)
        try:
            run = await engine.handle("ex-cli").start(None)
            return run.run_id
        finally:
            await engine.stop()

    run_id = asyncio.run(prepare())
    res = cli(dsn, "runs", "explain", run_id, "--schema", schema_name)
    assert res.returncode == 0, res.stderr
    assert f"run {run_id} (ex-cli@1) is pending" in res.stdout and "[no_worker]" in res.stdout
    assert f"action: start a worker that registers ex-cli@1 (iterflow worker APP:ENGINE --schema {schema_name})" \
        in res.stdout
    res = cli(dsn, "runs", "explain", run_id, "--schema", schema_name, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["run_id"] == run_id and data["status"] == "pending"
    assert [r["kind"] for r in data["reasons"]] == ["no_worker"]


async def test_lease_expired_with_a_live_worker_says_within_its_sweep_interval(make_engine: Any) -> None:
    await make_engine(survey, lease="10s")  # swept at its start; the next sweep is 5 s later
    client = await make_engine(listen=False)
    run = await client.handle("ex-ghost").start(None)
    core = await client.client()
    await core.claim(["ex-ghost"], 1, "ghost-worker", 500)
    got = await _explained(client, run.run_id, lambda e: _kinds(e) == ["lease_expired"], timeout=2.0)
    (reason,) = got.reasons
    assert reason.kind == "lease_expired" and "within 5 s" in reason.message and reason.action is None
