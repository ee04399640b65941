"""The sticky cache: suspended runs kept alive in the worker that suspended them.

Without it every resume of a run claims its whole history and replays the body from the top,
so a run's cost grows with its length (a loop of 2,000 sleeps is quadratic). With it, a run
that suspends stays *held*: its body task is kept, blocked on its waits (``runner.Execution``,
``Context.hold``). When the wake-up comes back to this worker (its own timer, a signal sent or
a child finished in this process), the worker claims that one run by id (``Core.claim_run``)
with the lease token it suspended under as the expected value, and the body goes on from where
it stopped with only the records of its waits: no history load, no replay.

Anything else falls back to the normal claim and replay, exactly as without the cache: the
token does not match (another worker advanced the run), the entry was evicted, the process
restarted, the run was canceled. Dropping an entry unwinds its body without writing anything;
the durable suspension is untouched. Routing (docs/replay.md, "Sticky execution"): a held run's
``waiting`` carries ``sticky`` (owner, token, window), and other workers' claims leave it to its
owner until ``window`` after its wake-up.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from .observe import Hooks

# Default bounds of the cache (engine options sticky_cache, sticky_cache_bytes, sticky_window).
DEFAULT_RUNS = 1000
DEFAULT_BYTES = 64 * 1024 * 1024
DEFAULT_WINDOW_MS = 1000


class Held(Protocol):
    """What the cache needs of a held execution (``runner.Execution``)."""

    def drop(self) -> None: ...

    def footprint(self) -> int: ...


@dataclass(frozen=True)
class StickyHolder:
    """Who holds runs, and for how long after a wake-up other workers leave them alone."""

    owner: str
    window_ms: int

    def mark(self, lease_token: int) -> dict[str, Any]:
        """The ``waiting.sticky`` of a run held under ``lease_token`` (read by the claims)."""
        return {"owner": self.owner, "token": lease_token, "ms": self.window_ms}


class StickyCache:
    """Held executions by run id, least recently held evicted first, bounded by a count and
    by an estimate of their memory. What becomes of them is counted and reported to the
    ``sticky_cache`` metrics hook: ``hit`` (resumed by a claim by id: no history, no
    replay), ``adopted`` (a claim of this worker with the history got it first: no replay),
    ``stale`` (another worker advanced the run: it replays), ``evicted`` (over a bound),
    ``dropped`` (canceled here, the worker stopping)."""

    def __init__(self, max_runs: int, max_bytes: int, hooks: Hooks) -> None:
        self.max_runs = max_runs
        self.max_bytes = max_bytes
        self.hooks = hooks
        self._held: OrderedDict[str, tuple[Held, int]] = OrderedDict()
        self.bytes = 0
        self.counts = {"hit": 0, "adopted": 0, "stale": 0, "evicted": 0, "dropped": 0}

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
