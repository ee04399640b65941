"""``DbClock``: the database's clock, as this process can read it without asking.

Deadlines (sleeps, backoffs, signal timeouts) are pinned and compared in the database's time,
because that is the clock every worker and every claim agrees on. A body needs that time
between statements (to pin ``sleep("1s")``, to arm the local timer of a suspended run), so it
estimates it: a claim's ``now()`` (``db_now``, the start of the claim's transaction) plus the
local monotonic time elapsed since.

Which elapsed time matters. The claim's transaction started somewhere between the moment the
claim was sent and the moment its answer was read here; counting from the answer gives a time
that is never ahead of the database's (a sleep never ends early), but behind it by everything
between the transaction's start and the answer: queueing for a pooled connection, the
statement itself, a batch of 500 runs being decoded, the event loop's backlog. Counted per run,
that lag is the lateness of every local timer the run arms (docs/replay.md, "Sticky
execution"), tens of milliseconds under load. So the readings of every claim are pooled here:
each one bounds the database's time from below, the tightest bound of the last two windows wins,
and the estimate lags the database by the fastest recent answer only. Windows let a stepped or
drifting server clock take over within ``WINDOW`` seconds.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

# Seconds one window of readings lasts; the estimate uses the current and the previous one.
WINDOW = 30.0


class DbClock:
    """The tightest recent lower bound of the database's time (the module docstring says why)."""

    def __init__(self) -> None:
        # per window: (offset, db_now, monotonic time of the reading); offset = how far the
        # database's time is ahead of the local monotonic clock, by that reading
        self._current: tuple[float, datetime, float] | None = None
        self._previous: tuple[float, datetime, float] | None = None
        self._window_start = time.monotonic()

    def observe(self, db_now: datetime, read_at: float | None = None) -> None:
        """A database time ``db_now`` that was already past when this process read it at local
        monotonic ``read_at`` (default: now)."""
        at = time.monotonic() if read_at is None else read_at
        if at - self._window_start >= WINDOW:
            self._previous, self._current = self._current, None
            self._window_start = at
        offset = db_now.timestamp() - at
        if self._current is None or offset > self._current[0]:
            self._current = (offset, db_now, at)

    def now(self) -> datetime | None:
        """The estimate of the database's time now (never ahead of it), None before any reading."""
        best = max((r for r in (self._current, self._previous) if r is not None), default=None,
                   key=lambda r: r[0])
        if best is None:
            return None
        _, db_now, at = best
        return db_now + timedelta(seconds=time.monotonic() - at)
