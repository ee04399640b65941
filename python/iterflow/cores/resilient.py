"""One retry layer above both cores: database faults are retried here, never counted as failures.

``ResilientCore`` implements the ``Core`` protocol by delegating to the real core (Python or
Rust). Every call that is safe to repeat after an unknown outcome — the statement may have
committed before the connection dropped — goes through :func:`iterflow.faults.retrying`:

- reads (``get_run``, ``run_detail``, ``list_runs``, ``select_runs``, ``next_due``,
  ``pending_work``, ``check_schema``);
- ``claim`` (a claim whose answer was lost leaves its runs leased until the lease ends; it
  waits for work on the first attempt only);
- ``claim_runs`` (a claim by id whose answer was lost replaced the runs' sticky tokens, so a
  repeat leaves them out: the worker drops its cached copies and the runs, leased by the lost
  claim, are claimed again with their history once that lease ends);
- ``record_step`` (the first final writer wins: a repeat gets the stored record back);
- ``spawn_children`` (child ids are made client-side, the insert is ``ON CONFLICT DO
  NOTHING`` and ``find_existing_runs`` finds a child by its id);
- ``resolve_signal`` (a repeat finds the record it wrote);
- ``suspend``/``finish`` (fenced by the lease token: a repeat after a commit that landed
  answers False, which the runner treats as "fenced");
- ``continue_run`` (fenced by the lease token, and the successor's id is made client-side: a
  repeat after a commit that landed finds the run continued to that very id and answers True
  without writing, so it never makes a second successor);
- ``heartbeat``, ``expire_leases``, ``requeue_parked``, ``reconcile``, ``prune``,
  ``admin_query``;
- ``insert_runs`` without a caller's connection (a repeat finds the runs it wrote, by
  idempotency key or by id);
- ``deliver_signal`` (the engine always passes an idempotency key, generating one when the
  caller gave none, so a repeat answers ``duplicate`` instead of inserting twice);
- ``cancel``, ``retry``, ``purge`` (a repeat finds the work done: it counts 0 runs / answers
  ``not_failed``);
- ``start_debounced`` (the run id is made client-side: a repeat finds its own run, created);
- ``acquire_permit`` (a repeat by the permit's holder is granted again), ``release_permit``
  (a delete), ``take_rate`` (a repeat after a lost answer reserves a second slot: the rate is
  under-used by one call, never exceeded).

``wait_limit`` is a hint like ``changed_runs``: a fault ends the wait early, and the step asks
for its permit again. ``claim_woken`` is not retried (see its docstring).

Not retried: ``insert_runs`` on a caller's connection (the caller's transaction is theirs, and
it is aborted anyway), ``add_event`` (a plain insert: a repeat would add the event twice),
``open``/``close``/``listen``. Every exception leaving this class is an ``IterflowError``
(``DatabaseUnavailable`` once the retries of a fault ran out, ``DatabaseError`` for a statement
the database refused), so ``psycopg`` errors and ``iterflow._core.CoreError`` never reach
callers. Anything else the inner core offers (the Rust core's ``stats()``, ``schema``) is
reachable through this object.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeAlias, TypeVar

from ..faults import RetryPolicy, is_transient, retrying, to_iterflow_error
from .base import (
    ChangedRuns,
    ClaimedRun,
    Core,
    Created,
    LeaseState,
    Resolved,
    RunFilter,
    RunSpec,
    StepRecord,
    StoredStep,
    Woken,
)

T = TypeVar("T")
# What a retried call returns: its coroutine, awaited by the caller (no frame of its own here)
Call: TypeAlias = Coroutine[Any, Any, T]

# Seconds between two warnings about database faults being retried (one outage, one line).
WARN_EVERY = 5.0


class ResilientCore:
    """The ``Core`` protocol over ``inner``, with infrastructure faults retried (see module doc)."""

    def __init__(self, inner: Core, policy: RetryPolicy, log: logging.Logger | None = None) -> None:
        self.inner = inner
        self.policy = policy
        self.name = inner.name
        self._log = log or logging.getLogger("iterflow")
        self._warned_at = -WARN_EVERY

    def __getattr__(self, attr: str) -> Any:
        # only reached for what this class does not define: the inner core's extras
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(attr)
        return getattr(inner, attr)

    def __repr__(self) -> str:
        return f"ResilientCore({self.inner!r}, timeout={self.policy.timeout}s)"

    # -- plumbing --------------------------------------------------------------------------
    def _fault(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            self._log.warning("iterflow: database fault in %s (%s); retrying for up to %.1fs",
                              what, exc, self.policy.timeout)

    async def _retry(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any, timeout: float | None = None) -> T:
        """``fn(*args)``, with its faults retried. The first attempt is a plain await (the hot
        path pays for nothing else); the retry loop, with its deadline and backoff, starts at
        the first fault and runs for ``timeout`` (the policy's by default) from there."""
        try:
            return await fn(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise to_iterflow_error(exc, what) from exc
            self._fault(what, exc)
        policy = self.policy if timeout is None else replace(self.policy, timeout=timeout)
        return await retrying(lambda: fn(*args), policy, what, on_fault=lambda exc: self._fault(what, exc))

    @staticmethod
    async def _once(what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``fn(*args)`` without retries (not safe to repeat), its failure still typed."""
        try:
            return await fn(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise to_iterflow_error(exc, what) from exc

    @staticmethod
    async def _hint(what: str, call: Awaitable[T], pause: float, fallback: T) -> T:
        """A wait for a hint (a notification, a wake-up): a fault is not retried but ends the
        wait after ``pause`` with ``fallback``, for the caller to look again; anything else
        that fails is typed like every other call."""
        try:
            return await call
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise to_iterflow_error(exc, what) from exc
            await asyncio.sleep(pause)
            return fallback

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        await self._once("open", self.inner.open)

    async def close(self) -> None:
        await self._once("close", self.inner.close)

    def check_schema(self) -> Call[None]:
        return self._retry("check_schema", self.inner.check_schema)

    # -- client side -----------------------------------------------------------------------
    async def insert_runs(self, specs: Sequence[RunSpec], conn: Any = None) -> list[Created]:
        if conn is not None:  # the caller's transaction: never repeated behind their back
            return await self._once("insert_runs", self.inner.insert_runs, specs, conn)
        return await self._retry("insert_runs", self.inner.insert_runs, specs)

    def deliver_signal(self, run_id: str, name: str, payload: str, key: str | None) -> Call[str]:
        return self._retry("deliver_signal", self.inner.deliver_signal, run_id, name, payload, key)

    def start_debounced(self, spec: RunSpec, key: str, window_ms: int) -> Call[Created]:
        return self._retry("start_debounced", self.inner.start_debounced, spec, key, window_ms)

    def cancel(self, run_id: str, reason: str) -> Call[int]:
        return self._retry("cancel", self.inner.cancel, run_id, reason)

    def retry(self, run_id: str) -> Call[str]:
        return self._retry("retry", self.inner.retry, run_id)

    def get_run(self, run_id: str) -> Call[dict[str, Any] | None]:
        return self._retry("get_run", self.inner.get_run, run_id)

    def run_detail(self, run_id: str) -> Call[dict[str, Any] | None]:
        return self._retry("run_detail", self.inner.run_detail, run_id)

    def list_runs(
        self, flt: RunFilter, limit: int, cursor: tuple[datetime, str] | None
    ) -> Call[list[dict[str, Any]]]:
        return self._retry("list_runs", self.inner.list_runs, flt, limit, cursor)

    def select_runs(self, flt: RunFilter, limit: int) -> Call[list[str]]:
        return self._retry("select_runs", self.inner.select_runs, flt, limit)

    def purge(self, run_ids: Sequence[str]) -> Call[int]:
        return self._retry("purge", self.inner.purge, run_ids)

    async def listen(self) -> None:
        await self._once("listen", self.inner.listen)

    async def changed_runs(self, timeout: float) -> ChangedRuns:
        """A hint, never the truth: a fault ends the wait early, asking the caller to re-read
        everything it waits for (a read that is retried)."""
        return await self._hint("changed_runs", self.inner.changed_runs(timeout), min(timeout, 0.1),
                                ChangedRuns([], everything=True, listening=False))

    def wait_runs(self, run_ids: Sequence[str]) -> Call[list[dict[str, Any]]]:
        return self._retry("wait_runs", self.inner.wait_runs, run_ids)

    # -- worker side -----------------------------------------------------------------------
    async def claim(
        self, names: Sequence[str], limit: int, owner: str, lease_ms: int, wait: float | None = None
    ) -> list[ClaimedRun]:
        waits = [wait]

        def call() -> Awaitable[list[ClaimedRun]]:
            first = waits.pop() if waits else None  # a repeat claims at once
            return self.inner.claim(names, limit, owner, lease_ms, first)

        return await self._retry("claim", call)

    def claim_runs(
        self, run_ids: Sequence[str], owner: str, lease_ms: int, expected: Sequence[int]
    ) -> Call[list[ClaimedRun]]:
        return self._retry("claim_runs", self.inner.claim_runs, run_ids, owner, lease_ms, expected)

    def nudge(self) -> None:
        self.inner.nudge()

    def record_step(self, run_id: str, rec: StepRecord, result: str | None, error: str | None) -> Call[StoredStep]:
        return self._retry("record_step", self.inner.record_step, run_id, rec, result, error)

    def spawn_children(
        self, run_id: str, records: Sequence[StepRecord], children: Sequence[RunSpec]
    ) -> Call[list[Created]]:
        return self._retry("spawn_children", self.inner.spawn_children, run_id, records, children)

    def resolve_signal(
        self, run_id: str, key: str, seq: int, name: str, deadline_passed: bool, timeout_error: str
    ) -> Call[Resolved]:
        return self._retry("resolve_signal", self.inner.resolve_signal,
                           run_id, key, seq, name, deadline_passed, timeout_error)

    def suspend(
        self, run_id: str, token: int, status: str, waiting: str, wake_at: datetime | None,
        attempts_delta: int | None,
    ) -> Call[bool]:
        return self._retry("suspend", self.inner.suspend, run_id, token, status, waiting, wake_at, attempts_delta)

    def finish(self, run_id: str, token: int | None, status: str, output: str | None, error: str | None) -> Call[bool]:
        return self._retry("finish", self.inner.finish, run_id, token, status, output, error)

    def continue_run(self, run_id: str, token: int, new_id: str, input: str) -> Call[bool]:
        return self._retry("continue_run", self.inner.continue_run, run_id, token, new_id, input)

    async def add_event(self, run_id: str, kind: str, data: str | None) -> None:
        await self._once("add_event", self.inner.add_event, run_id, kind, data)

    def acquire_permit(
        self, limit: str, key: str | None, run_id: str, step_key: str, lease_token: int, maximum: int
    ) -> Call[tuple[bool, float | None, str]]:
        return self._retry("acquire_permit", self.inner.acquire_permit, limit, key, run_id, step_key,
                           lease_token, maximum)

    def release_permit(self, limit: str, key: str, run_id: str, step_key: str, maximum: int) -> Call[None]:
        return self._retry("release_permit", self.inner.release_permit, limit, key, run_id, step_key, maximum)

    def take_rate(
        self, limit: str, key: str | None, run_id: str, interval_ms: float, burst: int, horizon_ms: float
    ) -> Call[tuple[bool, float]]:
        return self._retry("take_rate", self.inner.take_rate, limit, key, run_id, interval_ms, burst, horizon_ms)

    async def claim_woken(self, owner: str, lease_ms: int, limit: int, timeout: float) -> Woken:
        """Not retried: a fault ends the call after a short pause with nothing claimed. The
        wake-ups it took are hints; a claim whose answer was lost leased runs whose sticky
        token it replaced, so their holder drops them and they are claimed again with their
        history when that lease ends (as a lost ``claim_runs``). (The cores return the
        handoffs they took even when the claim of the announced runs failed.)"""
        return await self._hint("claim_woken", self.inner.claim_woken(owner, lease_ms, limit, timeout),
                                min(timeout, 0.1), Woken())

    def limit_seen(self, channel: str) -> int:
        return self.inner.limit_seen(channel)

    async def wait_limit(self, channel: str, seen: int, timeout: float) -> None:
        """A hint (see the module docstring): a fault ends the wait after a short pause."""
        await self._hint("wait_limit", self.inner.wait_limit(channel, seen, timeout), min(timeout, 0.1), None)

    async def heartbeat(self, leases: Sequence[tuple[str, int]], lease_ms: int) -> list[LeaseState]:
        # renewals come every third of a lease: a renewal that is still failing by then is
        # reported (and the next one tried) instead of piling up behind it
        bound = min(self.policy.timeout, lease_ms / 3000)
        return await self._retry("heartbeat", self.inner.heartbeat, leases, lease_ms, timeout=bound)

    def expire_leases(self, limit: int) -> Call[int]:
        return self._retry("expire_leases", self.inner.expire_leases, limit)

    def next_due(self, names: Sequence[str]) -> Call[float | None]:
        return self._retry("next_due", self.inner.next_due, names)

    def requeue_parked(self, names: Sequence[str]) -> Call[int]:
        return self._retry("requeue_parked", self.inner.requeue_parked, names)

    def prune(self, events_ms: int | None, runs_ms: int | None, batch: int) -> Call[dict[str, int] | None]:
        return self._retry("prune", self.inner.prune, events_ms, runs_ms, batch)

    def pending_work(self, names: Sequence[str] | None) -> Call[int]:
        return self._retry("pending_work", self.inner.pending_work, names)

    def admin_query(self, name: str, *params: Any) -> Call[list[dict[str, Any]]]:
        return self._retry(f"admin_query {name}", self.inner.admin_query, name, *params)

    def reconcile(self, stale_ms: int) -> Call[dict[str, int] | None]:
        return self._retry("reconcile", self.inner.reconcile, stale_ms)
