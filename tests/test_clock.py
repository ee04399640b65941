"""The database clock estimate and the held runs' timers (clock.py, sticky.WakeTimers).

Readings are made up here: what is tested is the arithmetic (a reading is a lower bound; the
tightest of the last two windows wins) and the timers' use of it. That the estimate is never
ahead of a real server is tested against one in test_sticky.py.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest

from iterflow import clock as clock_module
from iterflow.clock import DbClock
from iterflow.sticky import WakeTimers

BASE = datetime(2026, 1, 1, tzinfo=UTC)


def test_no_reading_no_estimate() -> None:
    assert DbClock().now() is None


def test_the_tightest_reading_wins() -> None:
    clock = DbClock()
    at = time.monotonic()
    clock.observe(BASE, at)  # read at `at`: the database was at BASE (at least)
    clock.observe(BASE + timedelta(milliseconds=5), at + 0.001)  # 4 ms tighter
    clock.observe(BASE, at + 0.002)  # looser: ignored
    now = clock.now()
    assert now is not None
    expected = BASE + timedelta(milliseconds=5) + timedelta(seconds=time.monotonic() - (at + 0.001))
    assert abs((now - expected).total_seconds()) < 0.001


def test_a_window_forgets_its_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stepped server clock takes over after two windows: old readings do not win forever."""
    monkeypatch.setattr(clock_module, "WINDOW", 0.01)
    clock = DbClock()
    clock.observe(BASE + timedelta(hours=1))  # a server clock an hour ahead, then stepped back
    time.sleep(0.011)
    clock.observe(BASE)
    now = clock.now()
    assert now is not None and now > BASE + timedelta(minutes=59), "the previous window still counts"
    time.sleep(0.011)
    clock.observe(BASE)
    now = clock.now()
    assert now is not None and now < BASE + timedelta(seconds=1)


async def test_timers_fire_in_order_once_due_by_the_estimate() -> None:
    clock = DbClock()
    clock.observe(datetime.now(UTC))
    start = clock.now()
    assert start is not None
    woken: list[tuple[str, int, datetime]] = []
    timers = WakeTimers(clock, lambda run_id, token: woken.append((run_id, token, clock.now() or BASE)))
    for run_id, ms in (("c", 90), ("a", 30), ("b", 60)):
        timers.add(start + timedelta(milliseconds=ms), run_id, ms)
    assert len(timers) == 3
    await asyncio.sleep(0.2)
    assert [(r, t) for r, t, _ in woken] == [("a", 30), ("b", 60), ("c", 90)]
    for _, ms, at in woken:
        assert at >= start + timedelta(milliseconds=ms), "a timer fired before its time"
    assert len(timers) == 0


async def test_a_better_reading_brings_a_timer_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timer armed on a reading 200 ms behind the database fires on time once a tighter
    reading arrives: it re-arms every REARM seconds against the current estimate."""
    clock = DbClock()
    truth = datetime.now(UTC)
    clock.observe(truth - timedelta(milliseconds=200))  # a coarse first reading
    woken: list[float] = []
    timers = WakeTimers(clock, lambda run_id, token: woken.append(time.monotonic()))
    armed = time.monotonic()
    timers.add(truth + timedelta(milliseconds=100), "r", 1)
    clock.observe(truth)  # the tight one
    await asyncio.sleep(0.4)
    assert len(woken) == 1
    assert woken[0] - armed < 0.1 + 0.08, "fired on the coarse reading"


async def test_clear_drops_every_timer() -> None:
    clock = DbClock()
    clock.observe(datetime.now(UTC))
    woken: list[str] = []
    timers = WakeTimers(clock, lambda run_id, token: woken.append(run_id))
    timers.add((clock.now() or BASE) + timedelta(milliseconds=20), "r", 1)
    timers.clear()
    await asyncio.sleep(0.05)
    assert woken == [] and len(timers) == 0
