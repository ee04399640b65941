"""One execution attempt of a claimed run: checks, replay, then exactly one final write.

The final write is a suspension (sleep, signal, child, retry, parked) or a terminal state;
all of them are fenced by the lease token, so a worker that lost its lease changes nothing.

With a sticky cache (``sticky.py``) a suspension does not unwind the body: the execution is
*held* (its body task still blocked on its waits) and the worker keeps it; ``resume`` goes on
under the next claim of the run by id, and ``drop`` unwinds it without writing anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from . import codec
from .context import Context, Suspension
from .cores.base import ClaimedRun
from .errors import (
    Code,
    ContinueAsNew,
    DatabaseError,
    DriftDetected,
    EngineStateError,
    FlowRuntimeError,
    IterflowError,
    SuspendRun,
)
from .flow import Flow
from .services import ExecutionServices
from .steps import error_record, make_error
from .sticky import StickyHolder

PARK_RECHECK = timedelta(minutes=1)
# How many loop turns sibling branches get to reach their next ctx call before a suspension.
SETTLE_TURNS = 5
# With the sticky cache, a body whose every branch is blocked on waits of which one ends
# within this many seconds waits for it in place instead of suspending: a suspension and a
# claim by id cost a few round trips, and a wake-up due before the suspension commits would
# be raced by the worker's own claim.
SHORT_WAIT = 0.02


class Execution:
    """Drives one claimed run; ``ctx`` is exposed so the worker can abort it (cancel, lease lost)."""

    def __init__(self, run: ClaimedRun, services: ExecutionServices, flows: Mapping[tuple[str, int], Flow],
                 sticky: StickyHolder | None = None) -> None:
        self.run = run
        self.services = services
        self.flows = flows
        self.sticky = sticky  # None: every suspension unwinds the body (no sticky cache)
        self.ctx: Context | None = None
        self.body: asyncio.Task[Any] | None = None
        # the last attempt suspended with its body held: the worker keeps it (sticky cache)
        self.kept = False
        self.cancel_reason: str | None = run.cancel_reason
        self.lease_lost = False
        # why the execution stopped without a final write ("abandoned"): a database fault
        self.abandoned: BaseException | None = None

    def abort(self, reason: str, *, cancel: bool) -> None:
        if cancel:
            self.cancel_reason = self.cancel_reason or reason
        else:
            self.lease_lost = True
        if self.ctx is not None:
            if cancel:
                self.ctx.cancel_reason = self.cancel_reason
            else:
                self.ctx.lease_lost = True
            self.ctx.abort(reason)

    @property
    def held(self) -> bool:
        """Suspended with its body still blocked on its waits: ``resume`` can go on."""
        return self.ctx is not None and self.ctx.held and self.body is not None and not self.body.done()

    async def execute(self) -> str:
        """Returns the status the run was left in ("fenced" when our lease was lost,
        "abandoned" when the database failed under it: nothing was written, and the worker
        gives the lease back)."""
        self.kept = False
        try:
            return await self._checked()
        except (DatabaseError, EngineStateError) as exc:  # a final write failed after its retries
            return self._abandon(exc)
        finally:
            if not self.kept:
                self.drop()

    async def resume(self, run: ClaimedRun) -> str:
        """Go on with a held execution under ``run``, the claim by id of this run (its history:
        only the records of the held waits). Same answers as ``execute``."""
        self.run, self.cancel_reason, self.lease_lost, self.kept = run, run.cancel_reason, False, False
        ctx = self.ctx
        assert ctx is not None and self.held
        try:
            if self.cancel_reason is not None:  # (a claim with the history does not skip these)
                self.drop()
                return await self._cancel()
            if run.parent_status in ("failed", "canceled"):
                self.drop()
                parent = make_error(Code.RUN_CANCELED, f"parent {run.parent_status}")
                return await self._finish("canceled", None, parent)
            if run.attempts > self.services.max_run_attempts:
                self.drop()
                return await self._finish("failed", None, _exhausted(run.attempts, self.services.max_run_attempts))
            ctx.lease_lost = False
            ctx.resume(run)
            self.services.hooks.emit("run_started")
            with self.services.hooks.span(f"iterflow.run {run.name}", lambda: {
                "iterflow.run_id": run.run_id, "iterflow.flow": run.name, "iterflow.version": run.version,
                "iterflow.attempt": run.attempts,
            }):
                return await self._drive_body()
        except (DatabaseError, EngineStateError) as exc:
            return self._abandon(exc)
        finally:
            if not self.kept:
                self.drop()

    def footprint(self) -> int:
        """Approximate bytes a held execution keeps alive (the sticky cache's budget)."""
        return self.ctx.footprint() if self.ctx is not None else 0

    def drop(self) -> None:
        """Unwind a body that will not go on (evicted from the cache, stale, canceled, the
        worker stopping), as a suspension without the sticky cache does, writing nothing."""
        if self.ctx is not None:
            self.ctx.decide_suspend()
        if self.body is not None and not self.body.done():
            self.body.add_done_callback(_retrieve)

    async def _checked(self) -> str:
        run, services = self.run, self.services
        if self.cancel_reason is not None:
            return await self._finish("canceled", None, make_error(Code.RUN_CANCELED, self.cancel_reason))
        if run.parent_status in ("failed", "canceled"):
            return await self._finish("canceled", None, make_error(Code.RUN_CANCELED, f"parent {run.parent_status}"))
        if run.attempts > services.max_run_attempts:
            return await self._finish("failed", None, _exhausted(run.attempts, services.max_run_attempts))
        flow = self.flows.get((run.name, run.version))
        if flow is None:
            return await self._park(Code.FLOW_UNKNOWN, f"no body registered for {run.name}@{run.version}")
        if flow.shape is not None:
            mismatch = flow.shape.check(run.history)
            if mismatch is not None:
                return await self._drift(flow.drift, *mismatch)
        services.hooks.emit("run_started")
        with services.hooks.span(f"iterflow.run {run.name}", lambda: {
            "iterflow.run_id": run.run_id, "iterflow.flow": run.name, "iterflow.version": run.version,
            "iterflow.attempt": run.attempts,
        }):
            return await self._replay(flow)

    async def _replay(self, flow: Flow) -> str:
        run, services = self.run, self.services
        ctx = self.ctx = Context(run, services, body_flow=flow.shape is None, signal_schemas=flow.signal_schemas,
                                 flow=flow)
        ctx.cancel_reason, ctx.lease_lost = self.cancel_reason, self.lease_lost
        return await self._drive_body(flow)

    async def _drive_body(self, flow: Flow | None = None) -> str:
        """Start the body (``flow``) or go on with the held one, until it returns, raises or
        every branch is blocked; then the one final write."""
        run, services, ctx = self.run, self.services, self.ctx
        assert ctx is not None
        started = time.monotonic()
        try:
            if flow is not None:
                value = flow.input_schema.validate(run.input, code=Code.INPUT_INVALID, what="input") \
                    if flow.input_schema is not None else run.input
                self.body = _start(ctx, flow.body(ctx, value))
            assert self.body is not None
            output = await _drive(ctx, self.body, hold=self.sticky is not None)
        except (SuspendRun, ContinueAsNew):
            output = _SUSPENDED
        except DriftDetected as drift:
            if ctx.abandoned is not None:
                return self._abandon(ctx.abandoned)
            return await self._drift(self._flow_drift(), drift.code, drift.message)
        except asyncio.CancelledError:
            if self.cancel_reason is None and not self.lease_lost:
                raise
            output = _SUSPENDED
        except Exception as exc:  # noqa: BLE001 - the body failed: the run fails with its error
            if ctx.abandoned is not None:  # (user code turned the unwinding into an error)
                return self._abandon(ctx.abandoned)
            if self.lease_lost:
                return "fenced"
            if self.cancel_reason is not None:
                return await self._cancel()
            if ctx.continued is not None:  # user code turned the continuation into an error
                return await self._continue(ctx, ctx.continued)
            if ctx.decided:  # user code turned the suspend into an error: the run still suspends
                return await self._suspend(ctx.suspensions)
            err = error_record(exc)
            services.hooks.emit("run_failed", err["code"])
            return await self._finish("failed", None, err)
        if ctx.abandoned is not None:
            return self._abandon(ctx.abandoned)
        if self.lease_lost:
            return "fenced"
        if self.cancel_reason is not None:
            return await self._cancel()
        if ctx.continued is not None:
            return await self._continue(ctx, ctx.continued)
        if output is _SUSPENDED or ctx.decided:
            return await self._suspend(ctx.suspensions)
        await ctx.logs_written()
        if ctx.abandoned is not None:  # (a log record's write gave up)
            return self._abandon(ctx.abandoned)
        try:
            encoded = codec.encode(output, field="output", limit=None, code=Code.STEP_FAILED)
        except Exception as exc:  # noqa: BLE001 - an output that cannot be stored fails the run at
            # once: every replay would produce it again, so retrying only burns attempts
            return await self._finish("failed", None, error_record(_unstorable(exc)))
        services.hooks.emit("run_completed", time.monotonic() - started)
        return await self._finish("done", encoded, None)

    async def _cancel(self) -> str:
        return await self._finish("canceled", None, make_error(Code.RUN_CANCELED, self.cancel_reason or "canceled"))

    def _abandon(self, exc: BaseException) -> str:
        self.abandoned = exc
        return "abandoned"

    async def _finish(self, status: str, output: str | None, error: dict[str, Any] | None) -> str:
        ok = await self.services.core.finish(
            self.run.run_id, self.run.lease_token, status, output, codec.dumps(error) if error else None
        )
        return status if ok else "fenced"

    async def _continue(self, ctx: Context, encoded_input: str) -> str:
        """ctx.continue_as_new: end the run and start its successor in one fenced write (the
        successor's id is made once here, so a retried write finds the run continued to it)."""
        await ctx.logs_written()
        if ctx.abandoned is not None:  # (a log record's write gave up)
            return self._abandon(ctx.abandoned)
        ok = await self.services.core.continue_run(
            self.run.run_id, self.run.lease_token, self.services.new_id(), encoded_input
        )
        if ok:
            self.services.hooks.emit("run_continued")
        return "continued" if ok else "fenced"

    async def _suspend(self, suspensions: list[Suspension]) -> str:
        if not suspensions:  # a suspension was decided but nothing registered one (swallowed)
            raise RuntimeError("run suspended without a reason")
        timed = [(s.wake_at, i) for i, s in enumerate(suspensions) if s.wake_at is not None]
        chosen = suspensions[min(timed)[1]] if timed else suspensions[0]  # the earliest timer shows
        progress = any(s.progress for s in suspensions)
        # every signal any branch waits for, whichever wait is shown: delivery of any of them wakes
        # the run (e.g. asyncio.wait on "approve" and "reject", or a signal raced against a sleep),
        # and the claim that wakes it resolves them (their cursor seqs make the records)
        signals: dict[str, str] = {}
        seqs: dict[str, int] = {}
        for s in suspensions:
            if s.waiting.get("kind") == "signal" and s.waiting["name"] not in signals:
                signals[s.waiting["name"]] = s.waiting["key"]
                seqs[s.waiting["name"]] = s.waiting["seq"]
        waiting = dict(chosen.waiting, signals=signals, signal_seqs=seqs)
        if self.held:
            assert self.sticky is not None
            assert self.ctx is not None
            waiting["sticky"] = self.sticky.mark(self.run.lease_token, self.ctx.held_keys())
        ok = await self.services.core.suspend(
            self.run.run_id, self.run.lease_token, chosen.status, codec.dumps(waiting),
            chosen.wake_at, None if progress else 0,
        )
        self.kept = ok and self.held
        self.services.hooks.emit("run_suspended", chosen.status)
        return chosen.status if ok else "fenced"

    async def _park(self, code: str, message: str) -> str:
        waiting = {"kind": "parked", "code": code, "reason": message}
        self.services.log.warning("parking run %s: %s", self.run.run_id, message, extra={"run_id": self.run.run_id})
        await self.services.core.add_event(self.run.run_id, "parked", codec.dumps(waiting))
        ok = await self.services.core.suspend(
            self.run.run_id, self.run.lease_token, "parked", codec.dumps(waiting),
            self.run.db_now + PARK_RECHECK, -1,
        )
        return "parked" if ok else "fenced"

    def _flow_drift(self) -> str | None:
        flow = self.flows.get((self.run.name, self.run.version))
        return flow.drift if flow is not None else None

    async def _drift(self, mode: str | None, code: str, message: str) -> str:
        if (mode or self.services.drift) == "fail":
            return await self._finish("failed", None, make_error(code, message))
        return await self._park(code, message)


_SUSPENDED = object()


def _unstorable(exc: Exception) -> FlowRuntimeError:
    """The typed, non-retryable error of a body output the codec refused (its message names
    the output and the offending spot)."""
    reason = exc.message if isinstance(exc, IterflowError) else f"output: cannot be stored as JSON: {exc}"
    return FlowRuntimeError(Code.STEP_FAILED, reason, non_retryable=True)


def _exhausted(attempts: int, limit: int) -> dict[str, Any]:
    return make_error(Code.RUN_ATTEMPTS_EXHAUSTED,
                      f"run was claimed {attempts} times without finishing (max_run_attempts={limit})")


def _start(ctx: Context, body: Any) -> asyncio.Task[Any]:
    task: asyncio.Task[Any] = asyncio.ensure_future(body)
    task.add_done_callback(ctx.body_done)
    return task


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A dropped body's end (``SuspendRun``, or what user code made of it) is nobody's news."""
    if not task.cancelled():
        task.exception()


async def _drive(ctx: Context, task: asyncio.Task[Any], *, hold: bool) -> Any:
    """Run the body until it returns, or until every live branch is blocked on a wait: then
    unwind it, or with ``hold`` keep it blocked (``Context.hold``) and return ``_SUSPENDED``."""
    try:
        while True:
            await ctx.wait_quiet()
            if task.done():
                return task.result()
            for _ in range(SETTLE_TURNS):
                await asyncio.sleep(0)
            if task.done():  # e.g. asyncio.wait() on two waits: one resolved, the other was cancelled
                return task.result()
            if ctx.is_quiet():
                wake = ctx.next_wake() if hold else None
                if wake is not None and wake <= SHORT_WAIT:  # held anyway: wait here, write nothing
                    await asyncio.sleep(max(wake, 0.0))
                    ctx.release()
                    continue
                if hold:
                    ctx.hold()
                    return _SUSPENDED
                ctx.decide_suspend()
                return await task
    except BaseException:
        if not task.done():
            task.cancel()
        raise

