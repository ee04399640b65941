"""Debounced starts (docs/guide.md, "Flow control"): starts with one key within the window
collapse into one run with the last input, which begins a window after the last of them; a
start after that run began makes a new run; the checks of the arguments."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest

import iterflow
from iterflow import define_flow
from iterflow.errors import InvalidArgument


def echo() -> iterflow.Flow:
    @define_flow("echo")
    async def body(ctx: iterflow.Context, data: Any) -> Any:
        return data

    return body


async def began_at(dsn: str, schema: str, run_id: str) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            f'SELECT status, attempts, input FROM "{schema}".runs WHERE id = %s', (run_id,))
        return await cur.fetchone()


async def test_starts_within_the_window_collapse_into_one_run_with_the_last_input(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    client = await make_engine(listen=False)
    handle = client.handle("echo")
    made = []
    for i in range(5):  # 5 starts in 0.5 s, each within 1 s of the one before
        made.append(await handle.start({"i": i}, key="k", debounce="1s"))
        last = time.monotonic()
        await asyncio.sleep(0.1)
    assert len({m.run_id for m in made}) == 1
    assert [m.created for m in made] == [True, False, False, False, False]
    assert all(m.status == "pending" for m in made)
    other = await handle.start({"other": True}, key="other", debounce="1s")
    assert other.created and other.run_id != made[0].run_id, "another key is another run"

    worker = await make_engine(echo())
    out = await handle.result(made[0].run_id, timeout=20)
    assert out == {"i": 4}, "the run has the last input"
    assert time.monotonic() - last >= 0.9, "it began a window after the last start (trailing edge)"
    assert await worker.handle("echo").result(other.run_id, timeout=20) == {"other": True}

    again = await handle.start({"i": 5}, key="k", debounce="0.2s")
    assert again.created and again.run_id != made[0].run_id, "a start after the run began is a new run"
    assert await handle.result(again.run_id, timeout=20) == {"i": 5}


async def test_a_debounced_start_repeated_after_its_commit_finds_its_own_run(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    client = await make_engine(listen=False)
    handle = client.handle("echo")
    spec = handle._spec(iterflow.StartSpec({"i": 1}))
    core = await client.client()
    first = await core.start_debounced(spec, "k", 5000)
    repeat = await core.start_debounced(spec, "k", 5000)
    assert first.created and repeat.created and first.run_id == repeat.run_id == spec.id
    status, attempts, data = await began_at(dsn, schema_name, spec.id)
    assert (status, attempts, data) == ("pending", 0, {"i": 1})


async def test_the_flows_key_function_is_the_debounce_key(make_engine: Any, dsn: str, schema_name: str) -> None:
    @define_flow("reindex", key=lambda data: data["doc"])
    async def reindex(ctx: iterflow.Context, data: Any) -> Any:
        return data

    engine = await make_engine(reindex, listen=False)
    handle = engine.handle("reindex")  # the registered flow's handle: it knows the key function
    first = await handle.start({"doc": "d1", "rev": 1}, debounce="5s")
    second = await handle.start({"doc": "d1", "rev": 2}, debounce="5s")
    other = await handle.start({"doc": "d2", "rev": 1}, debounce="5s")
    assert second.run_id == first.run_id and not second.created
    assert other.created and other.run_id != first.run_id
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            f'SELECT r.input, r.concurrency_key, q.concurrency_key FROM "{schema_name}".runs r '
            f'JOIN "{schema_name}".queue q ON q.run_id = r.id WHERE r.id = %s', (first.run_id,))
        assert await cur.fetchone() == ({"doc": "d1", "rev": 2}, "d1", "d1"), "keyed like any keyed run"


@pytest.mark.parametrize(("options", "field"), [
    ({"debounce": "1s"}, "key"),
    ({"key": "k", "debounce": "soon"}, "debounce"),
    ({"key": "", "debounce": "1s"}, "key"),
    ({"key": "k", "debounce": "1s", "idempotency_key": "i"}, "idempotency_key"),
    ({"key": "k", "debounce": "1s", "delay": "1s"}, "delay"),
])
async def test_bad_debounced_starts_are_refused_before_any_write(
    make_engine: Any, dsn: str, schema_name: str, options: dict[str, Any], field: str
) -> None:
    client = await make_engine(listen=False)
    with pytest.raises(InvalidArgument) as refused:
        await client.handle("echo").start({"i": 1}, **options)
    assert refused.value.field == field
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(f'SELECT count(*) FROM "{schema_name}".runs')
        assert await cur.fetchone() == (0,)
