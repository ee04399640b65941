"""The one place that decides whether a failure is infrastructure or the user's.

A database or network fault (the connection dropped, the server is restarting, it has no
connection slot left, a serialization conflict) is iterflow's own problem: the engine retries
its write or read with jittered backoff, bounded in time, and never counts it against a
step or a run. Only an exception raised by user code fails a step. See docs/reliability.md.

Both cores report faults through here: psycopg exceptions (Python core) and
``iterflow._core.CoreError`` (Rust core, which carries ``sqlstate`` and ``transient``) are
classified by SQLSTATE class and connection state, and converted into the typed
``IterflowError`` subclasses callers handle (``DatabaseUnavailable``, ``DatabaseError``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import (
    Code,
    DatabaseError,
    DatabaseUnavailable,
    EngineStateError,
    InvalidArgument,
    IterflowError,
    SchemaMismatch,
)

T = TypeVar("T")

# SQLSTATEs (or their two-character classes) that mean "try again": the statement did not
# fail because of what it asked, but because of the server's or the network's state.
TRANSIENT_CLASSES = frozenset({
    "08",  # connection exception
})
TRANSIENT_STATES = frozenset({
    "57P01",  # admin_shutdown (pg_terminate_backend, fast shutdown)
    "57P02",  # crash_shutdown
    "57P03",  # cannot_connect_now (starting up, shutting down, in recovery)
    "57P05",  # idle_session_timeout
    "53300",  # too_many_connections
    "53400",  # configuration_limit_exceeded
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
    "25P03",  # idle_in_transaction_session_timeout
})


def sqlstate_of(exc: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE carried by ``exc`` (psycopg's ``sqlstate``, the Rust core's)."""
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) and state else None


def is_transient_state(state: str | None) -> bool:
    return state is not None and (state in TRANSIENT_STATES or state[:2] in TRANSIENT_CLASSES)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call later may succeed (an infrastructure fault)."""
    if isinstance(exc, DatabaseUnavailable):
        return True
    if isinstance(exc, IterflowError):
        return False
    flagged = getattr(exc, "transient", None)  # the Rust core decides with the same rules
    if isinstance(flagged, bool):
        return flagged
    state = sqlstate_of(exc)
    if state is not None:
        return is_transient_state(state)
    return _is_connection_fault(exc)


def _is_connection_fault(exc: BaseException) -> bool:
    """A fault with no SQLSTATE: the connection broke, or none could be had in time."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import psycopg
        from psycopg_pool import PoolTimeout, TooManyRequests
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    if isinstance(exc, (PoolTimeout, TooManyRequests)):
        return True
    if isinstance(exc, psycopg.OperationalError):  # no SQLSTATE: lost or refused connection
        return True
    return isinstance(exc, psycopg.InterfaceError) and "closed" in str(exc)


def to_iterflow_error(exc: BaseException, what: str) -> IterflowError:
    """The typed error a caller sees for a core failure of ``what`` (a call name)."""
    if isinstance(exc, IterflowError):
        return exc
    code = getattr(exc, "code", None)  # the Rust core's CoreError codes
    message = str(getattr(exc, "message", None) or exc) or type(exc).__name__
    if code == Code.SCHEMA_MISMATCH:
        return SchemaMismatch(message)
    if code == Code.INVALID_ARGUMENT:
        return InvalidArgument(what, message)
    if code == "CORE_CLOSED":
        return EngineStateError(f"{what}: the engine is stopped")
    state = sqlstate_of(exc)
    text = f"{what}: {message}" + (f" (SQLSTATE {state})" if state else "")
    if is_transient(exc):
        return DatabaseUnavailable(text, sqlstate=state)
    return DatabaseError(text, sqlstate=state)


@dataclass(frozen=True)
class RetryPolicy:
    """How long a call keeps retrying an infrastructure fault, and how it backs off.

    ``timeout`` bounds the whole call (first attempt included); the delays grow from
    ``first_delay`` to ``max_delay`` with full jitter, so a fleet reconnecting after a server
    restart does not arrive in lockstep.
    """

    timeout: float = 30.0
    first_delay: float = 0.05
    max_delay: float = 1.0

    def delays(self) -> Callable[[], float]:
        ceiling = self.first_delay

        def next_delay() -> float:
            nonlocal ceiling
            delay = random.uniform(self.first_delay / 2, ceiling)
            ceiling = min(ceiling * 2, self.max_delay)
            return delay

        return next_delay


async def retrying(
    call: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str,
    on_fault: Callable[[BaseException], None] | None = None,
) -> T:
    """``await call()``, retrying infrastructure faults until ``policy.timeout`` has passed.

    Only for calls that are safe to repeat after an unknown outcome (idempotent or fenced
    writes, reads). The final failure is raised as a typed ``IterflowError``; ``on_fault``
    hears of each fault that is going to be retried (for logging).
    """
    deadline = time.monotonic() + policy.timeout
    next_delay: Callable[[], float] | None = None  # made on the first fault (hot path: none)
    while True:
        try:
            return await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # classified below
            if not is_transient(exc):
                raise to_iterflow_error(exc, what) from exc
            if next_delay is None:
                next_delay = policy.delays()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise to_iterflow_error(exc, what) from exc
            if on_fault is not None:
                on_fault(exc)
            # The last sleep is cut to the deadline and followed by one more try, so a caller
            # is refused only once the whole bound has passed (not early, on a long jitter).
            await asyncio.sleep(min(next_delay(), remaining))
