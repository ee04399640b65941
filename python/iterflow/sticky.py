"""The sticky cache: suspended runs kept alive in the worker that suspended them.

Without it every resume of a run claims its whole history and replays the body from the top,
so a run's cost grows with its length (a loop of 2,000 sleeps is quadratic). With it, a run
that suspends stays *held*: its body task is kept, blocked on its waits (``runner.Execution``,
``Context.hold``). When the wake-up comes back to this worker (its own timer, a signal sent or
a child finished in this process, a wake-up another process announced), the worker claims the
run by id (``Core.claim_runs``, ``Core.claim_woken``) with the lease token it suspended under
as the expected value, and the body goes on from where it stopped with only the records of its
waits: no history load, no replay.

Anything else falls back to the normal claim and replay, exactly as without the cache: the
token does not match (another worker advanced the run), the entry was evicted, the process
restarted, the run was canceled. Dropping an entry unwinds its body without writing anything;
the durable suspension is untouched. Routing (docs/replay.md, "Sticky execution"): a held run's
``waiting`` carries ``sticky`` (owner, token, window, the keys of its waits), and other workers' claims leave it to its
owner until ``window`` after its wake-up.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from .clock import DbClock
from .observe import Hooks

# Default bounds of the cache (engine options sticky_cache, sticky_cache_bytes, sticky_window).
DEFAULT_RUNS = 1000
DEFAULT_BYTES = 64 * 1024 * 1024
DEFAULT_WINDOW_MS = 1000
# Shortest lease a handoff grants (sticky window 0 means "no wait for others", not "no lease").
MIN_HAND_MS = 500
# Longest a held run's timer sleeps before it looks at the database clock estimate again: the
# estimate improves as claims come back (clock.py), and a timer armed on an early, coarse one
# would otherwise fire late by the difference.
REARM = 0.05


class Held(Protocol):
    """What the cache needs of a held execution (``runner.Execution``)."""

    def drop(self) -> None: ...

    def footprint(self) -> int: ...


@dataclass(frozen=True)
class StickyHolder:
    """Who holds runs, for how long after a wake-up other workers leave them alone, and
    whether the transaction that wakes one may hand it over at once (``hand_off``: only a
    worker that listens hears the ``H`` notice that says so)."""

    owner: str
    window_ms: int
    hand_off: bool = True

    def mark(self, lease_token: int, keys: list[str]) -> dict[str, Any]:
        """The ``waiting.sticky`` of a run held under ``lease_token`` whose body is blocked on
        the waits of cursor keys ``keys`` (read by the claims: a claim by id returns the
        records of these keys, and nothing else of the history). With ``hand``, wake_run
        leases the run to this worker for that many ms and sends it the claim (migration
        0014); the worker extends the lease as it resumes the body."""
        mark: dict[str, Any] = {"owner": self.owner, "token": lease_token, "ms": self.window_ms, "keys": keys}
        if self.hand_off:
            mark["hand"] = self.hand_ms
        return mark

    @property
    def hand_ms(self) -> int:
        """The lease a handoff grants: the window, but never so short that the holder could
        not extend it before it runs out."""
        return max(self.window_ms, MIN_HAND_MS)


class StickyCache:
    """Held executions by run id, least recently held evicted first, bounded by a count and
    by an estimate of their memory. What becomes of them is counted and reported to the
    ``sticky_cache`` metrics hook: ``hit`` (resumed by a claim by id: no history, no
    replay), ``handed`` (of the hits, those whose claim the transaction that woke the run
    made: migration 0014), ``adopted`` (a claim of this worker with the history got it first: no replay),
    ``stale`` (another worker advanced the run: it replays), ``evicted`` (over a bound),
    ``dropped`` (canceled here, the worker stopping)."""

    def __init__(self, max_runs: int, max_bytes: int, hooks: Hooks) -> None:
        self.max_runs = max_runs
        self.max_bytes = max_bytes
        self.hooks = hooks
        self._held: OrderedDict[str, tuple[Held, int]] = OrderedDict()
        self.bytes = 0
        self.counts = {"hit": 0, "handed": 0, "adopted": 0, "stale": 0, "evicted": 0, "dropped": 0}

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._held

    def put(self, run_id: str, held: Held) -> None:
        """Keep ``held``; evict (unwind) the least recently held ones beyond the bounds."""
        old = self._held.pop(run_id, None)
        if old is not None:
            self.bytes -= old[1]
            if old[0] is not held:
                old[0].drop()
                self.count("dropped")
        size = held.footprint()
        self._held[run_id] = (held, size)
        self.bytes += size
        while self._held and (len(self._held) > self.max_runs or self.bytes > self.max_bytes):
            oldest = next(iter(self._held))
            self.discard(oldest, "evicted")

    def get(self, run_id: str) -> Held | None:
        entry = self._held.get(run_id)
        return entry[0] if entry is not None else None

    def take(self, run_id: str) -> Held | None:
        """Remove and return the held execution of ``run_id`` (to resume it), or None."""
        entry = self._held.pop(run_id, None)
        if entry is None:
            return None
        self.bytes -= entry[1]
        return entry[0]

    def discard(self, run_id: str, why: str = "dropped") -> bool:
        """Unwind the held execution of ``run_id``, if any: it will not go on here."""
        entry = self._held.pop(run_id, None)
        if entry is None:
            return False
        self.bytes -= entry[1]
        entry[0].drop()
        self.count(why)
        return True

    def clear(self) -> list[tuple[str, Held]]:
        """Drop every held execution; returns them by run id (to hand them back)."""
        held = [(run_id, entry[0]) for run_id, entry in self._held.items()]
        for run_id, _ in held:
            self.discard(run_id)
        return held

    def count(self, what: str) -> None:
        self.counts[what] += 1
        self.hooks.emit("sticky_cache", what)


class WakeTimers:
    """When the held runs wake up, in the database's time, on one timer of the event loop.

    A held run's wait ends at a time pinned in the database (a sleep's deadline, a backoff, a
    signal timeout), and the claim by id finds it due only once the database's ``now()`` has
    passed it. Each timer is therefore armed against ``DbClock`` (a lower bound of the
    database's time: a run it calls due is due) and re-armed at least every ``REARM`` seconds,
    so that a better estimate, read from a later claim, moves it forward. One timer for every
    held run: the earliest is armed, and all that are due when it fires wake together.
    """

    def __init__(self, clock: DbClock, wake: Callable[[str, int], None]) -> None:
        self.clock = clock
        self.wake = wake  # (run id, lease token it was held under): the worker's wake_held
        self._due: list[tuple[datetime, str, int]] = []
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, when: datetime, run_id: str, token: int) -> None:
        """Wake ``run_id`` (held under ``token``) once the database's time reaches ``when``; an
        entry whose run is no longer held that way is ignored by ``wake`` when it comes."""
        heapq.heappush(self._due, (when, run_id, token))
        if self._due[0][1] == run_id:
            self._arm()

    def clear(self) -> None:
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self.clock.now()
        if not self._due or now is None:
            return
        delay = (self._due[0][0] - now).total_seconds()
        self._timer = asyncio.get_running_loop().call_later(min(max(delay, 0.0), REARM), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self.clock.now()
        if now is not None:
            while self._due and self._due[0][0] <= now:
                _, run_id, token = heapq.heappop(self._due)
                self.wake(run_id, token)
        self._arm()
