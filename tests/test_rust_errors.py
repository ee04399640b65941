"""The Rust core's database errors: PostgreSQL's own text and SQLSTATE, a ``transient`` flag
that tells a lost connection from a failed statement, and the typed errors ``iterflow.faults``
makes of them. Arguments the core cannot take raise Python errors, never a Rust panic."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

import iterflow
from iterflow.errors import DatabaseError, DatabaseUnavailable
from iterflow.faults import is_transient, to_iterflow_error

_core = pytest.importorskip("iterflow._core")
from iterflow.cores.rust import CoreError, RustCore  # noqa: E402
from test_crash import PrivateServer, private_server  # noqa: E402, F401  (a crashable server)

APP = "iterflow-errors"


@pytest.fixture
async def open_core(dsn: str) -> AsyncIterator[Any]:
    """``open_core(schema, dsn=...)``: an opened RustCore (no LISTEN), closed at teardown."""
    cores: list[RustCore] = []

    async def make(schema: str, dsn_: str = dsn) -> RustCore:
        core = RustCore(dsn_, schema=schema, pool_size=2, notify=False, application_name=APP)
        await core.open()
        cores.append(core)
        return core

    yield make
    for core in cores:
        await core.close()


async def _terminate_when_waiting_on_a_lock(dsn: str, app: str) -> None:
    """Once a backend named ``app`` waits on a lock, terminate every backend named ``app``."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 10
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                "AND wait_event_type = 'Lock'", (app,),
            )
            row = await cur.fetchone()
            if row and row[0]:
                break
            assert time.monotonic() < deadline, f"no backend of {app} waits on the lock"
            await asyncio.sleep(0.01)
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s", (app,),
        )
        row = await cur.fetchone()
        assert row and row[0] >= 1


async def test_a_statement_error_carries_postgres_text_and_sqlstate(open_core: Any, schema_name: str) -> None:
    core = await open_core(schema_name)  # never migrated: its tables do not exist
    with pytest.raises(CoreError) as info:
        await core.get_run(str(uuid.uuid4()))
    exc = info.value
    assert exc.code == "DATABASE_ERROR"
    assert exc.sqlstate == "42P01"
    assert "does not exist" in exc.message and schema_name in exc.message, exc.message
    assert exc.transient is False
    assert exc.detail is None
    assert "db error" not in str(exc)
    assert str(exc).startswith("DATABASE_ERROR: database error 42P01: "), str(exc)
    assert not is_transient(exc)
    err = to_iterflow_error(exc, "get_run")
    assert type(err) is DatabaseError
    assert err.sqlstate == "42P01"
    assert "does not exist" in err.message and err.message.startswith("get_run: "), err.message


async def test_a_lost_connection_is_transient_and_the_next_call_reconnects(
    dsn: str, open_core: Any, schema_name: str
) -> None:
    await iterflow.migrate(dsn, schema_name)
    core = await open_core(schema_name)
    run_id = str(uuid.uuid4())
    assert await core.get_run(run_id) is None
    # catch a call in flight: it waits on a lock held here while its backend is terminated
    async with await psycopg.AsyncConnection.connect(dsn) as locker:
        await locker.execute(f'LOCK TABLE "{schema_name}".runs IN ACCESS EXCLUSIVE MODE')
        call = asyncio.ensure_future(core.get_run(run_id))
        await _terminate_when_waiting_on_a_lock(dsn, f"{APP}:{schema_name}")
        with pytest.raises(CoreError) as info:
            await asyncio.wait_for(call, 10)
        await locker.rollback()
    exc = info.value
    assert exc.code == "DATABASE_ERROR"
    assert exc.transient is True
    assert exc.sqlstate in (None, "57P01") or exc.sqlstate.startswith("08"), exc.sqlstate
    assert "db error" not in str(exc) and exc.message, str(exc)
    assert is_transient(exc)
    err = to_iterflow_error(exc, "get_run")
    assert isinstance(err, DatabaseUnavailable)
    assert exc.message in err.message
    # the dead connection went away with its call: the pool connects anew
    assert await core.get_run(run_id) is None


async def test_a_refused_connection_is_transient(open_core: Any, schema_name: str) -> None:
    # port 1 on loopback: nothing listens there, the connect is refused at once
    core = await open_core(schema_name, "postgresql://postgres@127.0.0.1:1/test")
    started = time.monotonic()
    with pytest.raises(CoreError) as info:
        await core.get_run(str(uuid.uuid4()))
    assert time.monotonic() - started < 5
    exc = info.value
    assert exc.transient is True and exc.sqlstate is None
    assert exc.message.startswith("cannot connect to 127.0.0.1:1: "), exc.message
    err = to_iterflow_error(exc, "get_run")
    assert isinstance(err, DatabaseUnavailable)
    assert "cannot connect to 127.0.0.1:1" in err.message


@pytest.mark.parametrize("options", [
    {"pool_size": 2**63},
    {"pool_size": 2**64},
    {"pool_size": 10_001},
    {"pool_size": -1},
    {"writer_shards": 2**62},
    {"max_batch": 2**63},
])
def test_oversized_arguments_raise_python_errors(dsn: str, options: dict[str, int]) -> None:
    # a Rust panic would surface as pyo3's PanicException, a BaseException: not caught here
    with pytest.raises((CoreError, OverflowError, ValueError)) as info:
        _core.Core(dsn, "t_args", **options)
    if isinstance(info.value, CoreError):
        assert info.value.code == "INVALID_ARGUMENT"
        assert info.value.transient is False


async def _until(check: Any, within: float, what: str) -> float:
    """Seconds until ``check()`` is true (at most ``within``)."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < within, f"{what} not within {within} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_a_server_restart_fails_calls_fast_then_everything_reconnects(
    private_server: PrivateServer,  # noqa: F811  (the fixture imported above)
) -> None:
    dsn, schema = private_server.dsn, "restart"
    await iterflow.migrate(dsn, schema)
    core = RustCore(dsn, schema=schema, pool_size=2, notify=True, application_name=APP)
    await core.open()
    try:
        run_id = str(uuid.uuid4())
        assert await core.get_run(run_id) is None
        await core.listen()
        await _until(lambda: core.stats()["listening"], 10, "the LISTEN connection")
        private_server.crash()
        await _until(lambda: not core.stats()["listening"], 10, "the listener seeing the crash")
        # down for a while: the listener's reconnect backoff grows to its cap meanwhile
        down_until = time.monotonic() + 6.5
        while time.monotonic() < down_until:
            started = time.monotonic()
            with pytest.raises(CoreError) as info:
                await core.get_run(run_id)
            assert time.monotonic() - started < 5, "a call hangs while the server is down"
            assert info.value.transient is True, str(info.value)
            assert isinstance(to_iterflow_error(info.value, "get_run"), DatabaseUnavailable)
            await asyncio.sleep(0.5)
        assert "cannot connect to 127.0.0.1:" in info.value.message, info.value.message
        private_server.start()  # returns once the server accepts connections
        assert await core.get_run(run_id) is None  # the pool connects anew at once
        waited = await _until(lambda: core.stats()["listening"], 5, "the listener's reconnect")
        assert waited < 2, f"the listener reconnected {waited:.2f} s after the server was back"
    finally:
        await core.close()


async def test_a_nan_timeout_does_not_panic(open_core: Any, schema_name: str) -> None:
    core = await open_core(schema_name)
    await asyncio.wait_for(core.changed_runs(float("nan")), 5)
