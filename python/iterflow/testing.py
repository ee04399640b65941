"""``Harness``: test flows that sleep for days in milliseconds, on a real engine and database.

Time is virtual in one direction only: ``advance(d)`` moves every pending deadline (sleeps,
retry backoffs, signal timeouts, cron fires) ``d`` closer, exactly as if ``d`` had passed, so
the real engine, the real SQL and either core do the rest. Time never goes backwards; real time
keeps flowing underneath, so a short real sleep still elapses on its own.

When a run cannot move on without outside help, ``settle`` says why and what to do, instead
of hanging until a timeout.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

from .durations import DurationLike, parse_duration
from .engine import Engine
from .handle import FlowHandle
from .types import TERMINAL, RunDetail


class Stalled(AssertionError):
    """The run waits for something only the test can provide (a signal, an unfinished child)."""


class Harness:
    def __init__(self, engine: Engine, *, timeout: float = 30.0) -> None:
        self.engine = engine
        self.timeout = timeout
        self._advanced = timedelta(0)

    async def __aenter__(self) -> Harness:
        await self.engine.listen()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.engine.stop()

    def now(self) -> datetime:
        """Virtual now: real time plus everything advanced so far."""
        return datetime.now(UTC) + self._advanced

    async def advance(self, duration: DurationLike) -> None:
        """Let ``duration`` pass for every timer, then run what became due until idle."""
        delta = parse_duration(duration, field="duration")
        core = await self.engine.client()
        await core.admin_query("shift_time", int(delta.total_seconds() * 1000))
        self._advanced += delta
        await self.engine.fire_crons()
        self._nudge_worker()
        await self.drain()

    async def advance_to_next_wake(self) -> timedelta | None:
        """Jump to the earliest pending timer or cron; returns how far, None if nothing is scheduled."""
        core = await self.engine.client()
        (row,) = await core.admin_query("next_wake")
        wait: timedelta | None = row["wait"]
        if wait is None:
            return None
        step = max(wait, timedelta(0)) + timedelta(milliseconds=1)
        await self.advance(step)
        return step

    async def drain(self) -> None:
        """Return when nothing is claimable and nothing is executing (twice in a row)."""
        deadline = time.monotonic() + self.timeout
        quiet = 0
        while quiet < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"work did not drain within {self.timeout}s")
            busy = self.engine.health()["active_runs"] or await self.engine.pending_work()
            quiet = 0 if busy else quiet + 1
            self._nudge_worker()
            await asyncio.sleep(0.005)

    async def settle(self, handle: FlowHandle, run_id: str) -> Any:
        """Drive the run to its end, jumping over timers; returns ``handle.result(run_id)``.

        Raises ``Stalled`` with the fix when the run waits for something only the test can give.
        A run that continued as new is settled with its chain: the chain's result is returned.
        """
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            await self.drain()
            detail = await self.engine.status(run_id)
            if detail is None:
                raise Stalled(f"run {run_id} does not exist")
            if detail.run.continued_to is not None:  # settle the chain's next run (its timers too)
                run_id = detail.run.continued_to
                continue
            if detail.run.status in TERMINAL:
                return await handle.result(run_id, timeout=self.timeout)
            if detail.run.status in ("pending", "running"):
                continue
            if not self._has_timer(detail) or await self.advance_to_next_wake() is None:
                raise Stalled(_explain(detail))
        raise TimeoutError(f"run {run_id} did not settle within {self.timeout}s")

    @staticmethod
    def _has_timer(detail: RunDetail) -> bool:
        return any(t.get("ready_at") or t.get("deadline") for t in detail.timers)

    def _nudge_worker(self) -> None:
        worker = self.engine._worker
        if worker is not None:
            worker.nudge()


def _explain(detail: RunDetail) -> str:
    run, waiting = detail.run, detail.run.waiting
    head = f"run {run.run_id} ({run.name}@{run.version}) is {run.status}"
    if waiting is None:
        return head
    if waiting.kind == "signal":
        return (f"{head}: waiting for signal {waiting.name!r} — deliver it with "
                f"engine.signal({run.run_id!r}, {waiting.name!r}, payload)")
    if waiting.kind == "child":
        return (f"{head}: waiting for child run {waiting.child_id}, which cannot finish on its own "
                "(is its flow registered on this engine?)")
    if waiting.kind == "parked":
        return f"{head}: {waiting} — register a body for this name@version that fits the history"
    return f"{head}: {waiting}"
