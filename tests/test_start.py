"""Starting runs and reading them back (docs/guide.md §1, §3, §5) on a real Postgres.

Every test that claims "nothing was written" looks at the tables themselves, not the API.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pydantic
import pytest

import iterflow
from iterflow import (
    Code,
    IterflowError,
    RunCanceled,
    RunFailed,
    RunNotFound,
    SchemaMismatch,
    StartSpec,
    create_engine,
    define_flow,
    flow,
)


class Address(pydantic.BaseModel):
    street: str
    zip: int


class Signup(pydantic.BaseModel):
    user_id: str
    address: Address


class Receipt(pydantic.BaseModel):
    amount: int
    currency: str


async def rows(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, args or None)
        return await cur.fetchall() if cur.description else []


async def count(dsn: str, schema: str, table: str, where: str = "true", *args: Any) -> int:
    (row,) = await rows(dsn, f'SELECT count(*) FROM "{schema}".{table} WHERE {where}', *args)
    return int(row[0])


async def nothing_written(dsn: str, schema: str) -> bool:
    totals = [await count(dsn, schema, t) for t in ("runs", "queue", "steps", "signals")]
    return totals == [0, 0, 0, 0]


def echo_flow(name: str = "echo", version: int = 1) -> iterflow.Flow:
    @define_flow(name, version=version)
    async def body(ctx: iterflow.Context, value: Any) -> Any:
        return {"echo": value, "version": ctx.flow_version}

    return body


# -- start / result --------------------------------------------------------------------------


async def test_builder_flow_start_and_result(make_engine: Any) -> None:
    onboard = (
        flow("onboard")
        .version(2)
        .input(Signup)
        .step("account", lambda s: {"id": f"acct-{s.input.user_id}", "zip": s.input.address.zip})
        .step("welcome", lambda s: {**s.input, "mailed": True})
        .output(lambda s: {"result": s.input})
        .build()
    )
    engine = await make_engine(onboard)
    handle = engine.handle("onboard", 2)
    started = await handle.start({"user_id": "u1", "address": {"street": "Main", "zip": "1234"}})
    assert started.created and started.status == "pending"
    assert uuid.UUID(started.run_id)
    out = await handle.result(started.run_id, timeout=10)
    assert out == {"result": {"id": "acct-u1", "zip": 1234, "mailed": True}}


async def test_body_flow_start_and_result(make_engine: Any, dsn: str, schema_name: str) -> None:
    @define_flow("checkout", version=3, input=Signup)
    async def checkout(ctx: iterflow.Context, order: Signup) -> Any:
        assert isinstance(order, Signup)
        first = await ctx.step("first", lambda: order.user_id.upper())
        second = await ctx.step("second", lambda s: s.attempt)
        return {
            "first": first,
            "second": second,
            "run": ctx.run_id,
            "attempt": ctx.attempt,
            "flow": f"{ctx.flow_name}@{ctx.flow_version}",
        }

    engine = await make_engine(checkout)
    handle = engine.handle("checkout", 3)
    started = await handle.start(Signup(user_id="ab", address=Address(street="x", zip=1)))
    out = await handle.result(started.run_id, timeout=10)
    assert out == {"first": "AB", "second": 1, "run": started.run_id, "attempt": 1, "flow": "checkout@3"}
    (stored,) = await rows(dsn, f'SELECT input, status FROM "{schema_name}".runs')
    assert stored == ({"user_id": "ab", "address": {"street": "x", "zip": 1}}, "done")
    assert await count(dsn, schema_name, "queue") == 0, "finished work must leave the queue table"


# -- idempotency -----------------------------------------------------------------------------


async def test_idempotency_key_returns_existing_run(make_engine: Any, dsn: str, schema_name: str) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    handle = engine.handle("echo")
    first = await handle.start({"a": 1}, idempotency_key="order:1")
    again = await handle.start({"a": 2}, idempotency_key="order:1")
    other = await handle.start({"a": 3}, idempotency_key="order:2")
    assert first.created and not again.created and other.created
    assert again.run_id == first.run_id and other.run_id != first.run_id
    assert await count(dsn, schema_name, "runs") == 2
    (inp,) = await rows(dsn, f'SELECT input FROM "{schema_name}".runs WHERE id = %s', first.run_id)
    assert inp == ({"a": 1},), "a repeat must not overwrite the first input"


async def test_concurrent_idempotent_starts_converge(make_engine: Any, dsn: str, schema_name: str) -> None:
    engine = await make_engine(echo_flow(), listen=False, concurrency=20)
    handle = engine.handle("echo")
    results = await asyncio.gather(*(handle.start({"n": i}, idempotency_key="racer") for i in range(20)))
    assert len({r.run_id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert await count(dsn, schema_name, "runs") == 1
    assert await count(dsn, schema_name, "queue") == 1


async def test_concurrent_starts_from_two_engines_converge(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    a = await make_engine(echo_flow(), listen=False)
    b = await make_engine(echo_flow(), listen=False)
    results = await asyncio.gather(
        *((a if i % 2 else b).handle("echo").start(i, idempotency_key="k") for i in range(10))
    )
    assert len({r.run_id for r in results}) == 1 and sum(r.created for r in results) == 1
    assert await count(dsn, schema_name, "runs") == 1


async def test_different_versions_do_not_dedupe(make_engine: Any) -> None:
    engine = await make_engine(echo_flow(version=1), echo_flow(version=2))
    v1 = await engine.handle("echo", 1).start("x", idempotency_key="same")
    v2 = await engine.handle("echo", 2).start("x", idempotency_key="same")
    assert v1.created and v2.created and v1.run_id != v2.run_id
    assert await engine.handle("echo", 1).result(v1.run_id, timeout=10) == {"echo": "x", "version": 1}
    assert await engine.handle("echo", 2).result(v2.run_id, timeout=10) == {"echo": "x", "version": 2}


# -- tags, delay, priority ------------------------------------------------------------------


async def test_tags_are_stored(make_engine: Any) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    started = await engine.handle("echo").start(None, tags=["tenant:a", "batch"])
    detail = await engine.status(started.run_id)
    assert detail is not None and detail.run.tags == ("tenant:a", "batch")


async def test_delay_postpones_the_first_claim(make_engine: Any) -> None:
    engine = await make_engine(echo_flow(), poll_interval=0.05)
    handle = engine.handle("echo")
    t0 = time.monotonic()
    started = await handle.start(1, delay="600ms")
    await asyncio.sleep(0.3)
    detail = await engine.status(started.run_id)
    assert detail is not None and detail.run.status == "pending" and detail.run.attempts == 0
    assert await handle.result(started.run_id, timeout=10) == {"echo": 1, "version": 1}
    assert time.monotonic() - t0 >= 0.55


async def test_priority_orders_claims(make_engine: Any) -> None:
    order: list[int] = []

    @define_flow("prio")
    async def prio(ctx: iterflow.Context, n: int) -> int:
        await ctx.step("record", lambda: order.append(n))
        return n

    client = await make_engine(prio, listen=False)
    handle = client.handle("prio")
    low = [await handle.start(i, priority=0) for i in range(3)]
    high = [await handle.start(10 + i, priority=5) for i in range(3)]
    worker = await make_engine(prio, concurrency=1)
    for started in low + high:
        await worker.handle("prio").result(started.run_id, timeout=10)
    assert order == [10, 11, 12, 0, 1, 2]


# -- joining the caller's transaction ----------------------------------------------------------


async def test_start_in_async_transaction_rollback_and_commit(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    engine = await make_engine(echo_flow(), poll_interval=0.05)
    handle = engine.handle("echo")
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        rolled = await handle.start("gone", conn=conn, idempotency_key="tx")
        assert rolled.created
        await conn.rollback()
    assert await engine.status(rolled.run_id) is None
    assert await nothing_written(dsn, schema_name)
    with pytest.raises(RunNotFound):
        await handle.result(rolled.run_id, timeout=1)

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        kept = await handle.start("kept", conn=conn, idempotency_key="tx")
        assert kept.created
        await conn.execute("SELECT 1")
        # uncommitted: invisible to the engine's own connections, so no worker can run it
        await asyncio.sleep(0.3)
        assert await engine.status(kept.run_id) is None
        await conn.commit()
    assert await handle.result(kept.run_id, timeout=10) == {"echo": "kept", "version": 1}


async def test_start_in_sync_transaction_rollback_and_commit(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    engine = await make_engine(echo_flow(), poll_interval=0.05)
    handle = engine.handle("echo")
    with psycopg.connect(dsn) as conn:
        rolled = await handle.start("gone", conn=conn)
        conn.rollback()
    assert await engine.status(rolled.run_id) is None
    assert await nothing_written(dsn, schema_name)

    with psycopg.connect(dsn) as conn:
        conn.execute(f'CREATE TABLE "{schema_name}".orders (id int)')
        conn.execute(f'INSERT INTO "{schema_name}".orders VALUES (1)')
        kept = await handle.start("kept", conn=conn)
        conn.commit()
    assert await handle.result(kept.run_id, timeout=10) == {"echo": "kept", "version": 1}
    assert await count(dsn, schema_name, "orders") == 1


async def test_start_many_inside_caller_transaction_rolls_back(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        made = await engine.handle("echo").start_many([{"input": i} for i in range(3)], conn=conn)
        assert len(made) == 3
        await conn.rollback()
    assert await nothing_written(dsn, schema_name)


# -- start_many ---------------------------------------------------------------------------------


async def test_start_many_invalid_item_writes_nothing(make_engine: Any, dsn: str, schema_name: str) -> None:
    @define_flow("typed", input=Signup)
    async def typed(ctx: iterflow.Context, value: Signup) -> str:
        return value.user_id

    engine = await make_engine(typed, listen=False)
    good = {"user_id": "u", "address": {"street": "s", "zip": 1}}
    items = [{"input": good, "idempotency_key": f"k{i}"} for i in range(5)]
    items[2] = {"input": {"user_id": "u", "address": {"street": "s", "zip": "not a number"}}}
    with pytest.raises(IterflowError) as info:
        await engine.handle("typed").start_many(items)
    assert info.value.code == Code.INPUT_INVALID
    assert any(issue["path"] == "address.zip" for issue in info.value.issues)
    assert await nothing_written(dsn, schema_name)


BAD_ITEMS: list[Any] = [
    {"input": 1, "priority": "high"},
    {"input": 1, "delay": "soon"},
    {"input": 1, "tags": [""]},
    {"input": 1, "idempotency_key": ""},
    {"input": 1, "unknown_key": 1},
    "not a spec",
]


async def test_start_many_bad_option_in_the_middle_writes_nothing(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    for bad in BAD_ITEMS:
        items: list[Any] = [{"input": 0}, StartSpec(input=1), bad, {"input": 3}]
        with pytest.raises(IterflowError) as info:
            await engine.handle("echo").start_many(items)
        assert info.value.code == Code.INVALID_ARGUMENT, bad
        assert "items[2]" in info.value.message, bad
    assert await nothing_written(dsn, schema_name)


async def test_start_many_value_the_database_refuses_writes_nothing(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    """A priority beyond the column's range must be a typed error, not a driver error mid-batch."""
    engine = await make_engine(echo_flow(), listen=False)
    items = [{"input": i} for i in range(3)] + [{"input": 9, "priority": 2**40}]
    with pytest.raises(IterflowError) as info:
        await engine.handle("echo").start_many(items)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert await nothing_written(dsn, schema_name)


async def test_start_many_duplicates_in_batch_and_from_earlier(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    handle = engine.handle("echo")
    earlier = await handle.start("early", idempotency_key="old")
    made = await handle.start_many(
        [
            StartSpec("a", idempotency_key="new"),
            {"input": "b", "idempotency_key": "old"},
            {"input": "c", "idempotency_key": "new"},
            {"input": "d"},
            {"input": "e"},
        ]
    )
    assert [m.created for m in made] == [True, False, False, True, True]
    assert made[1].run_id == earlier.run_id
    assert made[2].run_id == made[0].run_id
    assert made[3].run_id != made[4].run_id
    assert await count(dsn, schema_name, "runs") == 4


async def test_start_many_large_batch_is_chunked_in_order(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    items = [{"input": i, "idempotency_key": f"k{i}"} for i in range(2305)]
    items[2200] = {"input": "dup", "idempotency_key": "k5"}  # duplicate across a chunk boundary
    made = await engine.handle("echo").start_many(items)
    assert len(made) == 2305
    assert made[2200].run_id == made[5].run_id and not made[2200].created
    assert sum(m.created for m in made) == 2304
    assert await count(dsn, schema_name, "runs") == 2304
    by_key = dict(await rows(dsn, f'SELECT idempotency_key, id::text FROM "{schema_name}".runs'))
    for i in (0, 999, 1000, 1001, 1999, 2000, 2304):
        assert made[i].run_id == by_key[f"k{i}"]


async def test_start_many_large_batch_with_bad_last_item_writes_nothing(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    items: list[Any] = [{"input": i} for i in range(1500)] + [{"input": 1, "delay": -5}]
    with pytest.raises(IterflowError):
        await engine.handle("echo").start_many(items)
    assert await nothing_written(dsn, schema_name)


# -- result() outcomes ---------------------------------------------------------------------------


async def test_result_raises_run_failed(make_engine: Any) -> None:
    @define_flow("boom")
    async def boom(ctx: iterflow.Context, _: Any) -> None:
        await ctx.step("explode", lambda: 1 / 0)

    engine = await make_engine(boom)
    started = await engine.handle("boom").start()
    with pytest.raises(RunFailed) as info:
        await engine.handle("boom").result(started.run_id, timeout=10)
    assert info.value.code == Code.STEP_FAILED
    assert info.value.run_id == started.run_id
    assert "ZeroDivisionError" in info.value.message
    assert isinstance(info.value, IterflowError)


async def test_result_raises_run_canceled(make_engine: Any) -> None:
    engine = await make_engine(echo_flow())
    started = await engine.handle("echo").start(1, delay="1h")
    await engine.cancel(started.run_id, reason="customer gave up")
    with pytest.raises(RunCanceled) as info:
        await engine.handle("echo").result(started.run_id, timeout=5)
    assert info.value.code == Code.RUN_CANCELED
    assert info.value.run_id == started.run_id
    assert "customer gave up" in info.value.message


async def test_result_raises_run_not_found(make_engine: Any) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    with pytest.raises(RunNotFound) as info:
        await engine.handle("echo").result(str(uuid.uuid4()), timeout=1)
    assert info.value.code == Code.RUN_NOT_FOUND


async def test_result_times_out(make_engine: Any) -> None:
    engine = await make_engine(echo_flow())
    started = await engine.handle("echo").start(1, delay="1h")
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await engine.handle("echo").result(started.run_id, timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 2.0


# -- list_runs and status ------------------------------------------------------------------------


async def test_list_runs_filters(make_engine: Any) -> None:
    @define_flow("fails")
    async def fails(ctx: iterflow.Context, _: Any) -> None:
        raise ValueError("no")

    engine = await make_engine(echo_flow(), fails)
    echo, bad = engine.handle("echo"), engine.handle("fails")
    a = await echo.start(1, tags=["tenant:a"])
    b = await echo.start(2, tags=["tenant:b", "vip"])
    c = await bad.start(None, tags=["tenant:a"])
    await echo.result(a.run_id, timeout=10)
    await echo.result(b.run_id, timeout=10)
    with pytest.raises(RunFailed):
        await bad.result(c.run_id, timeout=10)
    await asyncio.sleep(0.01)
    middle = datetime.now().astimezone()
    await asyncio.sleep(0.01)
    d = await echo.start(4, delay="1h", tags=["tenant:a"])

    def ids(page: iterflow.RunPage) -> list[str]:
        return [r.run_id for r in page.runs]

    assert ids(await engine.list_runs()) == [d.run_id, c.run_id, b.run_id, a.run_id]
    assert ids(await engine.list_runs(name="echo")) == [d.run_id, b.run_id, a.run_id]
    assert ids(await engine.list_runs(name="nope")) == []
    assert ids(await engine.list_runs(status="failed")) == [c.run_id]
    assert ids(await engine.list_runs(status=["done", "pending"])) == [d.run_id, b.run_id, a.run_id]
    assert ids(await engine.list_runs(tag="tenant:a")) == [d.run_id, c.run_id, a.run_id]
    assert ids(await engine.list_runs(tag="vip")) == [b.run_id]
    assert ids(await engine.list_runs(tag="tenant:a", name="echo", status="done")) == [a.run_id]
    assert ids(await engine.list_runs(since=middle)) == [d.run_id]
    assert ids(await engine.list_runs(until=middle)) == [c.run_id, b.run_id, a.run_id]
    assert ids(await engine.list_runs(since=middle + timedelta(hours=1))) == []

    page = await engine.list_runs(status="failed")
    (summary,) = page.runs
    assert summary.name == "fails" and summary.version == 1 and summary.tags == ("tenant:a",)
    assert summary.error is not None and summary.error["code"] == Code.STEP_FAILED
    assert summary.waiting is None and summary.attempts == 1
    (pending,) = (await engine.list_runs(status="pending")).runs
    assert pending.waiting is not None and pending.waiting.kind == "queued" and str(pending.waiting)


async def test_list_runs_keyset_pagination(make_engine: Any) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    handle = engine.handle("echo")
    # one batch shares created_at (one transaction), so the id tie-breaker is exercised too
    made = [m.run_id for m in await handle.start_many([{"input": i} for i in range(17)])]
    made += [(await handle.start(i)).run_id for i in range(8)]
    seen: list[str] = []
    pages = 0
    cursor = None
    while True:
        page = await engine.list_runs(limit=7, cursor=cursor)
        pages += 1
        seen += [r.run_id for r in page.runs]
        if page.next is None:
            break
        cursor = page.next
    assert pages == 4
    assert len(seen) == len(set(seen)) == 25
    assert set(seen) == set(made)
    stamps = [(r.created_at, r.run_id) for r in (await engine.list_runs(limit=500)).runs]
    assert stamps == sorted(stamps, reverse=True)
    assert [s[1] for s in stamps] == seen
    # an exact multiple of the page size ends without an empty extra page
    exact = await engine.list_runs(limit=25)
    assert len(exact.runs) == 25 and exact.next is None


async def test_list_runs_limit_refused(make_engine: Any) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    for limit in (0, 501, 10_000, -1, True, "5"):
        with pytest.raises(IterflowError) as info:
            await engine.list_runs(limit=limit)
        assert info.value.code == Code.INVALID_ARGUMENT, limit
    assert (await engine.list_runs(limit=500)).runs == []


async def test_list_runs_bad_arguments(make_engine: Any) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    for kwargs in ({"status": "finished"}, {"cursor": "garbage!!"}, {"since": datetime(2024, 1, 1)}):
        with pytest.raises(IterflowError) as info:
            await engine.list_runs(**kwargs)
        assert info.value.code == Code.INVALID_ARGUMENT


async def test_status_detail(make_engine: Any) -> None:
    @define_flow("two")
    async def two(ctx: iterflow.Context, value: int) -> int:
        a = await ctx.step("a", lambda: value + 1)
        b = await ctx.step("b", lambda: a * 10)
        return b

    engine = await make_engine(two)
    started = await engine.handle("two").start(4, tags=["t"])
    assert await engine.handle("two").result(started.run_id, timeout=10) == 50
    detail = await engine.status(started.run_id)
    assert detail is not None
    run = detail.run
    assert (run.run_id, run.name, run.version, run.status) == (started.run_id, "two", 1, "done")
    assert (run.input, run.output, run.tags, run.error, run.waiting) == (4, 50, ("t",), None, None)
    assert run.attempts == 1
    assert [(s["key"], s["kind"], s["status"], s["result"], s["attempts"]) for s in detail.steps] == [
        ("a", "step", "done", 5, 1),
        ("b", "step", "done", 50, 1),
    ]
    assert detail.children == [] and detail.signals == [] and detail.timers == []
    assert await engine.status(str(uuid.uuid4())) is None


# -- JSON normalization -------------------------------------------------------------------------


async def test_step_model_result_is_json_on_first_run_and_replay(make_engine: Any) -> None:
    seen: list[tuple[str, Any]] = []

    @define_flow("normalize")
    async def normalize(ctx: iterflow.Context, _: Any) -> Any:
        raw = await ctx.step("raw", lambda: Receipt(amount=5, currency="EUR"))
        typed = await ctx.step("typed", lambda: Receipt(amount=7, currency="USD"), result=Receipt)
        when = await ctx.step("when", lambda: datetime(2024, 1, 2, 3, 4, 5).astimezone())
        seen.append(("raw", raw))
        seen.append(("typed", typed))
        seen.append(("when", when))
        await ctx.sleep(0.2)  # forces a replay: the values below come from the database
        return {"raw": raw, "typed_amount": typed.amount}

    engine = await make_engine(normalize, poll_interval=0.05, sticky_cache=0)  # a replay, not a resume
    started = await engine.handle("normalize").start()
    out = await engine.handle("normalize").result(started.run_id, timeout=10)
    assert out == {"raw": {"amount": 5, "currency": "EUR"}, "typed_amount": 7}
    assert len(seen) == 6, "expected a first run and a replay"
    first, replay = seen[:3], seen[3:]
    for (kind, a), (_, b) in zip(first, replay, strict=True):
        assert type(a) is type(b) and a == b, kind
    assert first[0][1] == {"amount": 5, "currency": "EUR"} and type(first[0][1]) is dict
    assert isinstance(first[1][1], Receipt) and first[1][1] == Receipt(amount=7, currency="USD")
    assert isinstance(first[2][1], str)


async def test_builder_channel_follows_json_rule(make_engine: Any) -> None:
    channels: list[Any] = []

    def first(s: iterflow.StepArgs) -> Receipt:
        channels.append(s.input)
        return Receipt(amount=s.input.address.zip, currency="EUR")

    def second(s: iterflow.StepArgs) -> Any:
        channels.append(s.input)
        return s.input

    f = flow("chan").input(Signup).step("first", first).step("second", second).build()
    engine = await make_engine(f)
    started = await engine.handle("chan").start({"user_id": "u", "address": {"street": "s", "zip": 9}})
    assert await engine.handle("chan").result(started.run_id, timeout=10) == {"amount": 9, "currency": "EUR"}
    assert isinstance(channels[0], Signup)
    assert channels[1] == {"amount": 9, "currency": "EUR"} and type(channels[1]) is dict


async def test_output_is_normalized(make_engine: Any) -> None:
    @define_flow("out")
    async def out(ctx: iterflow.Context, _: Any) -> Any:
        return {"receipt": Receipt(amount=1, currency="X"), "items": (1, 2), "id": uuid.UUID(int=1)}

    engine = await make_engine(out)
    started = await engine.handle("out").start()
    assert await engine.handle("out").result(started.run_id, timeout=10) == {
        "receipt": {"amount": 1, "currency": "X"},
        "items": [1, 2],
        "id": str(uuid.UUID(int=1)),
    }


async def test_unserializable_input_is_refused_before_write(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    with pytest.raises(IterflowError) as info:
        await engine.handle("echo").start({"blob": b"bytes"})
    assert info.value.code == Code.INVALID_ARGUMENT and "blob" in info.value.message
    with pytest.raises(IterflowError):
        await engine.handle("echo").start({"x": float("nan")})
    assert await nothing_written(dsn, schema_name)


# -- input validation and limits --------------------------------------------------------------------


async def test_input_schema_validation(make_engine: Any, dsn: str, schema_name: str) -> None:
    @define_flow("typed", input=Signup)
    async def typed(ctx: iterflow.Context, value: Signup) -> str:
        return value.user_id

    engine = await make_engine(typed, listen=False)
    with pytest.raises(IterflowError) as info:
        await engine.handle("typed").start({"user_id": 5, "address": {"street": "s"}})
    err = info.value
    assert err.code == Code.INPUT_INVALID
    paths = {issue["path"] for issue in err.issues}
    assert {"user_id", "address.zip"} <= paths
    assert all(issue["message"] for issue in err.issues)
    # an enqueue-only handle validates with the schema it was given
    remote = engine.handle("typed-remote", 1, input_schema=Signup)
    with pytest.raises(IterflowError) as info:
        await remote.start({"user_id": "u"})
    assert info.value.code == Code.INPUT_INVALID
    assert await nothing_written(dsn, schema_name)


async def test_input_too_large(make_engine: Any, dsn: str, schema_name: str) -> None:
    engine = await make_engine(echo_flow(), listen=False, limits={"max_input_bytes": 100})
    handle = engine.handle("echo")
    with pytest.raises(IterflowError) as info:
        await handle.start("x" * 200)
    assert info.value.code == Code.INPUT_TOO_LARGE
    with pytest.raises(IterflowError) as info:
        await handle.start_many([{"input": 1}, {"input": "é" * 60}])  # 120 UTF-8 bytes
    assert info.value.code == Code.INPUT_TOO_LARGE
    assert await nothing_written(dsn, schema_name)
    assert (await handle.start("x" * 50)).created


async def test_step_result_too_large(make_engine: Any, dsn: str, schema_name: str) -> None:
    @define_flow("big")
    async def big(ctx: iterflow.Context, _: Any) -> Any:
        return await ctx.step("blob", lambda: "y" * 5000, retries=3, base_delay=0.01)

    engine = await make_engine(big, limits={"max_step_result_bytes": 1000})
    started = await engine.handle("big").start()
    with pytest.raises(RunFailed) as info:
        await engine.handle("big").result(started.run_id, timeout=10)
    assert info.value.code == Code.STEP_RESULT_TOO_LARGE
    stored = await rows(dsn, f'SELECT result, error, attempts FROM "{schema_name}".steps')
    assert len(stored) == 1
    result, error, attempts = stored[0]
    assert result is None and error["code"] == Code.STEP_RESULT_TOO_LARGE
    assert attempts == 1, "an oversized result is not retried"
    big_rows = await rows(
        dsn, f"SELECT count(*) FROM \"{schema_name}\".steps WHERE result::text LIKE '%yyyy%'"
    )
    assert big_rows == [(0,)]


async def test_signal_payload_too_large(make_engine: Any, dsn: str, schema_name: str) -> None:
    engine = await make_engine(echo_flow(), listen=False, limits={"max_signal_payload_bytes": 64})
    started = await engine.handle("echo").start(1, delay="1h")
    with pytest.raises(IterflowError) as info:
        await engine.signal(started.run_id, "approve", {"note": "z" * 100})
    assert info.value.code == Code.SIGNAL_PAYLOAD_TOO_LARGE
    assert await count(dsn, schema_name, "signals") == 0
    assert (await engine.signal(started.run_id, "approve", {"note": "ok"})).kind == "buffered"


# -- typed errors with stable codes ------------------------------------------------------------------


@pytest.mark.parametrize("schema", ["Bad", "has-dash", 'x"; drop table runs; --', "", "1abc", "a" * 64, None])
def test_bad_schema_name(dsn: str, schema: Any) -> None:
    with pytest.raises(IterflowError) as info:
        create_engine(dsn, schema=schema, core="python")
    assert info.value.code == Code.INVALID_ARGUMENT


async def test_bad_schema_name_in_migrate(dsn: str) -> None:
    with pytest.raises(IterflowError) as info:
        await iterflow.migrate(dsn, "bad-name")
    assert info.value.code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "option",
    [
        {"lease": "soon"},
        {"lease": -1},
        {"lease": "100ms"},
        {"poll_interval": "x"},
        {"default_step_timeout": "forever"},
        {"concurrency": 0},
        {"max_run_attempts": 0},
        {"limits": {"max_input_bytes": -1}},
        {"limits": {"max_inptu_bytes": 10}},
        {"core": "java"},
    ],
)
def test_bad_engine_options(dsn: str, option: dict[str, Any]) -> None:
    with pytest.raises(IterflowError) as info:
        create_engine(dsn, schema="workflow", **option)
    assert info.value.code == Code.INVALID_ARGUMENT


async def test_bad_delay(make_engine: Any, dsn: str, schema_name: str) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    for delay in ("soon", -1, "-5s", "5 parsecs", object()):
        with pytest.raises(IterflowError) as info:
            await engine.handle("echo").start(1, delay=delay)
        assert info.value.code == Code.INVALID_ARGUMENT, delay
    assert await nothing_written(dsn, schema_name)


async def test_bad_duration_inside_a_body_fails_the_run(make_engine: Any) -> None:
    @define_flow("nap")
    async def nap(ctx: iterflow.Context, _: Any) -> None:
        await ctx.sleep("a while")

    engine = await make_engine(nap)
    started = await engine.handle("nap").start()
    with pytest.raises(RunFailed) as info:
        await engine.handle("nap").result(started.run_id, timeout=10)
    assert info.value.code == Code.INVALID_ARGUMENT


async def test_unknown_run_id(make_engine: Any) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    for rid in (str(uuid.uuid4()), "not-a-uuid", ""):
        for call in (
            engine.handle("echo").result(rid, timeout=1),
            engine.signal(rid, "go", 1),
            engine.cancel(rid),
        ):
            with pytest.raises(RunNotFound) as info:
                await call
            assert info.value.code == Code.RUN_NOT_FOUND, rid
        assert await engine.status(rid) is None
        assert (await engine.retry(rid)).kind == "missing"


async def test_register_twice_and_after_listen(make_engine: Any) -> None:
    engine = await make_engine(echo_flow(), listen=False)
    with pytest.raises(IterflowError) as info:
        engine.register(echo_flow())
    assert info.value.code == Code.ENGINE_STATE
    engine.register(echo_flow(version=2))  # another version is fine
    await engine.listen()
    await engine.listen()  # idempotent
    with pytest.raises(IterflowError) as info:
        engine.register(echo_flow("late"))
    assert info.value.code == Code.ENGINE_STATE
    with pytest.raises(IterflowError) as info:
        engine.register("not a flow")  # type: ignore[arg-type]
    assert info.value.code == Code.INVALID_ARGUMENT


async def test_schema_mismatch_when_not_migrated(dsn: str, schema_name: str, core: str) -> None:
    engine = create_engine(dsn, schema=schema_name, core=core)
    handle = engine.register(echo_flow())
    try:
        with pytest.raises(SchemaMismatch) as info:
            await handle.start(1)
        assert info.value.code == Code.SCHEMA_MISMATCH
        assert "iterflow migrate" in info.value.message and schema_name in info.value.message
        with pytest.raises(SchemaMismatch):
            await engine.listen()
    finally:
        await engine.stop()
    await iterflow.migrate(dsn, schema_name)
    engine = create_engine(dsn, schema=schema_name, core=core)
    try:
        assert (await engine.handle("echo").start(1)).created
    finally:
        await engine.stop()


async def test_schema_mismatch_when_behind(dsn: str, schema_name: str, core: str) -> None:
    await iterflow.migrate(dsn, schema_name)
    await rows(dsn, f'DELETE FROM "{schema_name}".schema_version')
    engine = create_engine(dsn, schema=schema_name, core=core)
    try:
        with pytest.raises(SchemaMismatch) as info:
            await engine.handle("echo").start(1)
        assert info.value.code == Code.SCHEMA_MISMATCH and "migrate" in info.value.message
    finally:
        await engine.stop()
