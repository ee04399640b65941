"""Wake-ups (docs/operations.md §2, §5): ``result()`` and idle workers wake on LISTEN/NOTIFY, polling is only
the fallback; a process that never calls ``listen()`` executes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import psycopg

import iterflow
from iterflow import define_flow

SLOW_POLL = {"poll_interval": 5.0}


async def rows(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, args or None)
        return await cur.fetchall() if cur.description else []


def timed_flow(marks: list[float], work: float = 0.15) -> iterflow.Flow:
    def step() -> str:
        time.sleep(work)
        marks.append(time.monotonic())
        return "worked"

    @define_flow("timed")
    async def timed(ctx: iterflow.Context, n: Any) -> Any:
        return {"n": n, "step": await ctx.step("work", step)}

    return timed


class FinishClock:
    """Its own LISTEN connection: when each run's completion notification arrived.

    Latency is measured from there, because how long a NOTIFYing commit takes depends on the
    database (PostgreSQL serializes them database-wide), not on the engine.
    """

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn, self.schema = dsn, schema
        self.arrived: dict[str, float] = {}
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FinishClock:
        self._task = asyncio.ensure_future(self._listen())
        await asyncio.wait_for(self.ready.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(f'LISTEN "iterflow.{self.schema}"')
            self.ready.set()
            async for note in conn.notifies():
                kind, _, run_id = note.payload.partition(" ")
                if kind == "d":
                    self.arrived.setdefault(run_id, time.monotonic())


async def _assert_prompt_results(handle: iterflow.FlowHandle, clock: FinishClock) -> None:
    for n in range(3):
        t0 = time.monotonic()
        started = await handle.start(n)
        assert await handle.result(started.run_id, timeout=10) == {"n": n, "step": "worked"}
        returned = time.monotonic()
        # the clock's listener may dispatch after result() returned (a faster core's listener
        # won the race): give it a moment before judging
        settle = returned + 1.0
        while started.run_id not in clock.arrived and time.monotonic() < settle:
            await asyncio.sleep(0.005)
        # result() polls every second while a LISTEN connection is up: only NOTIFY is this fast
        assert started.run_id in clock.arrived, "no completion notification"
        lag = returned - clock.arrived[started.run_id]
        assert lag < 0.1, f"result() returned {lag:.3f}s after the completion notification"
        # the idle worker (poll 5s) was woken by the start's NOTIFY, not by its poll
        assert returned - t0 < 2.5


async def test_result_wakes_on_notify_same_engine(make_engine: Any, dsn: str, schema_name: str) -> None:
    marks: list[float] = []
    engine = await make_engine(timed_flow(marks), notify=True, **SLOW_POLL)
    await asyncio.sleep(0.3)  # LISTEN connections up
    async with FinishClock(dsn, schema_name) as clock:
        await _assert_prompt_results(engine.handle("timed"), clock)


async def test_result_wakes_on_notify_from_another_engine(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    marks: list[float] = []
    await make_engine(timed_flow(marks), notify=True, **SLOW_POLL)
    client = await make_engine(listen=False, notify=True, **SLOW_POLL)
    await client.client()
    await asyncio.sleep(0.3)
    async with FinishClock(dsn, schema_name) as clock:
        await _assert_prompt_results(client.handle("timed"), clock)


async def test_result_of_an_already_finished_run_returns_at_once(make_engine: Any) -> None:
    marks: list[float] = []
    engine = await make_engine(timed_flow(marks, work=0), notify=True, **SLOW_POLL)
    started = await engine.handle("timed").start(1)
    await engine.handle("timed").result(started.run_id, timeout=10)
    t0 = time.monotonic()
    assert await engine.handle("timed").result(started.run_id, timeout=10) == {"n": 1, "step": "worked"}
    assert time.monotonic() - t0 < 0.1


async def test_result_without_notify_still_returns(make_engine: Any) -> None:
    marks: list[float] = []
    engine = await make_engine(timed_flow(marks), notify=False, poll_interval=0.1)
    client = await make_engine(listen=False, notify=False, poll_interval=0.1)
    for handle in (engine.handle("timed"), client.handle("timed")):
        t0 = time.monotonic()
        started = await handle.start(7)
        assert await handle.result(started.run_id, timeout=10) == {"n": 7, "step": "worked"}
        assert time.monotonic() - t0 < 2.0
        assert time.monotonic() - marks[-1] < 0.5


async def test_process_that_never_listens_executes_nothing(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    calls: list[int] = []

    @define_flow("api")
    async def api(ctx: iterflow.Context, n: int) -> int:
        return await ctx.step("work", lambda: calls.append(n) or n)

    client = await make_engine(api, listen=False, poll_interval=0.05)
    started = await client.handle("api").start(5)
    await asyncio.sleep(1.0)
    detail = await client.status(started.run_id)
    assert detail is not None
    assert (detail.run.status, detail.run.attempts, detail.steps) == ("pending", 0, [])
    assert calls == []
    ((owner,),) = await rows(dsn, f'SELECT lease_owner FROM "{schema_name}".queue')
    assert owner is None

    await make_engine(api, poll_interval=0.05)
    assert await client.handle("api").result(started.run_id, timeout=10) == 5
    assert calls == [5]


async def test_worker_claims_only_flows_it_registered(make_engine: Any) -> None:
    @define_flow("mine")
    async def mine(ctx: iterflow.Context, _: Any) -> str:
        return "mine"

    @define_flow("theirs")
    async def theirs(ctx: iterflow.Context, _: Any) -> str:
        return "theirs"

    worker = await make_engine(mine, poll_interval=0.05)
    other = await worker.handle("theirs").start()
    own = await worker.handle("mine").start()
    assert await worker.handle("mine").result(own.run_id, timeout=10) == "mine"
    await asyncio.sleep(0.5)
    detail = await worker.status(other.run_id)
    assert detail is not None and (detail.run.status, detail.run.attempts) == ("pending", 0)

    await make_engine(theirs, poll_interval=0.05)
    assert await worker.handle("theirs").result(other.run_id, timeout=10) == "theirs"


async def test_deferred_wakeups_are_collected_for_the_caller_to_send(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    """Schema v2: inside a transaction that sets ``iterflow.defer_notify`` (the Rust core's
    group-commit writer), the transitions' wake-ups are collected, not sent; elsewhere they are
    sent as before."""
    await (await make_engine()).client()  # a migrated schema
    heard: list[str] = []
    listening = asyncio.Event()

    async def listen() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f'LISTEN "iterflow.{schema_name}"')
            listening.set()
            async for note in conn.notifies():
                heard.append(note.payload)

    task = asyncio.ensure_future(listen())
    try:
        await asyncio.wait_for(listening.wait(), 5)
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            await conn.execute("SET LOCAL iterflow.defer_notify = on")
            for payload in ("q deferred", "q deferred", "d 1"):
                await conn.execute(f'SELECT "{schema_name}".wakeup(%s)', (payload,))
            cur = await conn.execute("SELECT current_setting('iterflow.notify', true)")
            collected = (await cur.fetchone())[0]  # type: ignore[index]
            await conn.commit()
        assert collected.split("\x1e") == ["q deferred", "q deferred", "d 1", ""]
        await rows(dsn, f'SELECT "{schema_name}".wakeup(%s)', "q inline")
        deadline = time.monotonic() + 5
        while "q inline" not in heard and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert heard == ["q inline"], "collected wake-ups must not be sent by the transaction itself"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_caller_owned_pool_with_a_conninfo_callable_still_listens(dsn: str, schema_name: str) -> None:
    """The pure-Python core's LISTEN connection goes where a caller-owned pool's connections go,
    also when the pool's conninfo is an (async) callable rather than a string."""
    from psycopg_pool import AsyncConnectionPool

    async def conninfo() -> str:
        return dsn

    await iterflow.migrate(dsn, schema_name)
    marks: list[float] = []
    pool = AsyncConnectionPool(conninfo, min_size=1, max_size=8, open=False, kwargs={"autocommit": True})
    await pool.open()
    engine = iterflow.create_engine(pool=pool, schema=schema_name, core="python", notify=True, **SLOW_POLL)
    engine.register(timed_flow(marks, work=0.0))
    try:
        await engine.listen()
        await asyncio.sleep(0.3)  # LISTEN connection up
        async with FinishClock(dsn, schema_name) as clock:
            await _assert_prompt_results(engine.handle("timed"), clock)
    finally:
        await engine.stop()
        await pool.close()


async def test_a_waiting_claim_claims_at_once_when_nudged(make_engine: Any) -> None:
    """``claim(wait=)`` waits for a wake-up, then claims what is ready: a nudge (work this
    process knows of) ends the wait long before its timeout, and claims nothing when nothing
    is ready."""
    flow = timed_flow([])
    client = await make_engine(flow, listen=False)
    core = (await make_engine(flow, listen=False, **SLOW_POLL)).core
    await core.open()
    loop = asyncio.get_running_loop()

    run = await client.handle("timed").start(1)
    claimed: list[Any] = []
    for _ in range(5):  # a stale wake-up (the listener's connect) may end one wait early
        claimed = await asyncio.wait_for(core.claim(["timed"], 5, "probe", 60_000, 30.0), 10)
        if claimed:
            break
    assert [c.run_id for c in claimed] == [run.run_id]

    for _ in range(50):  # until no stale wake-up is left
        t0 = loop.time()
        await core.claim(["timed"], 5, "probe", 60_000, 0.3)
        if loop.time() - t0 >= 0.25:
            break
    waiting = asyncio.ensure_future(core.claim(["timed"], 5, "probe", 60_000, 30.0))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    core.nudge()
    assert await asyncio.wait_for(waiting, 10) == []


async def _listen_connections(dsn: str, schema: str) -> int:
    ((n,),) = await rows(dsn, "SELECT count(*) FROM pg_stat_activity WHERE query = %s", f'LISTEN "iterflow.{schema}"')
    return int(n)


async def _until_listen_connections(dsn: str, schema: str, n: int) -> None:
    deadline = time.monotonic() + 5
    while (seen := await _listen_connections(dsn, schema)) != n:
        assert time.monotonic() < deadline, f"{seen} LISTEN connections, expected {n}"
        await asyncio.sleep(0.02)


async def test_a_process_that_only_starts_and_signals_does_not_listen(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    """A producer (a web process starting runs and sending signals) holds no LISTEN connection,
    so it is not woken by every notification of the schema; its first wait for a result opens
    one, and the result still arrives."""

    @define_flow("inbox")
    async def inbox(ctx: iterflow.Context, _: Any) -> Any:
        return await ctx.signal("go")

    await make_engine(inbox)
    await _until_listen_connections(dsn, schema_name, 1)  # the worker's, from listen()
    client = await make_engine(listen=False)
    handle = client.handle("inbox")
    first, second = [r.run_id for r in await handle.start_many([{"input": None}, {"input": None}])]

    async def until(run_id: str, status: str) -> None:
        deadline = time.monotonic() + 10
        while (detail := await client.status(run_id)) is None or detail.run.status != status:
            assert time.monotonic() < deadline, f"the run never became {status}"
            await asyncio.sleep(0.02)

    await until(first, "awaiting_signal")
    await until(second, "awaiting_signal")
    assert (await client.signal(first, "go", {"n": 1})).kind == "delivered"
    await until(first, "done")
    assert await handle.result(first, timeout=10) == {"n": 1}  # finished: nothing to wait for
    await asyncio.sleep(0.3)
    assert await _listen_connections(dsn, schema_name) == 1

    waiting = asyncio.ensure_future(handle.result(second, timeout=10))
    await _until_listen_connections(dsn, schema_name, 2)
    assert (await client.signal(second, "go", {"n": 2})).kind == "delivered"
    assert await waiting == {"n": 2}
