"""Cron (docs/operations.md §6): exactly-once occurrences across workers, DST, overlap, backfill, changes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from iterflow import define_flow
from iterflow.errors import InvalidArgument


@define_flow("tick")
async def tick_flow(ctx, inp):
    return inp


def _sql(dsn: str, statement: str, *params: object) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


async def _engines(make_engine, n: int, schedule: str, **cron_options):
    engines = []
    for _ in range(n):
        engine = await make_engine(listen=False)
        engine.define_cron("every", schedule, tick_flow, {"from": "cron"}, **cron_options)
        engines.append(engine)
    return engines


async def test_minute_cron_across_dst_fires_each_minute_once_with_three_workers(make_engine, dsn, schema_name):
    engines = await _engines(make_engine, 3, "* * * * *", timezone="America/New_York", overlap="allow")
    start = datetime(2026, 11, 1, 5, 58, tzinfo=UTC)  # 01:58 EDT; clocks fall back at 06:00 UTC
    await engines[0].fire_crons(start - timedelta(hours=1))  # registers the cron
    _sql(dsn, f'UPDATE "{schema_name}".crons SET next_fire_at = %s', start)
    for minute in range(66):
        now = start + timedelta(minutes=minute, seconds=1)
        await asyncio.gather(*(e.fire_crons(now) for e in engines))
    keys = [k for (k,) in _sql(dsn, f'SELECT idempotency_key FROM "{schema_name}".runs ORDER BY idempotency_key')]
    fires = sorted(datetime.fromisoformat(k.split(":", 2)[2]) for k in keys)
    assert len(fires) == len(set(fires)) == 66
    assert all(b - a == timedelta(minutes=1) for a, b in zip(fires, fires[1:], strict=False))
    tags = _sql(dsn, f'SELECT DISTINCT tags FROM "{schema_name}".runs')
    assert tags == [(["cron:every"],)]


async def test_started_but_not_advanced_is_not_started_twice(make_engine, dsn, schema_name):
    (engine,) = await _engines(make_engine, 1, "*/5 * * * *", overlap="allow")
    fire = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    await engine.fire_crons(fire - timedelta(days=1))
    _sql(dsn, f'UPDATE "{schema_name}".crons SET next_fire_at = %s', fire)
    # a worker started the occurrence's run and crashed before advancing the schedule
    await engine.handle("tick").start({"from": "cron"}, idempotency_key=f"cron:every:{fire.isoformat()}",
                                       tags=["cron:every"])
    assert await engine.fire_crons(fire + timedelta(seconds=30)) == 0
    assert _sql(dsn, f'SELECT count(*) FROM "{schema_name}".runs') == [(1,)]
    (nxt,) = _sql(dsn, f'SELECT next_fire_at FROM "{schema_name}".crons')[0]
    assert nxt == fire + timedelta(minutes=5)


async def test_overlap_skip_and_backfill(make_engine, dsn, schema_name):
    (skip,) = await _engines(make_engine, 1, "* * * * *")
    base = datetime(2026, 2, 1, 0, 0, tzinfo=UTC)
    await skip.fire_crons(base - timedelta(days=1))
    _sql(dsn, f'UPDATE "{schema_name}".crons SET next_fire_at = %s', base)
    assert await skip.fire_crons(base + timedelta(seconds=1)) == 1
    # the first run is still live (no worker): the next occurrence is skipped, not queued
    assert await skip.fire_crons(base + timedelta(minutes=1, seconds=1)) == 0
    (nxt,) = _sql(dsn, f'SELECT next_fire_at FROM "{schema_name}".crons')[0]
    assert nxt == base + timedelta(minutes=2)


async def test_missed_occurrences_coalesce_or_backfill(make_engine, dsn, schema_name):
    base = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)
    (coalesce,) = await _engines(make_engine, 1, "* * * * *", overlap="allow")
    await coalesce.fire_crons(base - timedelta(days=1))
    _sql(dsn, f'UPDATE "{schema_name}".crons SET next_fire_at = %s', base)
    assert await coalesce.fire_crons(base + timedelta(minutes=10, seconds=5)) == 1
    _sql(dsn, f'DELETE FROM "{schema_name}".runs')
    _sql(dsn, f'DELETE FROM "{schema_name}".crons')
    backfiller = await make_engine(listen=False)
    backfiller.define_cron("every", "* * * * *", tick_flow, None, overlap="allow", backfill="5m")
    await backfiller.fire_crons(base - timedelta(days=1))
    _sql(dsn, f'UPDATE "{schema_name}".crons SET next_fire_at = %s', base)
    # 10 minutes missed, the window keeps the last 5 (plus the one at the window's edge)
    created = await backfiller.fire_crons(base + timedelta(minutes=10))
    assert created == 6


async def test_cron_fires_for_real_and_runs(make_engine):
    engine = await make_engine(tick_flow, listen=False)
    engine.define_cron("secondly", "* * * * * *", tick_flow, {"n": 1}, overlap="allow")
    await engine.listen()
    for _ in range(100):
        page = await engine.list_runs(tag="cron:secondly", status="done")
        if page.runs:
            break
        await asyncio.sleep(0.05)
    assert page.runs and page.runs[0].name == "tick"


async def test_changed_schedule_takes_effect_and_removed_cron_is_listed(make_engine, dsn, schema_name):
    (first,) = await _engines(make_engine, 1, "0 0 1 1 *")
    await first.fire_crons()
    (before,) = _sql(dsn, f'SELECT next_fire_at FROM "{schema_name}".crons')[0]
    (second,) = await _engines(make_engine, 1, "*/10 * * * *")
    await second.fire_crons()
    (after,) = _sql(dsn, f'SELECT next_fire_at FROM "{schema_name}".crons')[0]
    assert after < before and after.minute % 10 == 0
    third = await make_engine(listen=False)
    listed = await third.list_crons()
    assert [(c["name"], c["defined_here"]) for c in listed] == [("every", False)]
    assert await third.remove_cron("every") is True
    assert await third.list_crons() == []


async def test_bad_definitions_rejected(make_engine):
    engine = await make_engine(listen=False)
    for kwargs, field in (
        ({"schedule": "every minute"}, "schedule"),
        ({"schedule": "61 * * * *"}, "schedule"),
        ({"schedule": "* * * * *", "timezone": "Mars/Olympus"}, "timezone"),
        ({"schedule": "* * * * *", "overlap": "sometimes"}, "overlap"),
        ({"schedule": "* * * * *", "jitter": "soon"}, "jitter"),
    ):
        with pytest.raises(InvalidArgument) as info:
            engine.define_cron("bad", flow=tick_flow, input=None, **kwargs)
        assert info.value.field == field
