"""Per-step limits (docs/guide.md, "Flow control"): fleet-wide permits across worker processes,
per-key permits, permits of a killed worker coming back with its lease, rates enforced by the
database without polling, and the checks of the configuration.

The multi-process tests run ``tests/workers/limit_worker.py`` subprocesses; each limited step
notes its interval with the database's clock, so overlaps are counted across processes.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests.processes import WorkerProcesses as Workers

import iterflow
from iterflow import Code, RunFailed, StepLimit, define_flow
from iterflow.errors import InvalidArgument


async def rows(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, args or None)
        return await cur.fetchall() if cur.description else []


@pytest.fixture
def workers(dsn: str, schema_name: str, core: str, tmp_path: Path) -> Iterator[Workers]:
    w = Workers("limit_worker.py", dsn, schema_name, core, tmp_path)
    yield w
    w.cleanup()


@pytest.fixture
async def client(make_engine: Any, dsn: str, schema_name: str) -> Any:
    engine = await make_engine(listen=False)
    await rows(dsn, f'CREATE TABLE "{schema_name}".intervals (id serial, run_id text, key text, worker text, '
                    f'started timestamptz NOT NULL DEFAULT clock_timestamp(), ended timestamptz)')
    return engine


Interval = tuple[str | None, str, datetime, datetime | None]


async def intervals(dsn: str, schema: str) -> list[Interval]:
    found = await rows(dsn, f'SELECT key, worker, started, ended FROM "{schema}".intervals ORDER BY id')
    return [(key, worker, started, ended) for key, worker, started, ended in found]


def most_at_once(spans: list[Interval]) -> int:
    """The most intervals open at one instant (an end before a start at the same instant)."""
    edges = sorted([(s, 1) for _, _, s, _ in spans] + [(e, -1) for _, _, _, e in spans if e is not None])
    most = now = 0
    for _, delta in edges:
        now += delta
        most = max(most, now)
    return most


async def wait_for(check: Any, workers: Workers, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s\n{workers.output()}")
        await asyncio.sleep(0.05)


async def all_done(client: Any, flow: str, run_ids: list[str], workers: Workers, timeout: float = 30) -> None:
    for run_id in run_ids:
        try:
            await client.handle(flow).result(run_id, timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"run {run_id} did not finish\n{workers.output()}") from None


async def test_a_limit_holds_across_worker_processes(
    client: Any, workers: Workers, dsn: str, schema_name: str
) -> None:
    for label in "ABC":
        workers.start(label)
    started = [(await client.handle("limited").start({"i": i})).run_id for i in range(12)]
    await all_done(client, "limited", started, workers)
    spans = await intervals(dsn, schema_name)
    assert len(spans) == 12
    assert most_at_once(spans) == 2, f"limit x is 2 at a time fleet-wide: {spans}"
    assert len({worker for _, worker, _, _ in spans}) > 1, "several processes took part"
    assert await rows(dsn, f'SELECT count(*) FROM "{schema_name}".step_permits') == [(0,)], "every permit given back"


async def test_a_per_key_limit_counts_each_key_apart(
    client: Any, workers: Workers, dsn: str, schema_name: str
) -> None:
    for label in "AB":
        workers.start(label)
    started = [(await client.handle("keyed").start({"key": key})).run_id for key in "ababab"]
    await all_done(client, "keyed", started, workers)
    spans = await intervals(dsn, schema_name)
    by_key = {key: [s for s in spans if s[0] == key] for key in "ab"}
    assert [len(v) for v in by_key.values()] == [3, 3]
    assert most_at_once(by_key["a"]) == 1 and most_at_once(by_key["b"]) == 1, spans
    assert most_at_once(spans) == 2, f"the two keys run side by side: {spans}"


async def test_a_killed_workers_permits_come_back_with_its_lease(
    client: Any, workers: Workers, dsn: str, schema_name: str
) -> None:
    a = workers.start("A", "--mode", "block", "--slots", "2")
    first = [(await client.handle("limited").start({"i": i})).run_id for i in range(2)]
    held = f'SELECT count(*) FROM "{schema_name}".intervals'

    async def a_holds_both() -> bool:
        return (await rows(dsn, held))[0][0] == 2

    await wait_for(a_holds_both, workers, what="worker A holding both permits")
    workers.start("B")
    later = [(await client.handle("limited").start({"i": i})).run_id for i in range(2, 4)]
    await asyncio.sleep(1.0)
    assert (await rows(dsn, held))[0][0] == 2, "B waits: A holds the limit's two permits"

    ((killed_at,),) = await rows(dsn, "SELECT clock_timestamp()")
    a.send_signal(signal.SIGKILL)
    assert a.wait(timeout=10) == -signal.SIGKILL
    await all_done(client, "limited", first + later, workers)

    spans = await intervals(dsn, schema_name)
    by_b = [s for s in spans if s[1] == "B"]
    assert len(by_b) == 4, "B ran the two waiting steps and re-ran A's two"
    assert all(started > killed_at for _, _, started, _ in by_b), "B waited for A's leases to end"
    assert most_at_once(by_b) <= 2


async def test_rate_limit_spaces_calls_by_time_without_polling(make_engine: Any) -> None:
    calls: list[float] = []
    checks: list[str] = []

    @define_flow("rated")
    async def rated(ctx: iterflow.Context, _: Any) -> Any:
        return await ctx.step("call", lambda: calls.append(time.monotonic()), limit="r")

    engine = await make_engine(
        rated, concurrency=50, step_limits={"r": StepLimit(rate="10/1s")},
        metrics={"step_limit": lambda name, outcome: checks.append(outcome)},
    )
    handle = engine.handle("rated")
    started = [(await handle.start()).run_id for _ in range(41)]
    for run_id in started:
        await handle.result(run_id, timeout=30)
    span = max(calls) - min(calls)
    assert len(calls) == 41
    assert 4.0 * 0.9 <= span <= 4.0 * 1.1, f"41 calls at 10 per second take ~4 s, took {span:.2f}"
    assert checks == ["granted"] * 41, "each call asked the database once, then slept until its slot"


async def test_a_rate_holds_across_the_fleet_for_30_seconds(client: Any, workers: Workers, dsn: str,
                                                         schema_name: str) -> None:
    """Three worker processes share ``r`` (10 calls a second): 301 calls span 30 s within 10%,
    and no second holds more than its share (a one-second window never sees more than 11)."""
    for label in "ABC":
        workers.start(label, "--slots", "8")
    runs = [r.run_id for r in await client.handle("rated").start_many([{"input": i} for i in range(301)])]
    await all_done(client, "rated", runs, workers, timeout=90)
    spans = await intervals(dsn, schema_name)
    times = sorted(s for _, _, s, _ in spans)
    assert len(times) == 301
    span = (times[-1] - times[0]).total_seconds()
    assert 30 * 0.9 <= span <= 30 * 1.1, f"301 calls at 10 a second take ~30 s, took {span:.1f}"
    busiest = max(sum(1 for t in times[i:i + 20] if (t - times[i]).total_seconds() < 1.0) for i in range(len(times)))
    assert busiest <= 11, f"{busiest} calls in one second"
    assert len({w for _, w, _, _ in spans}) >= 2, "one worker took every call"


async def test_a_replayed_step_takes_no_permit(make_engine: Any) -> None:
    checks: list[str] = []

    @define_flow("twice")
    async def twice(ctx: iterflow.Context, _: Any) -> Any:
        first = await ctx.step("call", lambda: "ok", limit="x")
        await ctx.sleep("0.3s")  # suspends: the rest is a replay of the step's record
        return first

    engine = await make_engine(twice, step_limits={"x": {"concurrency": 1}},
                               metrics={"step_limit": lambda name, outcome: checks.append(name)})
    run = await engine.handle("twice").start()
    assert await engine.handle("twice").result(run.run_id, timeout=20) == "ok"
    assert checks == ["x"]


async def test_a_waiting_step_wakes_on_the_release(make_engine: Any) -> None:
    """One permit, two runs: the second step waits for the first's release (a notification),
    long before the first holder's lease would expire (30 s)."""
    gate = asyncio.Event()
    order: list[str] = []

    @define_flow("one_at_a_time")
    async def one_at_a_time(ctx: iterflow.Context, data: Any) -> Any:
        async def call() -> None:
            order.append(f"start {data}")
            if data == "first":
                await gate.wait()
            order.append(f"end {data}")

        return await ctx.step("call", call, limit="one")

    engine = await make_engine(one_at_a_time, lease="30s", step_limits={"one": StepLimit(concurrency=1)})
    handle = engine.handle("one_at_a_time")
    first = await handle.start("first")
    while order != ["start first"]:
        await asyncio.sleep(0.02)
    second = await handle.start("second")
    await asyncio.sleep(0.5)
    assert order == ["start first"], "the second call waits for the permit"
    released = time.monotonic()
    gate.set()
    await handle.result(first.run_id, timeout=10)
    await handle.result(second.run_id, timeout=10)
    assert order == ["start first", "end first", "start second", "end second"]
    assert time.monotonic() - released < 3.0


async def test_a_step_naming_an_unknown_limit_fails_with_the_field(make_engine: Any) -> None:
    @define_flow("unknown")
    async def unknown(ctx: iterflow.Context, _: Any) -> Any:
        return await ctx.step("call", lambda: 1, limit="nope")

    engine = await make_engine(unknown, step_limits={"x": StepLimit(concurrency=1)})
    run = await engine.handle("unknown").start()
    with pytest.raises(RunFailed) as failed:
        await engine.handle("unknown").result(run.run_id, timeout=20)
    assert failed.value.code == Code.INVALID_ARGUMENT
    assert "limit" in str(failed.value)


async def test_a_per_key_limit_counts_under_the_runs_key_without_limit_key(make_engine: Any) -> None:
    """No ``limit_key``: the run's key (``start(..., key=)``) is the key; a run without one
    counts under the empty key."""
    gates = {"a1": asyncio.Event(), "b1": asyncio.Event(), "none": asyncio.Event()}
    running: list[str] = []

    @define_flow("by_run_key")
    async def by_run_key(ctx: iterflow.Context, name: str) -> Any:
        async def call() -> None:
            running.append(name)
            if name in gates:
                await gates[name].wait()

        return await ctx.step("call", call, limit="per")

    engine = await make_engine(by_run_key, step_limits={"per": StepLimit(concurrency=1, per_key=True)})
    handle = engine.handle("by_run_key")
    runs = [await handle.start("a1", key="a"), await handle.start("b1", key="b"), await handle.start("none")]
    while sorted(running) != ["a1", "b1", "none"]:  # three keys ('a', 'b', ''): all run at once
        await asyncio.sleep(0.02)
    runs.append(await handle.start("a2", key="a"))
    await asyncio.sleep(0.5)
    assert "a2" not in running, "a2 waits for a1's permit of key 'a'"
    for gate in gates.values():
        gate.set()
    for run in runs:
        await handle.result(run.run_id, timeout=10)
    assert running[-1] == "a2"


async def test_builder_steps_take_limits_and_check_the_option(make_engine: Any) -> None:
    checks: list[str] = []
    built = iterflow.flow("built").step("call", lambda s: s.input + 1, limit="x").build()
    engine = await make_engine(built, step_limits={"x": StepLimit(concurrency=1)},
                               metrics={"step_limit": lambda name, outcome: checks.append(name)})
    run = await engine.handle("built").start(1)
    assert await engine.handle("built").result(run.run_id, timeout=20) == 2
    assert checks == ["x"]
    with pytest.raises(InvalidArgument) as refused:
        iterflow.flow("bad").step("call", lambda: 1, limit="")
    assert refused.value.field == "limit"


@pytest.mark.parametrize(("limits", "field"), [
    ({"x": StepLimit(concurrency=0)}, "step_limits.x.concurrency"),
    ({"x": StepLimit(concurrency=True)}, "step_limits.x.concurrency"),  # type: ignore[arg-type]
    ({"x": StepLimit(rate="fast")}, "step_limits.x.rate"),
    ({"x": StepLimit(rate="0/1s")}, "step_limits.x.rate"),
    ({"x": StepLimit(rate="5/1s", burst=0)}, "step_limits.x.burst"),
    ({"x": StepLimit()}, "step_limits.x"),
    ({"x": {"concurency": 2}}, "step_limits.x.concurency"),
    ({"x": 5}, "step_limits.x"),
    ({"": StepLimit(concurrency=1)}, "step_limits"),
    (["x"], "step_limits"),
])
def test_bad_step_limits_are_refused_at_construction(dsn: str, limits: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        iterflow.create_engine(dsn, core="python", step_limits=limits)
    assert refused.value.field == field


def test_rates_and_dicts_are_accepted(dsn: str) -> None:
    engine = iterflow.create_engine(dsn, core="python", step_limits={
        "a": {"rate": "100/1m", "burst": 10, "per_key": True}, "b": StepLimit(concurrency=5, rate="5/s"),
    })
    limits = engine.services.step_limits.limits
    assert limits["a"] == StepLimit(rate="100/1m", burst=10, per_key=True)
    assert limits["a"].interval_ms == pytest.approx(600.0)
    assert limits["b"].interval_ms == pytest.approx(200.0)
