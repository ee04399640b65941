"""The sticky cache (docs/replay.md, "Sticky execution"): a suspended run stays alive in the
worker that suspended it and goes on from where it stopped when its wake-up comes back, by a
claim of that one run (``Core.claim_runs``) instead of a claim with its history and a replay.
Anything else (the run advanced elsewhere, evicted, canceled, the worker killed) falls back to
the normal claim and replay with the same outcome.

The engines here turn the cache on whatever ``ITERFLOW_STICKY`` says: it is what is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

import iterflow
from iterflow import RunCanceled, define_flow

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "workers" / "sticky_worker.py"


class Cache(Counter[str]):
    """The ``sticky_cache`` metrics hook: how often each outcome happened."""

    def __call__(self, what: str) -> None:
        self[what] += 1


async def sticky_engine(make_engine: Any, *flows: iterflow.Flow, **options: Any) -> tuple[iterflow.Engine, Cache]:
    cache = Cache()
    options.setdefault("sticky_cache", 1000)
    options.setdefault("poll_interval", 0.05)
    engine = await make_engine(*flows, metrics={"sticky_cache": cache}, **options)
    return engine, cache


@contextlib.contextmanager
def worker_process(dsn: str, schema: str, core: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Worker "A" (tests/workers/sticky_worker.py) in a process of its own, output to
    ``log_path``; killed on the way out if the test did not."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    with open(log_path, "wb") as log:
        a = subprocess.Popen(
            [sys.executable, str(WORKER), "--dsn", dsn, "--schema", schema, "--core", core, "--label", "A"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )
    try:
        yield a
    finally:
        if a.poll() is None:
            a.kill()
            a.wait(timeout=10)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)


async def in_status(engine: iterflow.Engine, run_id: str, status: str) -> bool:
    return (await engine.status(run_id)).run.status == status


async def sql(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, args or None)
        return await cur.fetchall() if cur.description else []


def step_keys(detail: Any) -> list[str]:
    return sorted(s["key"] for s in detail.steps)


async def test_a_loop_of_sleeps_resumes_from_the_cache(make_engine: Any) -> None:
    ran: list[int] = []
    starts: list[int] = []

    @define_flow("looper")
    async def looper(ctx: iterflow.Context, n: int) -> Any:
        starts.append(ctx.attempt)  # a replay would run the body from the top again
        total = 0
        for i in range(n):
            total += await ctx.step("add", lambda i=i: ran.append(i) or i)
            await ctx.sleep("40ms")
        return total

    engine, cache = await sticky_engine(make_engine, looper)
    run = await engine.handle("looper").start(8)
    assert await engine.handle("looper").result(run.run_id, timeout=20) == sum(range(8))
    assert ran == list(range(8)) and starts == [1], "the body ran once from the top: no replay"
    # each sleep's wake-up: a claim by id (hit), or, when a claim of the worker's own got the
    # due run first, that claim went on with the held body (adopted); never a replay
    assert cache["hit"] + cache["adopted"] == 8 and cache["hit"] >= 1 and cache["stale"] == 0, cache
    detail = await engine.status(run.run_id)
    assert [s["status"] for s in detail.steps] == ["done"] * 16
    assert step_keys(detail) == sorted(["add", *(f"add:{i}" for i in range(1, 8)), "sleep",
                                        *(f"sleep:{i}" for i in range(1, 8))])


async def test_a_signal_wait_resumes_from_the_cache_with_the_payload(make_engine: Any) -> None:
    @define_flow("asker")
    async def asker(ctx: iterflow.Context, _: Any) -> Any:
        before = await ctx.step("before", lambda: "b")
        answer = await ctx.signal("answer", timeout="30s")
        return {"before": before, "answer": answer}

    engine, cache = await sticky_engine(make_engine, asker)
    run = await engine.handle("asker").start(None)
    await until(lambda: in_status(engine, run.run_id, "awaiting_signal"), what="the run waiting")
    result = await engine.signal(run.run_id, "answer", {"yes": 1})
    assert result.kind == "delivered"
    assert await engine.handle("asker").result(run.run_id, timeout=10) == {"before": "b", "answer": {"yes": 1}}
    assert cache["hit"] + cache["adopted"] == 1 and cache["stale"] == 0, cache


async def test_a_signal_from_another_process_reaches_the_holder(make_engine: Any) -> None:
    """The signal comes from a client engine: its delivery announces the woken run to the
    worker holding it (an `h` notification, migration 0013), which claims it by id. With a
    5 s poll, only that announcement can resume the run within the 3 s asserted."""
    starts: list[int] = []

    @define_flow("remote")
    async def remote(ctx: iterflow.Context, _: Any) -> Any:
        starts.append(ctx.attempt)
        return await ctx.signal("answer")

    engine, cache = await sticky_engine(make_engine, remote, poll_interval=5.0)
    client = await make_engine(listen=False)
    run = await engine.handle("remote").start(None)
    await until(lambda: in_status(engine, run.run_id, "awaiting_signal"), what="the run waiting")
    sent = time.monotonic()
    assert (await client.signal(run.run_id, "answer", 42)).kind == "delivered"
    assert await engine.handle("remote").result(run.run_id, timeout=10) == 42
    assert time.monotonic() - sent < 3.0
    assert starts == [1] and cache["hit"] == 1 and cache["adopted"] == 0 and cache["stale"] == 0, (starts, cache)


async def test_the_delivery_hands_the_run_to_its_holder(make_engine: Any, dsn: str, schema_name: str) -> None:
    """A worker that listens asks for its held runs to be handed over (migration 0014): the
    transaction that delivers the signal leases the run to it, takes the signal, and sends the
    claim in the notice, so no claim by id follows. The handoff's short lease is extended to
    a full one as the body goes on."""
    release = asyncio.Event()

    @define_flow("handed")
    async def handed(ctx: iterflow.Context, _: Any) -> Any:
        answer = await ctx.signal("answer")
        await ctx.step("hold", release.wait)
        return answer

    engine, cache = await sticky_engine(make_engine, handed, poll_interval=5.0, lease="20s")
    client = await make_engine(listen=False)
    run = await engine.handle("handed").start(None)
    await until(lambda: in_status(engine, run.run_id, "awaiting_signal"), what="the run waiting")
    (mark,), = await sql(dsn, f'SELECT waiting->\'sticky\' FROM "{schema_name}".runs WHERE id = %s', run.run_id)
    assert mark["hand"] == mark["ms"] == 1000, mark
    assert (await client.signal(run.run_id, "answer", {"n": 1})).kind == "delivered"

    async def lease_left() -> float:
        (left,), = await sql(dsn, f'SELECT extract(epoch FROM lease_until - now())::float8'
                                  f'  FROM "{schema_name}".queue WHERE run_id = %s', run.run_id)
        return float(left or 0)

    await until(lambda: _true(cache["handed"] == 1), what="the handoff")
    await until(lambda: _gt(lease_left(), 5.0), what="the lease extended past the window")
    release.set()
    assert await engine.handle("handed").result(run.run_id, timeout=10) == {"n": 1}
    assert cache["hit"] == 1 and cache["stale"] == 0, cache
    detail = await engine.status(run.run_id)
    assert [(s["kind"], s["status"], s["result"]) for s in detail.steps] == [
        ("signal", "done", {"n": 1}), ("step", "done", True)]


async def test_a_renewal_of_an_earlier_lease_leaves_the_new_execution_alone(make_engine: Any) -> None:
    """A renewal (the heartbeat, or the extension of a handoff's lease) may answer after its
    run suspended and was claimed again under a new lease: that answer says "lost" of the old
    lease, and must not abort the execution under the new one. (Found by the w6 smoke run: a
    parent adopted by a claim was aborted by the late extension of its handoff, and stayed
    leased with nothing running it.)"""
    from iterflow.cores.base import LeaseState

    gate = asyncio.Event()

    @define_flow("renewed")
    async def renewed(ctx: iterflow.Context, _: Any) -> Any:
        return await ctx.step("work", gate.wait)

    engine, _ = await sticky_engine(make_engine, renewed)
    run = await engine.handle("renewed").start(None)
    worker = engine._worker
    assert worker is not None
    await until(lambda: _true(run.run_id in worker.active), what="the run executing")
    execution = worker.active[run.run_id][0]
    token = execution.run.lease_token
    worker._apply_lease_states([(run.run_id, token - 1)], [LeaseState(run.run_id, False, None)])
    gate.set()
    assert await engine.handle("renewed").result(run.run_id, timeout=10) is True
    assert not execution.lease_lost


async def test_woken_held_runs_wait_for_a_free_slot(make_engine: Any) -> None:
    """A held run woken from another process does not start beyond the worker's concurrency:
    its wake-up waits while every slot is busy, and the run goes on (here: given back and
    replayed, its handoff too old by then) once a slot frees up."""
    gate = asyncio.Event()
    started: dict[str, float] = {}

    def mark(name: str) -> str:
        started[name] = time.monotonic()
        return name

    @define_flow("hog")
    async def hog(ctx: iterflow.Context, _: Any) -> Any:
        return await ctx.step("hog", gate.wait)

    @define_flow("patient")
    async def patient(ctx: iterflow.Context, _: Any) -> Any:
        await ctx.signal("go")
        return await ctx.step("after", lambda: mark("after"))

    engine, _ = await sticky_engine(make_engine, hog, patient, concurrency=1, lease="4s")
    client = await make_engine(listen=False)
    waiting = await engine.handle("patient").start(None)
    await until(lambda: in_status(engine, waiting.run_id, "awaiting_signal"), what="the run held")
    busy = await engine.handle("hog").start(None)
    await until(lambda: in_status(engine, busy.run_id, "running"), what="the only slot taken")
    assert (await client.signal(waiting.run_id, "go", None)).kind == "delivered"
    await asyncio.sleep(1.0)
    assert "after" not in started, "a woken held run started beyond the concurrency"
    opened = time.monotonic()
    gate.set()
    assert await engine.handle("patient").result(waiting.run_id, timeout=15) == "after"
    assert started["after"] >= opened
    assert await engine.handle("hog").result(busy.run_id, timeout=5) is True


async def test_a_handoff_taken_too_late_is_given_back(make_engine: Any) -> None:
    """A handoff that waited too long at its holder (every slot busy) may have outlived its
    short lease: it is given back instead of resumed, and the held body stays for the run's
    next wake-up."""
    from iterflow.cores.base import Handoff, Woken

    @define_flow("late")
    async def late(ctx: iterflow.Context, _: Any) -> Any:
        return await ctx.signal("answer")

    engine, cache = await sticky_engine(make_engine, late)
    client = await make_engine(listen=False)
    run = await engine.handle("late").start(None)
    await until(lambda: in_status(engine, run.run_id, "awaiting_signal"), what="the run waiting")
    worker = engine._worker
    assert worker is not None and worker.sticky is not None
    execution = worker.sticky.get(run.run_id)
    assert execution is not None
    held = execution.run.lease_token  # type: ignore[attr-defined]
    stale = Handoff(run.run_id, held, held + 1000, 2, None,
                    datetime.now(UTC) - timedelta(seconds=5), {})
    await worker._go_on(Woken(handed=[stale]))
    assert cache["handed"] == 0 and worker.sticky.get(run.run_id) is execution
    assert (await client.signal(run.run_id, "answer", "now")).kind == "delivered"
    assert await engine.handle("late").result(run.run_id, timeout=10) == "now"
    assert cache["handed"] == 1, cache


async def test_a_handoff_too_large_for_a_notice_reads_its_records(make_engine: Any) -> None:
    """A notice holds under 8,000 bytes: a payload larger than that goes with the handoff
    as ``"steps": null``, and the holder reads the records (``handed_records``)."""

    @define_flow("big")
    async def big(ctx: iterflow.Context, _: Any) -> Any:
        return await ctx.signal("blob")

    engine, cache = await sticky_engine(make_engine, big, poll_interval=5.0)
    client = await make_engine(listen=False)
    run = await engine.handle("big").start(None)
    await until(lambda: in_status(engine, run.run_id, "awaiting_signal"), what="the run waiting")
    blob = {"text": "x" * 20_000, "n": 7}
    assert (await client.signal(run.run_id, "blob", blob)).kind == "delivered"
    assert await engine.handle("big").result(run.run_id, timeout=10) == blob
    assert cache["handed"] == 1 and cache["stale"] == 0, cache


async def test_a_handoff_to_a_holder_without_the_body_replays(make_engine: Any) -> None:
    """The holder lost the body (evicted) but the run still names it: the handoff comes to a
    worker with nothing to resume, which gives the lease back, and the run replays."""
    effects: list[str] = []

    @define_flow("orphaned")
    async def orphaned(ctx: iterflow.Context, _: Any) -> Any:
        await ctx.step("before", lambda: effects.append("before"))
        answer = await ctx.signal("answer")
        await ctx.step("after", lambda: effects.append("after"))
        return answer

    engine, cache = await sticky_engine(make_engine, orphaned, poll_interval=5.0)
    client = await make_engine(listen=False)
    run = await engine.handle("orphaned").start(None)
    await until(lambda: in_status(engine, run.run_id, "awaiting_signal"), what="the run waiting")
    assert engine._worker is not None and engine._worker.sticky is not None
    assert engine._worker.sticky.discard(run.run_id, "evicted")
    assert (await client.signal(run.run_id, "answer", "yes")).kind == "delivered"
    assert await engine.handle("orphaned").result(run.run_id, timeout=10) == "yes"
    assert effects == ["before", "after"], "each step ran once"
    assert cache["handed"] == 0 and cache["hit"] == 0, cache


async def test_a_worker_that_does_not_listen_is_not_handed_runs(make_engine: Any, dsn: str, schema_name: str) -> None:
    """No notice can reach a worker without LISTEN: its marks do not ask for handoffs, and a
    signal sent in its process resumes the held run by a claim by id."""

    @define_flow("quiet")
    async def quiet(ctx: iterflow.Context, _: Any) -> Any:
        return await ctx.signal("answer")

    engine, cache = await sticky_engine(make_engine, quiet, notify=False)
    run = await engine.handle("quiet").start(None)
    await until(lambda: in_status(engine, run.run_id, "awaiting_signal"), what="the run waiting")
    (mark,), = await sql(dsn, f'SELECT waiting->\'sticky\' FROM "{schema_name}".runs WHERE id = %s', run.run_id)
    assert "hand" not in mark, mark
    assert (await engine.signal(run.run_id, "answer", 5)).kind == "delivered"
    assert await engine.handle("quiet").result(run.run_id, timeout=10) == 5
    assert cache["hit"] == 1 and cache["handed"] == 0, cache


async def test_short_waits_are_waited_in_place(make_engine: Any) -> None:
    suspended: list[str] = []

    @define_flow("short")
    async def short(ctx: iterflow.Context, n: int) -> Any:
        for i in range(n):
            await ctx.step("s", lambda i=i: i)
            await ctx.sleep("5ms")
        return n

    cache = Cache()
    engine = await make_engine(short, sticky_cache=1000, metrics={"sticky_cache": cache,
                                                                  "run_suspended": suspended.append})
    run = await engine.handle("short").start(20)
    assert await engine.handle("short").result(run.run_id, timeout=10) == 20
    assert suspended == [] and cache == Counter(), "no suspension, nothing held"
    detail = await engine.status(run.run_id)
    assert [s["status"] for s in detail.steps] == ["done"] * 40


async def test_a_child_wait_resumes_from_the_cache_with_the_output(make_engine: Any) -> None:
    @define_flow("kid")
    async def kid(ctx: iterflow.Context, n: int) -> Any:
        await ctx.sleep("60ms")  # (a wait under 20 ms is waited in place, without a suspension)
        return await ctx.step("double", lambda: n * 2)

    @define_flow("parent")
    async def parent(ctx: iterflow.Context, n: int) -> Any:
        one, two = await ctx.invoke_all([(kid, n), (kid, n + 1)])
        return one + two + await ctx.step("after", lambda: 100)

    engine, cache = await sticky_engine(make_engine, kid, parent)
    run = await engine.handle("parent").start(3)
    assert await engine.handle("parent").result(run.run_id, timeout=20) == 6 + 8 + 100
    # the kids' sleeps and the parent's wait for its children: claims by id
    assert cache["hit"] + cache["adopted"] >= 3 and cache["stale"] == 0, cache
    detail = await engine.status(run.run_id)
    assert [s["status"] for s in detail.steps] == ["done"] * 3


async def test_a_run_advanced_elsewhere_drops_the_held_copy_and_replays(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    effects: list[str] = []

    def napper(label: str) -> iterflow.Flow:
        @define_flow("advanced")
        async def body(ctx: iterflow.Context, _: Any) -> Any:
            first = await ctx.step("first", lambda: effects.append(f"first {label}") or label)
            await ctx.sleep("1500ms")
            last = await ctx.step("last", lambda: effects.append(f"last {label}") or label)
            return [first, last]

        return body

    a, a_cache = await sticky_engine(make_engine, napper("A"), sticky_window="0s")
    run = await a.handle("advanced").start(None)
    await until(lambda: in_status(a, run.run_id, "sleeping"), what="the run held by A")
    assert a_cache == Counter()
    assert a._worker is not None
    a._worker.paused = True  # only B claims from now on (once A's claim in flight, if any, ended)
    await asyncio.sleep(0.2)
    b, b_cache = await sticky_engine(make_engine, napper("B"))
    # the run's wake-up comes early, and B (not A's timer) claims it: it replays on B, where
    # the sleep is not over, so B holds it now
    await sql(dsn, f'UPDATE "{schema_name}".queue SET ready_at = now() WHERE run_id = %s', run.run_id)
    assert await b.handle("advanced").result(run.run_id, timeout=20) == ["A", "B"]
    assert effects == ["first A", "last B"], "every step ran exactly once"
    assert b_cache["hit"] + b_cache["adopted"] == 1, b_cache
    await until(lambda: _true(a_cache["stale"] == 1), what="A's timer finding its copy stale")
    assert len(a._worker.sticky or ()) == 0
    detail = await b.status(run.run_id)
    assert step_keys(detail) == ["first", "last", "sleep"]
    assert [s["status"] for s in detail.steps] == ["done"] * 3


async def test_eviction_under_a_small_cache(make_engine: Any) -> None:
    @define_flow("evicted")
    async def evicted(ctx: iterflow.Context, n: int) -> Any:
        a = await ctx.step("a", lambda: n)
        await ctx.sleep("300ms")
        return a + await ctx.step("b", lambda: 10)

    engine, cache = await sticky_engine(make_engine, evicted, sticky_cache=1)
    handle = engine.handle("evicted")
    runs = [await handle.start(n) for n in range(3)]
    outputs = [await handle.result(r.run_id, timeout=20) for r in runs]
    assert outputs == [10, 11, 12]
    assert cache["evicted"] >= 1, cache
    assert engine._worker is not None and len(engine._worker.sticky or ()) == 0
    for r in runs:
        assert [s["status"] for s in (await engine.status(r.run_id)).steps] == ["done"] * 3


async def test_cancel_of_a_held_run(make_engine: Any) -> None:
    ended: list[str] = []

    @define_flow("waiter")
    async def waiter(ctx: iterflow.Context, _: Any) -> Any:
        try:
            return await ctx.signal("never")
        finally:
            ended.append("unwound")

    engine, cache = await sticky_engine(make_engine, waiter)
    run = await engine.handle("waiter").start(None)
    await until(lambda: in_status(engine, run.run_id, "awaiting_signal"), what="the run held")
    assert engine._worker is not None and run.run_id in (engine._worker.sticky or ())
    await engine.cancel(run.run_id, "no longer needed")
    with pytest.raises(RunCanceled):
        await engine.handle("waiter").result(run.run_id, timeout=10)
    assert run.run_id not in (engine._worker.sticky or ())
    await until(lambda: _true(ended == ["unwound"]), what="the held body unwound")
    assert cache["dropped"] == 1 and cache["hit"] == 0, cache


async def test_a_worker_killed_with_a_full_cache(
    make_engine: Any, dsn: str, schema_name: str, core: str, tmp_path: Path
) -> None:
    with worker_process(dsn, schema_name, core, tmp_path / "a.log") as a:
        await iterflow.migrate(dsn, schema_name)
        client = await make_engine(listen=False)
        handle = client.handle("napper")
        runs = [await handle.start({"for": "1s"}) for _ in range(4)]

        async def all_held() -> bool:
            found = await sql(dsn, f'SELECT waiting FROM "{schema_name}".runs WHERE status = %s', "sleeping")
            return len(found) == 4 and all(f":{a.pid}:" in w["sticky"]["owner"] for (w,) in found)

        await until(all_held, timeout=20, what=f"A holding every run\n{(tmp_path / 'a.log').read_text()}")
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=10) == -signal.SIGKILL

        @define_flow("napper")
        async def napper(ctx: iterflow.Context, inp: Any) -> Any:
            await ctx.step("a", lambda: "B")
            await ctx.sleep(inp["for"])
            return await ctx.step("b", lambda: "B")

        t0 = time.monotonic()
        b, _ = await sticky_engine(make_engine, napper)
        outputs = [await b.handle("napper").result(r.run_id, timeout=20) for r in runs]
        assert outputs == ["B"] * 4, "every run finished on the other worker"
        assert time.monotonic() - t0 < 1 + 1 + 2, "at most the sleep plus the window, plus slack"
        for r in runs:
            steps = (await b.status(r.run_id)).steps
            assert [(s["key"], s["result"]) for s in steps if s["kind"] == "step"] == [("a", "A"), ("b", "B")]


async def test_a_run_handed_to_a_killed_worker_finishes_elsewhere(
    make_engine: Any, dsn: str, schema_name: str, core: str, tmp_path: Path
) -> None:
    """Killed while its registry row is still fresh, the holder is handed the run its signal
    woke: the handoff's lease is only the sticky window long, so the run is the fleet's again
    once that window and a sweep of expired leases have passed, and replays there."""
    with worker_process(dsn, schema_name, core, tmp_path / "a.log") as a:
        await iterflow.migrate(dsn, schema_name)
        client = await make_engine(listen=False)
        run = await client.handle("asker").start(None)

        async def held() -> bool:
            found = await sql(dsn, f'SELECT waiting FROM "{schema_name}".runs WHERE id = %s AND status = %s',
                              run.run_id, "awaiting_signal")
            return bool(found) and f":{a.pid}:" in found[0][0]["sticky"]["owner"]

        await until(held, timeout=20, what=f"A holding the run\n{(tmp_path / 'a.log').read_text()}")
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=10) == -signal.SIGKILL
        assert (await client.signal(run.run_id, "go", None)).kind == "delivered"
        (owner,), = await sql(dsn, f'SELECT lease_owner FROM "{schema_name}".queue WHERE run_id = %s', run.run_id)
        assert f":{a.pid}:" in owner, "handed to the dead holder"

        @define_flow("asker")
        async def asker(ctx: iterflow.Context, _: Any) -> Any:
            await ctx.step("a", lambda: "B")
            await ctx.signal("go")
            return await ctx.step("b", lambda: "B")

        t0 = time.monotonic()
        b, _ = await sticky_engine(make_engine, asker, lease="4s")
        assert await b.handle("asker").result(run.run_id, timeout=20) == "B"
        assert time.monotonic() - t0 < 1 + 2 + 3, "the window, a sweep (half of B's lease), and slack"
        steps = (await b.status(run.run_id)).steps
        assert [(s["key"], s["result"]) for s in steps if s["kind"] == "step"] == [("a", "A"), ("b", "B")]


async def test_the_claim_by_id_checks_the_expected_token(make_engine: Any, dsn: str, schema_name: str) -> None:
    """``claim_runs`` claims only a ready run whose ``waiting.sticky.token`` is the expected one."""

    @define_flow("held")
    async def held(ctx: iterflow.Context, _: Any) -> Any:
        await ctx.sleep("200ms")
        return "ok"

    engine, _ = await sticky_engine(make_engine, held, sticky_window="10s")
    run = await engine.handle("held").start(None)
    await until(lambda: in_status(engine, run.run_id, "sleeping"), what="the run suspended")
    ((waiting,),) = await sql(dsn, f'SELECT waiting FROM "{schema_name}".runs WHERE id = %s', run.run_id)
    token = waiting["sticky"]["token"]
    await engine.stop()  # a graceful stop hands its held runs back to the fleet at once
    ((waiting,),) = await sql(dsn, f'SELECT waiting FROM "{schema_name}".runs WHERE id = %s', run.run_id)
    assert "sticky" not in waiting and waiting["kind"] == "sleep"
    # held again, as if by a worker that died: the claims below are the test's
    await sql(dsn, f"""UPDATE "{schema_name}".runs SET waiting = waiting || jsonb_build_object('sticky',
                       jsonb_build_object('owner', 'gone', 'token', %s::bigint, 'ms', 10000,
                                          'keys', jsonb_build_array('sleep'))) WHERE id = %s""",
              token, run.run_id)
    core = await (await make_engine(listen=False)).client()
    assert await core.claim_runs([run.run_id], "probe", 30_000, [token]) == [], "not due yet"
    await asyncio.sleep(0.25)
    assert await core.claim_runs([run.run_id], "probe", 30_000, [token + 1]) == [], "another token"
    (claimed,) = await core.claim_runs([run.run_id], "probe", 30_000, [token])
    assert claimed.lease_token > token
    # the sleep is over: the claim closed its record (the held body writes nothing for it)
    assert list(claimed.history) == ["sleep"] and claimed.history["sleep"].status == "done"
    assert claimed.history["sleep"].finished_at is not None
    ((status,),) = await sql(dsn, f'SELECT status FROM "{schema_name}".steps WHERE run_id = %s', run.run_id)
    assert status == "done"
    assert await core.claim_runs([run.run_id], "probe", 30_000, [token]) == [], "claimed already"


async def _gt(value: Awaitable[float], bound: float) -> bool:
    return await value > bound


async def _true(value: bool) -> bool:
    return value


async def test_one_claim_by_id_takes_every_due_held_run(make_engine: Any, dsn: str, schema_name: str) -> None:
    """A burst of wake-ups is one ``claim_runs``: each run is checked against its own token,
    and each comes back with the records of its own waits only (``waiting.sticky.keys``)."""

    @define_flow("burst")
    async def burst(ctx: iterflow.Context, n: int) -> Any:
        await ctx.step("before", lambda: n)
        await ctx.sleep("200ms")
        return n

    engine, _ = await sticky_engine(make_engine, burst, sticky_window="10s")
    runs = [await engine.handle("burst").start(i) for i in range(3)]
    for run in runs:
        await until(lambda run=run: in_status(engine, run.run_id, "sleeping"), what="the runs suspended")
    tokens = []
    for run in runs:
        ((waiting,),) = await sql(dsn, f'SELECT waiting FROM "{schema_name}".runs WHERE id = %s', run.run_id)
        tokens.append(waiting["sticky"]["token"])
    await engine.stop()
    ids = [run.run_id for run in runs]
    keys = ['["sleep"]', '["sleep"]', '["sleep", "before"]']  # the last one: as if it also waited on "before"
    await sql(dsn, f"""UPDATE "{schema_name}".runs SET waiting = waiting || jsonb_build_object('sticky',
                       jsonb_build_object('owner', 'gone', 'token', t.token, 'ms', 10000, 'keys', t.keys::jsonb))
                       FROM unnest(%s::uuid[], %s::bigint[], %s::text[]) AS t(id, token, keys) WHERE runs.id = t.id""",
              ids, tokens, keys)
    core = await (await make_engine(listen=False)).client()
    await asyncio.sleep(0.25)
    claimed = await core.claim_runs(ids, "probe", 30_000, [tokens[0], tokens[1] + 1, tokens[2]])
    by_id = {c.run_id: c for c in claimed}
    assert set(by_id) == {ids[0], ids[2]}, "the run with another token is left out"
    assert list(by_id[ids[0]].history) == ["sleep"] and by_id[ids[0]].history["sleep"].status == "done"
    assert sorted(by_id[ids[2]].history) == ["before", "sleep"]
    assert by_id[ids[2]].history["before"].result == 2
