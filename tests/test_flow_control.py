"""Flow control across a fleet (docs/guide.md, "Flow control"): per-flow and per-key
concurrency enforced by the claim, places given back by a killed worker, fair claims among
keys, and the checks on the options. The fleet is three real worker processes
(``tests/workers/limits_worker.py``) on one database; each step notes its interval, with the
database's clock, in a side table, and the tests check the overlaps."""

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
from tests.processes import WorkerProcesses as Fleet

import iterflow
from iterflow import define_flow, flow
from iterflow.errors import InvalidArgument


@pytest.fixture
def fleet(dsn: str, schema_name: str, core: str, tmp_path: Path) -> Iterator[Fleet]:
    asyncio.run(iterflow.migrate(dsn, schema_name))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f'CREATE TABLE "{schema_name}".intervals (id bigserial PRIMARY KEY, run_id uuid, flow text, key text,'
            " worker text, began timestamptz, ended timestamptz)"
        )
    f = Fleet("limits_worker.py", dsn, schema_name, core, tmp_path)
    yield f
    f.cleanup()


def _start(dsn: str, schema: str, name: str, inputs: list[Any]) -> list[str]:
    async def go() -> list[str]:
        engine = iterflow.create_engine(dsn, schema=schema, core="python")
        try:
            made = await engine.handle(name).start_many([{"input": i, "key": i.get("k")} for i in inputs])
            return [m.run_id for m in made]
        finally:
            await engine.stop()
    return asyncio.run(go())


def _wait_done(dsn: str, schema: str, ids: list[str], fleet: Fleet, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                f'SELECT count(*) FROM "{schema}".runs WHERE id = ANY (%s::uuid[]) AND status = %s', (ids, "done")
            ).fetchone()
            if row is not None and row[0] == len(ids):
                return
            time.sleep(0.1)
    raise AssertionError(f"runs not done in {timeout}s\n{fleet.output()}")


def _intervals(dsn: str, schema: str, name: str) -> list[tuple[str | None, datetime, datetime]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            f'SELECT key, began, ended FROM "{schema}".intervals WHERE flow = %s AND ended IS NOT NULL', (name,)
        ).fetchall()
    return [(k, b, e) for k, b, e in rows]


def _most_at_once(intervals: list[tuple[str | None, datetime, datetime]]) -> int:
    """The largest number of intervals open at one instant (an end before a start at a tie)."""
    edges = sorted([(b, 1) for _, b, _ in intervals] + [(e, -1) for _, _, e in intervals], key=lambda x: (x[0], x[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_a_flow_runs_at_most_its_concurrency_across_the_fleet(fleet: Fleet, dsn: str, schema_name: str) -> None:
    for label in "ABC":
        fleet.start(label, "--hold", "0.3", "--concurrency", "5")
    ids = _start(dsn, schema_name, "capped", [{"n": i} for i in range(12)])
    _wait_done(dsn, schema_name, ids, fleet)
    spans = _intervals(dsn, schema_name, "capped")
    assert len(spans) == 12
    assert _most_at_once(spans) == 2, "the fleet ran more (or fewer) than 2 capped runs at once"


def test_a_key_runs_at_most_its_key_concurrency(fleet: Fleet, dsn: str, schema_name: str) -> None:
    for label in "ABC":
        fleet.start(label, "--hold", "0.2", "--concurrency", "5")
    ids = _start(dsn, schema_name, "per-key", [{"k": k, "n": i} for i in range(5) for k in ("a", "b", "c")])
    _wait_done(dsn, schema_name, ids, fleet)
    spans = _intervals(dsn, schema_name, "per-key")
    assert len(spans) == 15
    for key in "abc":
        assert _most_at_once([s for s in spans if s[0] == key]) == 1, f"key {key} ran twice at once"
    assert _most_at_once(spans) >= 2, "different keys never ran side by side"


def test_a_killed_workers_places_come_back(fleet: Fleet, dsn: str, schema_name: str) -> None:
    holder = fleet.start("dead", "--block", "--concurrency", "5")
    ids = _start(dsn, schema_name, "capped", [{"n": i} for i in range(6)])
    with psycopg.connect(dsn, autocommit=True) as conn:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = conn.execute(f'SELECT count(*) FROM "{schema_name}".intervals').fetchone()
            if row is not None and row[0] == 2:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the first worker never took both places\n{fleet.output()}")
    time.sleep(0.5)  # it holds both places and may not take a third
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{schema_name}".intervals').fetchone()
    assert row is not None and row[0] == 2
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    for label in "BC":
        fleet.start(label, "--hold", "0.1")
    _wait_done(dsn, schema_name, ids, fleet)
    spans = _intervals(dsn, schema_name, "capped")
    assert _most_at_once(spans) <= 2


def test_claims_rotate_among_keys(fleet: Fleet, dsn: str, schema_name: str) -> None:
    """One key with 5,000 queued runs, nine with 10 each, queued after it: the nine finish
    before the big key is 20% done."""
    big = _start(dsn, schema_name, "keyed", [{"k": "big", "n": i} for i in range(5000)])
    small = _start(dsn, schema_name, "keyed", [{"k": f"small-{j}", "n": i} for j in range(9) for i in range(10)])
    for label in "ABC":
        fleet.start(label, "--hold", "0", "--concurrency", "4")
    _wait_done(dsn, schema_name, small, fleet, timeout=120)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            f'SELECT count(*) FROM "{schema_name}".runs WHERE id = ANY (%s::uuid[]) AND status = %s', (big, "done")
        ).fetchone()
    assert row is not None
    assert row[0] < 1000, f"the big key had {row[0]} of 5,000 runs done before the nine small keys finished"


async def test_a_freed_place_is_announced(make_engine: Any) -> None:
    """In process: a capped flow's runs all finish, one at a time, and its worker is told at
    once when a place frees (no wait for the 10 s poll interval)."""

    @define_flow("one-at-a-time", concurrency=1)
    async def body(ctx: iterflow.Context, n: int) -> int:
        async def work() -> None:
            await asyncio.sleep(0.05)

        await ctx.step("work", work)
        return n

    engine = await make_engine(concurrency=8, poll_interval="10s", listen=False)
    handle = engine.register(body)
    await engine.listen()
    started = time.monotonic()
    runs = [r.run_id for r in await handle.start_many([{"input": n} for n in range(5)])]
    assert [await handle.result(r, timeout=20) for r in runs] == list(range(5))
    assert time.monotonic() - started < 8, "a freed place waited for the poll interval"


@pytest.mark.parametrize(("options", "field"), [
    ({"concurrency": 0}, "concurrency"),
    ({"concurrency": True}, "concurrency"),
    ({"key_concurrency": "3"}, "key_concurrency"),
    ({"key": "tenant"}, "key"),
])
def test_bad_limits_are_refused_naming_the_option(options: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        define_flow("bad", **options)
    assert err.value.field == field
    with pytest.raises(InvalidArgument) as err:
        builder = flow("bad")
        getattr(builder, field)(options[field])
    assert err.value.field == field


async def test_a_bad_key_is_refused_and_nothing_is_written(make_engine: Any, dsn: str, schema_name: str) -> None:
    @define_flow("keyed-input", key=lambda v: v["tenant"])
    async def body(ctx: iterflow.Context, v: Any) -> Any:
        return v

    engine = await make_engine(listen=False)
    handle = engine.register(body)
    with pytest.raises(InvalidArgument) as err:
        await handle.start({"no tenant": 1})
    assert err.value.field == "key"
    with pytest.raises(InvalidArgument) as err:
        await handle.start_many([{"input": {"tenant": "a"}}, {"input": {"tenant": "b"}, "key": ""}])
    assert err.value.field == "items[1].key"
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{schema_name}".runs').fetchone()
    assert row is not None and row[0] == 0
    made = await handle.start({"tenant": "acme"})
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            f'SELECT r.concurrency_key, q.concurrency_key FROM "{schema_name}".runs r'
            f' JOIN "{schema_name}".queue q ON q.run_id = r.id WHERE r.id = %s', (made.run_id,)).fetchone()
    assert row == ("acme", "acme")


async def test_explain_names_the_limit_a_ready_run_waits_for(make_engine: Any) -> None:
    gate = asyncio.Event()

    @define_flow("held", concurrency=1)
    async def held(ctx: iterflow.Context, _: Any) -> None:
        await ctx.step("hold", gate.wait)

    @define_flow("held-per-key", key=lambda v: v["k"], key_concurrency=1)
    async def per_key(ctx: iterflow.Context, _: Any) -> None:
        await ctx.step("hold", gate.wait)

    engine = await make_engine(concurrency=8, listen=False)
    capped, keyed = engine.register(held), engine.register(per_key)
    await engine.listen()
    first, second = [r.run_id for r in await capped.start_many([{"input": 1}, {"input": 2}])]
    a1, a2, b1 = [r.run_id for r in await keyed.start_many([{"input": {"k": "a"}}] * 2 + [{"input": {"k": "b"}}])]

    async def kinds(run_id: str) -> list[str]:
        return [r.kind for r in (await engine.explain(run_id)).reasons]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leased = [rid for rid in (first, second, a1, a2, b1) if "leased" in await kinds(rid)]
        if len(leased) == 3:
            break
        await asyncio.sleep(0.05)
    waiting = {first, second, a1, a2} - set(leased)
    assert len(waiting) == 2 and b1 in leased, leased
    (capped_wait,) = waiting & {first, second}
    (key_wait,) = waiting & {a1, a2}
    reasons = (await engine.explain(capped_wait)).reasons
    assert [r.kind for r in reasons] == ["flow_limit"]
    assert reasons[0].details == {"limit": 1, "running": 1}
    # status() names it too: the queued run's waiting is the limit, not just "queued"
    waiting = (await engine.status(capped_wait)).run.waiting
    assert waiting is not None and waiting.kind == "limit" and waiting.name == "flow_limit"
    assert str(waiting).startswith("queued for a place: 1 runs of held execute now")
    assert (await engine.status(b1)).run.waiting.kind == "running"
    reasons = (await engine.explain(key_wait)).reasons
    assert [r.kind for r in reasons] == ["key_limit"]
    assert reasons[0].details == {"key": "a", "limit": 1, "running": 1}
    waiting = (await engine.status(key_wait)).run.waiting
    assert waiting is not None and waiting.kind == "limit" and waiting.name == "key_limit"
    gate.set()
    for rid in (first, second, a1, a2, b1):
        await engine.handle("held" if rid in (first, second) else "held-per-key").result(rid, timeout=20)
