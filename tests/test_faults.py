"""Database faults are never run failures: a dropped connection, a terminated backend or a
restarting server costs latency, never a step attempt, a failed run, or a run stranded until
its lease runs out. Real PostgreSQL, real faults (``pg_terminate_backend``, ``pg_ctl stop``
of a private cluster), both cores; plus a lost acknowledgement (the statement committed, the
answer never came) simulated under the retry layer, on a real database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

import iterflow
from iterflow import Code, define_flow
from iterflow.errors import DatabaseUnavailable, InvalidArgument, IterflowError
from test_crash import PrivateServer, rows
from test_crash import private_server as private_server  # the private cluster fixture


def lost_ack() -> psycopg.OperationalError:
    """What a driver raises when the connection drops after the commit, before the answer."""
    return psycopg.OperationalError("server closed the connection unexpectedly")


async def terminate_engine_backends(dsn: str, schema: str) -> int:
    """Terminate every session of the engines on ``schema`` (both cores name their connections
    ``iterflow:<schema>`` and ``iterflow-listen:<schema>``); other tests' sessions are untouched."""
    found = await rows(
        dsn,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = ANY (%s)",
        [f"iterflow:{schema}", f"iterflow-listen:{schema}"],
    )
    return int(found[0][0])


async def failed_attempts(dsn: str, schema: str) -> list[tuple[Any, ...]]:
    """Step records that show a failed attempt (a retry count, an error, a non-final status)."""
    return await rows(
        dsn,
        f'SELECT run_id, key, status, attempts, error FROM "{schema}".steps '
        "WHERE kind = 'step' AND (attempts <> 1 OR error IS NOT NULL OR status <> 'done')",
    )


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        await asyncio.sleep(0.02)


# -- every session of the engines terminated, again and again, while steps run ----------------
def slow(value: int) -> Callable[[], Awaitable[int]]:
    async def step() -> int:
        await asyncio.sleep(0.05)
        return value

    return step


@define_flow("churn")
async def churn(ctx: Any, n: int) -> Any:
    total = 0
    for i in range(4):
        total += await ctx.step(f"s{i}", slow(n * 10 + i))
    return {"n": n, "total": total}


async def test_terminated_backends_never_fail_a_run(make_engine: Any, dsn: str, schema_name: str) -> None:
    # a 30 s lease: a run stranded by a fault (instead of released) would outlive the wait
    workers = [await make_engine(churn, concurrency=4, lease="30s") for _ in range(2)]
    client = await make_engine(listen=False)
    started = await client.handle("churn").start_many([{"input": n} for n in range(24)])
    killed = 0
    for _ in range(20):
        await asyncio.sleep(0.1)
        killed += await terminate_engine_backends(dsn, schema_name)
    assert killed >= 20, "the engines' sessions were found by their application_name"
    outputs = await asyncio.wait_for(
        asyncio.gather(*(client.handle("churn").result(r.run_id, timeout=20) for r in started)), 25
    )
    assert outputs == [{"n": n, "total": 4 * n * 10 + 6} for n in range(24)]
    assert await failed_attempts(dsn, schema_name) == [], "a database fault burned a step attempt"
    assert await rows(dsn, f'SELECT count(*) FROM "{schema_name}".runs WHERE status <> %s', "done") == [(0,)]
    assert all(w.health()["listening"] for w in workers)


# -- a fault that outlives the retries: the execution is abandoned, never failed --------------
@define_flow("guarded")
async def guarded(ctx: Any, _input: Any) -> Any:
    try:
        first = await ctx.step("first", lambda: "one")
    except Exception as exc:  # noqa: BLE001 - a database fault must never land here
        return {"swallowed": repr(exc)}
    second = await ctx.step("second", lambda: "two")
    return [first, second]


async def test_an_abandoned_execution_is_released_and_replayed(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    """record_step keeps failing past the (short) retry bound: the body never sees the error,
    no failure is written, and the lease is given back at once (the lease here is 30 s; the run
    finishes in a fraction of it, on its second claim)."""
    engine = await make_engine(guarded, database_retry_timeout="300ms", lease="30s")
    inner = engine.core.inner
    real = inner.record_step
    faults = {"left": 3}

    async def flaky(*args: Any) -> Any:
        if faults["left"] > 0:
            await asyncio.sleep(0.2)
            faults["left"] -= 1
            raise lost_ack() if faults["left"] else ConnectionResetError("connection reset by peer")
        return await real(*args)

    inner.record_step = flaky
    t0 = time.monotonic()
    run = await engine.handle("guarded").start(None)
    out = await engine.handle("guarded").result(run.run_id, timeout=15)
    elapsed = time.monotonic() - t0
    assert out == ["one", "two"]
    assert elapsed < 10, f"the run waited for its lease to expire ({elapsed:.1f}s)"
    ((attempts, status),) = await rows(
        dsn, f'SELECT attempts, status FROM "{schema_name}".runs WHERE id = %s', run.run_id
    )
    assert (attempts, status) == (2, "done"), "abandoned once, claimed again, finished"
    assert await failed_attempts(dsn, schema_name) == []


async def test_a_failed_final_write_abandons_instead_of_failing(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    engine = await make_engine(guarded, database_retry_timeout="200ms")
    inner = engine.core.inner
    real = inner.finish
    faults = {"left": 1}

    async def flaky(*args: Any) -> Any:
        if faults["left"] > 0:
            faults["left"] -= 1
            raise psycopg.errors.AdminShutdown("terminating connection due to administrator command")
        return await real(*args)

    inner.finish = flaky
    run = await engine.handle("guarded").start(None)
    assert await engine.handle("guarded").result(run.run_id, timeout=15) == ["one", "two"]
    assert await failed_attempts(dsn, schema_name) == []


# -- lost acknowledgements: a repeated call finds what its first attempt wrote -----------------
@define_flow("waits")
async def waits(ctx: Any, _input: Any) -> Any:
    got = await ctx.signal("go")
    return {"got": got}


async def test_a_start_repeated_after_a_lost_ack_finds_its_own_run(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    """No idempotency key: the repeat of the insert finds the row by its id (it used to fail
    looking it up), and still says it was created."""
    client = await make_engine(listen=False)
    inner = client.core.inner
    real = inner.insert_runs
    calls: list[int] = []

    async def ack_lost_once(specs: Any, conn: Any = None) -> Any:
        made = await real(specs, conn)
        calls.append(len(specs))
        if len(calls) == 1:
            raise lost_ack()
        return made

    inner.insert_runs = ack_lost_once
    first = await client.handle("waits").start({"a": 1})
    batch = await client.handle("waits").start_many([{"input": 2}, {"input": 3, "idempotency_key": "k3"}])
    assert len(calls) == 3, "the first start was repeated"
    assert first.created and first.status in ("pending", "running")
    assert [b.created for b in batch] == [True, True]
    assert await rows(dsn, f'SELECT count(*) FROM "{schema_name}".runs') == [(3,)]


async def test_a_start_whose_wake_up_fails_after_its_commit_still_succeeds(
    make_engine: Any, core: str, dsn: str, schema_name: str
) -> None:
    """The pure-Python core announces new work in a transaction after the insert's commit; when
    that one fails (no free connection, say), start_many still returns the runs it made, each
    once: the announcement is a hint. (The Rust core's relay runs after the call returned.)"""
    if core != "python":
        pytest.skip("the Rust core announces new work from its outbox relay, off the caller's path")
    client = await make_engine(listen=False)
    inner = client.core.inner
    real = inner._rows

    async def relay_fails(name: str, *args: Any) -> Any:
        if name == "relay_notify":
            raise psycopg.OperationalError("couldn't get a connection after 2.00 sec")
        return await real(name, *args)

    inner._rows = relay_fails
    made = await client.handle("waits").start_many([{"input": i} for i in range(3)])
    assert [m.created for m in made] == [True, True, True]
    assert await rows(dsn, f'SELECT count(*) FROM "{schema_name}".runs') == [(3,)]


async def test_a_signal_repeated_after_a_lost_ack_is_stored_once(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    await make_engine(waits)
    client = await make_engine(listen=False)
    run = await client.handle("waits").start(None)

    async def waiting() -> bool:
        return (await client.status(run.run_id)).run.status == "awaiting_signal"  # type: ignore[union-attr]

    await until(waiting, 10, "the run waiting for its signal")
    inner = client.core.inner
    real = inner.deliver_signal
    keys: list[str | None] = []

    async def ack_lost_once(run_id: str, name: str, payload: str, key: str | None) -> str:
        answer = await real(run_id, name, payload, key)
        keys.append(key)
        if len(keys) == 1:
            raise lost_ack()
        return str(answer)

    inner.deliver_signal = ack_lost_once
    result = await client.signal(run.run_id, "go", {"n": 1})
    assert len(keys) == 2 and keys[0] == keys[1] and (keys[0] or "").startswith("auto:")
    assert result.kind == "delivered", result  # the repeat said duplicate: read back, told truly
    assert await client.handle("waits").result(run.run_id, timeout=10) == {"got": {"n": 1}}
    assert await rows(dsn, f'SELECT count(*) FROM "{schema_name}".signals') == [(1,)]


# -- a private server that stops and comes back ---------------------------------------------
@define_flow("held")
async def held(ctx: Any, _input: Any) -> Any:
    one = await ctx.step("one", lambda: 1)
    two = await ctx.step("two", _hold)
    three = await ctx.step("three", lambda: 3)
    return [one, two, three]


_HOLD: dict[str, asyncio.Event] = {}


async def _hold() -> int:
    _HOLD["entered"].set()
    await _HOLD["release"].wait()
    return 2


async def _outage_under_a_step(private_server: PrivateServer, core: str, *, down_for: float,
                               **options: Any) -> tuple[Any, float]:
    """Run ``held`` on the private server, stop the server (fast) while step two runs, keep it
    down ``down_for`` seconds while that step's record is being written, start it again.
    Returns the run's output and how long after the restart it finished."""
    dsn, schema = private_server.dsn, "faults"
    await iterflow.migrate(dsn, schema)
    _HOLD.update(entered=asyncio.Event(), release=asyncio.Event())
    engine = iterflow.create_engine(dsn, schema=schema, core=core, poll_interval=0.2, **options)
    engine.register(held)
    try:
        await engine.listen()
        run = await engine.handle("held").start(None)
        await asyncio.wait_for(_HOLD["entered"].wait(), 10)
        await asyncio.to_thread(private_server.stop, "fast")
        _HOLD["release"].set()
        await asyncio.sleep(down_for)
        await asyncio.to_thread(private_server.start)
        back = time.monotonic()
        out = await engine.handle("held").result(run.run_id, timeout=20)
        return out, time.monotonic() - back
    finally:
        await engine.stop()


async def test_a_step_in_flight_survives_a_server_restart(private_server: PrivateServer, core: str) -> None:
    """The server stops (fast: every session terminated) while step two runs; the step returns
    while the server is still down, so its record is retried across the outage. Once the server
    is back the run finishes within a few seconds, on its first claim, without a failed attempt."""
    dsn, schema = private_server.dsn, "faults"
    out, recovered = await _outage_under_a_step(private_server, core, down_for=1.0, lease="10s")
    assert out == [1, 2, 3]
    assert recovered < 5, f"the run finished {recovered:.1f}s after the server was back"
    assert await failed_attempts(dsn, schema) == []
    assert await rows(dsn, f'SELECT attempts, status FROM "{schema}".runs') == [(1, "done")], (
        "the execution rode out the restart: no second claim"
    )


async def test_an_outage_longer_than_the_retries_abandons_and_releases(
    private_server: PrivateServer, core: str
) -> None:
    """The server stays down past database_retry_timeout while step two's record is being
    written: the execution is abandoned (not failed), its lease (30 s) is given back as soon
    as the server answers, and the run replays at once, on its second claim."""
    dsn, schema = private_server.dsn, "faults"
    # the record's retries (1 s) run out while the server is down: the execution is abandoned
    out, recovered = await _outage_under_a_step(private_server, core, down_for=2.5, lease="30s",
                                                database_retry_timeout="1s")
    assert out == [1, 2, 3]
    assert recovered < 5, f"the run finished {recovered:.1f}s after the server was back (lease: 30s)"
    assert await failed_attempts(dsn, schema) == []
    assert await rows(dsn, f'SELECT attempts, status FROM "{schema}".runs') == [(2, "done")]


async def test_a_signal_sent_while_the_server_restarts_is_delivered_once(
    private_server: PrivateServer, core: str
) -> None:
    dsn, schema = private_server.dsn, "faults"
    await iterflow.migrate(dsn, schema)
    worker = iterflow.create_engine(dsn, schema=schema, core=core, poll_interval=0.2, lease="10s")
    worker.register(waits)
    client = iterflow.create_engine(dsn, schema=schema, core=core)
    try:
        await worker.listen()
        run = await client.handle("waits").start(None)

        async def waiting() -> bool:
            return (await client.status(run.run_id)).run.status == "awaiting_signal"  # type: ignore[union-attr]

        await until(waiting, 10, "the run waiting for its signal")
        await asyncio.to_thread(private_server.stop, "fast")
        sending = asyncio.ensure_future(client.signal(run.run_id, "go", {"n": 7}))
        await asyncio.sleep(0.7)
        assert not sending.done(), "the delivery waits for the server"
        await asyncio.to_thread(private_server.start)
        result = await asyncio.wait_for(sending, 15)
        out = await client.handle("waits").result(run.run_id, timeout=15)
    finally:
        await client.stop()
        await worker.stop()
    assert result.kind == "delivered", result
    assert out == {"got": {"n": 7}}
    assert await rows(dsn, f'SELECT name, payload FROM "{schema}".signals') == [("go", {"n": 7})]


async def test_a_stopped_server_raises_database_unavailable_after_the_bound(
    private_server: PrivateServer, core: str
) -> None:
    dsn, schema = private_server.dsn, "faults"
    await iterflow.migrate(dsn, schema)
    opened = iterflow.create_engine(dsn, schema=schema, core=core, database_retry_timeout="1.5s")
    run = await opened.handle("waits").start(None)
    await asyncio.to_thread(private_server.stop, "fast")
    fresh = iterflow.create_engine(dsn, schema=schema, core=core, database_retry_timeout="1.5s")
    calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("status", lambda: opened.status(run.run_id)),
        ("start", lambda: opened.handle("waits").start(None)),
        ("signal", lambda: opened.signal(run.run_id, "go", 1)),
        ("first use", lambda: fresh.handle("waits").start(None)),
    ]
    try:
        for what, call in calls:
            t0 = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as info:
                await call()
            elapsed = time.monotonic() - t0
            exc = info.value
            assert isinstance(exc, IterflowError) and exc.code == Code.DATABASE_UNAVAILABLE, what
            assert type(exc).__module__ == "iterflow.errors", what
            assert 1.4 <= elapsed <= 4.0, f"{what}: raised after {elapsed:.2f}s (bound 1.5s)"
    finally:
        await opened.stop()
        await fresh.stop()


async def test_a_malformed_dsn_is_an_invalid_argument_at_once(core: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(InvalidArgument) as info:
        engine = iterflow.create_engine("host=localhost port", core=core, database_retry_timeout="5s")
        await engine.status("00000000-0000-0000-0000-000000000000")
    assert info.value.code == Code.INVALID_ARGUMENT
    assert time.monotonic() - t0 < 2, "not retried as if the server were down"


async def test_migrate_follows_the_same_fault_rules(private_server: PrivateServer) -> None:
    """``migrate`` talks to the database itself: against a stopped server it retries for its
    bound and raises DatabaseUnavailable, a malformed DSN is an InvalidArgument at once, and
    once the server is back it applies every migration."""
    await asyncio.to_thread(private_server.stop, "fast")
    try:
        t0 = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            await iterflow.migrate(private_server.dsn, "faults", database_retry_timeout="1s")
        assert 0.95 <= time.monotonic() - t0 <= 4.0, "refused only once the whole bound has passed"
        with pytest.raises(InvalidArgument):
            await iterflow.migrate("host=localhost port", "faults")
    finally:
        await asyncio.to_thread(private_server.start)
    assert await iterflow.migrate(private_server.dsn, "faults") == iterflow.sql.latest_version()
