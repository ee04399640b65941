"""Every ``result()`` and ``wait()`` of a process waits on one collector, not on its own poll.

A waiter registers a run id and sleeps on a future. One collector task per engine and event
loop does all the database work for all of them (docs/architecture.md, "Waiting for runs"):

- **Batched reads.** Runs registered in the same loop turn, and runs announced by the same
  drain of the change log, are read in one ``wait_runs`` statement (``id = ANY``), chunked at
  :data:`READ_CHUNK` ids; terminal rows resolve their waiters, the rest keep waiting.
- **Wake-ups, not polls.** The core's change log (the process's one LISTEN connection, plus
  runs this process finished itself) names the runs that may have changed; the collector
  reads only those.
- **A safety read.** Notifications are hints: one lost (a crash between a commit and its
  relay) would strand a waiter. So every run waited for is re-read once per safety interval,
  in one batched read for all of them; the interval grows with the number of waiters
  (:func:`safety_interval`), so 50,000 waiters cost the server one statement every few seconds.
  A listener that reconnected asks for the same full read at once; without a LISTEN
  connection the full read runs on the short :data:`POLL` interval instead.

Progress waiters (``wait(step=|signal=)``) ride on the same log: a watched run announces a
finished step or an arrived signal as ``p <run id>`` (docs/signals.md), and the waiter then
re-reads its run's detail itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any

from .cores.base import ChangedRuns, Core
from .errors import EngineStateError, IterflowError
from .types import TERMINAL

log = logging.getLogger("iterflow")

# Longest wait on the change log in one call: bounds how late a new registration or the
# safety read can be noticed when nothing else happens.
SAFETY = 2.0
# The full read's interval when the core has no LISTEN connection (notify=False, or the
# listener is reconnecting): then only this process's own finishes announce themselves.
POLL = 0.25
# The safety interval grows by a second per this many waiters (one batched statement
# re-reads them all; this keeps its cost per second roughly flat).
WAITERS_PER_SECOND = 25_000
# Most ids in one wait_runs statement.
READ_CHUNK = 5_000


def safety_interval(waiters: int, listening: bool) -> float:
    """Seconds between full reads of every waited-for run."""
    base = SAFETY if listening else POLL
    return base + waiters / WAITERS_PER_SECOND


class Progress:
    """A progress waiter's wake-up flag: set whenever its run may have changed."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def next(self, timeout: float) -> None:
        """Return once the run may have changed since the last call (or after ``timeout``)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()


class RunWaiters:
    """The waiters of one engine on one event loop, and their collector task."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._terminal: dict[str, set[asyncio.Future[dict[str, Any] | None]]] = {}
        self._progress: dict[str, set[Progress]] = {}
        self._fresh: set[str] = set()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._changes: asyncio.Task[ChangedRuns] | None = None
        self._listening = True
        self._last_full = time.monotonic()
        self.status: dict[str, str] = {}  # the last status seen of each waited-for run
        self.reads = 0  # wait_runs statements sent (tests and benchmarks)

    def __len__(self) -> int:
        return len(self._terminal) + len(self._progress)

    async def terminal(self, run_id: str, timeout: float | None) -> dict[str, Any] | None:
        """The run's ``wait_runs`` row once it is terminal; None when there is no such run.

        ``TimeoutError`` after ``timeout`` seconds; a database fault the retry layer gave up
        on is raised to every waiter whose read failed.
        """
        fut: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._terminal.setdefault(run_id, set()).add(fut)
        self._fresh.add(run_id)
        self._kick_collector()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            status = self.status.get(run_id)
            if status is None:  # not read since it registered (a zero timeout, say): look once
                (row,) = await self._core.wait_runs([run_id])
                if row["status"] is None or row["status"] in TERMINAL:
                    return None if row["status"] is None else row
                status = row["status"]
            raise TimeoutError(f"run {run_id} is still {status} after {timeout}s") from None
        finally:
            self._drop(self._terminal, run_id, fut)
            if run_id not in self._terminal:
                self.status.pop(run_id, None)

    @contextlib.asynccontextmanager
    async def progress(self, run_id: str) -> AsyncIterator[Progress]:
        """Registered before the caller's first read, so no change after that read is missed."""
        waiter = Progress()
        self._progress.setdefault(run_id, set()).add(waiter)
        self._kick_collector()
        try:
            yield waiter
        finally:
            self._drop(self._progress, run_id, waiter)

    @staticmethod
    def _drop(table: dict[str, set[Any]], run_id: str, item: Any) -> None:
        entries = table.get(run_id)
        if entries is not None:
            entries.discard(item)
            if not entries:
                del table[run_id]

    def _kick_collector(self) -> None:
        self._kick.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="iterflow-waiters")

    async def close(self) -> None:
        """Stop the collector; a ``result()`` still waiting raises ``ENGINE_STATE`` (nothing
        would ever resolve it), a ``wait()`` wakes and fails on its next read."""
        for task in (self._changes, self._task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        stopped = EngineStateError("the engine stopped while this waited for the run")
        for futures in self._terminal.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(stopped)
        self._wake_progress(list(self._progress))

    # -- the collector ---------------------------------------------------------------------
    async def _collect(self) -> None:
        try:
            while self:
                await self._turn()
        finally:
            if self._changes is not None and not self._changes.done():
                self._changes.cancel()
            self._changes = None

    async def _turn(self) -> None:
        """One loop turn: read new registrations, then what changed, or sleep until something
        may have. New ones are read before the change log is consulted (which opens the LISTEN
        connection): a process whose runs had all ended by then never listens. Changes in
        between are not lost: the listener's first connect asks for a full read."""
        fresh, self._fresh = self._fresh, set()
        if fresh:
            await self._read(fresh & self._terminal.keys())
            if not self:
                return
        changed, everything = self._take_changes()
        full = everything or time.monotonic() - self._last_full >= safety_interval(len(self), self._listening)
        if full:
            self._last_full = time.monotonic()
            changed = set(self._terminal) | set(self._progress)
        self._wake_progress(changed)
        await self._read(changed & self._terminal.keys())
        if not full and not fresh and not changed:
            await self._sleep()

    def _take_changes(self) -> tuple[set[str], bool]:
        if self._changes is None:
            wait = safety_interval(len(self), self._listening)
            self._changes = asyncio.get_running_loop().create_task(self._core.changed_runs(wait))
            return set(), False
        if not self._changes.done():
            return set(), False
        task, self._changes = self._changes, None
        try:
            changed = task.result()
        except IterflowError as exc:
            log.warning("iterflow: waiting for run changes failed (%s); reading every waited-for run", exc)
            return set(), True
        self._listening = changed.listening
        return set(changed.run_ids), changed.everything

    async def _sleep(self) -> None:
        """Until the change log answers, a new waiter registers, or the safety read is due."""
        self._kick.clear()
        if self._fresh or self._changes is None or self._changes.done():
            return
        due = self._last_full + safety_interval(len(self), self._listening) - time.monotonic()
        kick = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait({self._changes, kick}, timeout=max(due, 0.0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            kick.cancel()

    def _wake_progress(self, changed: Iterable[str]) -> None:
        for run_id in changed:
            for waiter in self._progress.get(run_id, ()):
                waiter.event.set()

    async def _read(self, run_ids: set[str]) -> None:
        ids = sorted(run_ids)
        for start in range(0, len(ids), READ_CHUNK):
            chunk = ids[start:start + READ_CHUNK]
            try:
                rows = await self._core.wait_runs(chunk)
            except IterflowError as exc:
                self._fail(chunk, exc)
                continue
            self.reads += 1
            self._resolve(rows)

    def _resolve(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            run_id = str(row["id"])
            status = row["status"]
            if status is not None and status not in TERMINAL:
                self.status[run_id] = status
                continue
            self.status.pop(run_id, None)
            for fut in self._terminal.pop(run_id, ()):
                if not fut.done():
                    fut.set_result(None if status is None else row)

    def _fail(self, run_ids: list[str], exc: IterflowError) -> None:
        for run_id in run_ids:
            for fut in self._terminal.pop(run_id, ()):
                if not fut.done():
                    fut.set_exception(exc)


class WaiterRegistry:
    """One :class:`RunWaiters` per event loop an engine is used from (a collector task and
    its futures belong to one loop)."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RunWaiters] = weakref.WeakKeyDictionary()

    def here(self, core: Core) -> RunWaiters:
        loop = asyncio.get_running_loop()
        waiters = self._by_loop.get(loop)
        if waiters is None:
            waiters = self._by_loop[loop] = RunWaiters(core)
        return waiters

    async def close(self) -> None:
        """Stop the collector of the running loop (others end with their loops)."""
        with contextlib.suppress(RuntimeError):
            waiters = self._by_loop.pop(asyncio.get_running_loop(), None)
            if waiters is not None:
                await waiters.close()
