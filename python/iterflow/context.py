"""``ctx``: replaying a body against its recorded history.

Every ctx call gets a deterministic cursor key (``keys.py``: its base plus ``:n`` for later
occurrences) and a call index. A call with a final record returns it; the first call without one does the
work and records it. Calls that must wait register a *suspension* and block; once every other
branch is blocked or done, the runner unwinds the body by failing the blocked calls with
``SuspendRun``. Blocking (instead of raising at once) is what lets sibling branches of an
``asyncio.gather`` start their own steps before the run suspends.

With the sticky cache (``sticky.py``) the blocked calls are not unwound: the runner *holds*
the context (``hold``) and the worker keeps it; when the run's wake-up comes back to this
worker, ``resume`` merges the records the claim by id returned and releases the blocked
calls, and each wait checks again whether it is over (or blocks once more).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from . import codec, validate
from .cores.base import ClaimedRun, RunSpec, StepRecord, StoredStep
from .durations import DeadlineLike, DurationLike
from .durations import deadline as to_deadline
from .errors import (
    Code,
    ContinueAsNew,
    DatabaseError,
    DriftDetected,
    EngineStateError,
    FlowRuntimeError,
    InvalidArgument,
    LimitExceeded,
    SuspendRun,
)
from .keys import bases
from .schemas import Schema
from .step_limits import Permit
from .steps import (
    AbortToken,
    StepArgs,
    StepOptions,
    call_step,
    error_record,
    in_step,
    make_error,
    raise_recorded,
)
from .types import TERMINAL

if TYPE_CHECKING:
    from .services import ExecutionServices, FlowRef

T = TypeVar("T")
# A name is checked once per process, not at every call that uses it (loops, replays).
_check_name = lru_cache(maxsize=4096)(validate.name)

# ctx calls whose name comes from user code at the call (invoke names come from flow definitions)
NAMED_KINDS = ("step", "signal")
# Loop turns given to sibling branches to replay their recorded calls before new work starts.
GATE_TURNS = 3
# The sticky cache's estimate of a held run (Context.footprint): measured with tracemalloc
# on a small body (docs/replay.md, "Sticky execution"), rounded up.
HELD_BASE_BYTES = 8 * 1024
HELD_KEY_BYTES = 256


@dataclass(frozen=True)
class Suspension:
    status: str
    waiting: dict[str, Any]
    wake_at: datetime | None
    progress: bool  # forward progress resets the run's attempt counter; retrying does not
    # the cursor keys whose records tell whether the wait is over (a held run's claim by id
    # returns just these records)
    keys: tuple[str, ...] = ()


class Context:
    """The ``ctx`` a body receives. One per execution attempt of a run."""

    def __init__(self, run: ClaimedRun, services: ExecutionServices, *, body_flow: bool,
                 signal_schemas: Mapping[str, Schema] | None = None, flow: FlowRef | None = None) -> None:
        self.run_id = run.run_id
        self.attempt = run.attempts
        self.flow_name = run.name
        self.flow_version = run.version
        self._run = run
        self._services = services
        self.default_step_timeout = services.default_step_timeout
        self._check_kinds = body_flow
        self._signal_schemas = signal_schemas or {}  # the flow's declared payload schemas
        self._flow = flow  # what continue_as_new validates its input against
        # the successor's encoded input once the body called continue_as_new (the runner's cue,
        # even if user code swallowed the ContinueAsNew)
        self.continued: str | None = None
        self._history = run.history
        self._visited: set[str] = set()
        # recorded calls (logs aside) not yet reached by this replay: the drift gate has
        # nothing to check, and need not yield, once it is zero
        self._unvisited = sum(1 for rec in run.history.values() if rec.kind != "log")
        self._replay_io = 0
        self._replay_idle = _Flag()
        self._counters: dict[str, int] = {}
        self._seq = 0
        self._position: datetime = run.created_at
        self._in_flight = 0
        self._quiet = _Flag()
        self._blocked: list[asyncio.Future[None]] = []
        self.suspensions: list[Suspension] = []
        self.decided = False
        self.held = False  # every branch blocked and kept blocked: see hold()
        self.cancel_reason: str | None = None
        self.lease_lost = False
        # the database failed under a ctx call (after the core's retries): the execution stops
        # without writing anything, and the run is claimed again (see _abandon)
        self.abandoned: BaseException | None = None
        self._tokens: set[AbortToken] = set()
        self._log_writes: set[asyncio.Task[None]] = set()
        self._spawned = sum(1 for rec in run.history.values() if rec.kind == "invoke")

    # -- cursor keys and drift -------------------------------------------------------------
    def _next(self, kind: str, name: str) -> tuple[str, int, StepRecord | None]:
        self._guard()
        if type(name) is not str:
            validate.name(name, kind)  # raises: names are strings
        base, old_base = bases(kind, name)
        n = self._counters.get(base, 0)
        self._counters[base] = n + 1
        key = base if n == 0 else f"{base}:{n}"
        seq = self._seq
        self._seq += 1
        key, rec = self._lookup(key, kind, name, n, old_base if old_base != base else None)
        if rec is None and kind in NAMED_KINDS:  # a new call: its name is about to be stored
            _check_name(name, kind)
        if rec is not None and rec.kind != "log" and key not in self._visited:
            self._unvisited -= 1
        self._visited.add(key)
        if self._check_kinds:
            self._check_kind(kind, key, rec)
        return key, seq, rec

    def _lookup(self, key: str, kind: str, name: str, n: int,
                old_base: str | None) -> tuple[str, StepRecord | None]:
        """The record of this call: under its key, or under the key an earlier iterflow
        version wrote (``old_base``: keys.legacy_key, when it differs) when it is a record of
        this very kind and name."""
        rec = self._history.get(key)
        if rec is None:
            if old_base is None:
                return key, None
            old = old_base if n == 0 else f"{old_base}:{n}"
            legacy = self._history.get(old)
            if legacy is not None and legacy.kind == kind and legacy.name == name:
                return old, legacy
        elif rec.name != name:
            raise DriftDetected(
                Code.REPLAY_INCOMPATIBLE_VERSION,
                f"call {key!r} ({kind} {name!r}) finds a record of {rec.kind} {rec.name!r} under its key",
            )
        return key, rec

    def _check_kind(self, kind: str, key: str, rec: StepRecord | None) -> None:
        if rec is not None and rec.kind != kind:
            raise DriftDetected(
                Code.REPLAY_INCOMPATIBLE_VERSION,
                f"call {key!r} is a {kind} now but the history recorded a {rec.kind}",
            )

    async def _gate(self, kind: str, key: str) -> None:
        """Before new work, let sibling branches replay their recorded calls; a record that is
        still unvisited then belongs to code that no longer runs (e.g. a renamed step).

        Call order alone cannot tell: a wait that resolves on replay lets its branch overtake
        siblings that were ahead of it on the first pass.
        """
        if not self._check_kinds or self._unvisited == 0:
            return
        while True:
            for _ in range(GATE_TURNS):
                await asyncio.sleep(0)
            if self._replay_io == 0:
                break
            await self._replay_idle.wait()
        unvisited = sorted(
            (rec for k, rec in self._history.items() if k not in self._visited and rec.kind != "log"),
            key=lambda rec: rec.seq,
        )
        if unvisited:
            first = unvisited[0]
            raise DriftDetected(
                Code.REPLAY_NON_DETERMINISTIC,
                f"the history has {first.kind} {first.key!r} (call #{first.seq}) but the code reached new "
                f"{kind} {key!r} without replaying it",
            )

    def _guard(self) -> None:
        if in_step.get():
            raise FlowRuntimeError(
                Code.STEP_INVALID_AWAIT, "ctx calls are not allowed inside a step function", non_retryable=True
            )
        if self.decided:
            raise SuspendRun()
        if self.cancel_reason is not None or self.lease_lost or self.abandoned is not None:
            raise SuspendRun()
        if self.continued is not None:
            raise ContinueAsNew(self.continued)

    # -- the runner's view -----------------------------------------------------------------
    # Every ctx operation that does I/O is bracketed by _begin/_end (try/finally at the call
    # site: an async context manager per step costs more than the rest of a memoized step).
    def _begin(self, replay: bool = False) -> None:
        """An operation is in flight; ``replay`` marks I/O that resolves a recorded call."""
        self._in_flight += 1
        self._quiet.clear()
        if replay:
            self._replay_io += 1
            self._replay_idle.clear()

    def _end(self, replay: bool = False) -> None:
        self._in_flight -= 1
        if replay:
            self._replay_io -= 1
            if self._replay_io == 0:
                self._replay_idle.set()
        self._maybe_quiet()

    def _maybe_quiet(self) -> None:
        if self._in_flight == 0 and self._blocked:
            self._quiet.set()

    def body_done(self, _task: Any) -> None:
        """The body returned or raised: wake the runner (see ``wait_quiet``)."""
        self._quiet.set()

    async def wait_quiet(self) -> None:
        """Returns once every live branch is blocked on a wait, or the body has finished."""
        await self._quiet.wait()

    def is_quiet(self) -> bool:
        return self._in_flight == 0 and bool(self._blocked)

    def decide_suspend(self) -> None:
        """Unwind every blocked call; from now on any ctx call raises ``SuspendRun``."""
        self.decided = True
        self.held = False
        for fut in self._blocked:
            if not fut.done():
                fut.set_exception(SuspendRun())

    def hold(self) -> None:
        """Every branch is blocked: the run suspends, but the blocked calls stay blocked so
        that ``resume`` can continue the body where it stopped (the sticky cache)."""
        self.held = True

    def _deadline_of(self, key: str, pinned: T) -> datetime | T:
        """A resumed wait's deadline as its record now holds it (the test clock moves stored
        deadlines), else the one it pinned."""
        rec = self._history.get(key)
        return rec.deadline if rec is not None and rec.deadline is not None else pinned

    def footprint(self) -> int:
        """Approximate bytes this context keeps alive while held: a fixed part (the body's
        task and frames, the context) plus its records and visited keys (see
        ``HELD_BASE_BYTES``)."""
        return HELD_BASE_BYTES + HELD_KEY_BYTES * (len(self._history) + len(self._visited))

    def held_keys(self) -> list[str]:
        """The cursor keys of the waits a held body is blocked on."""
        return [key for s in self.suspensions for key in s.keys]

    def resume(self, run: ClaimedRun) -> None:
        """Continue a held body under the new claim ``run``, whose history holds the current
        records of the held waits (``held_keys``): merge them and release every blocked call;
        each wait then checks whether it is over, and blocks again if not."""
        self._run = run
        self.attempt = run.attempts
        self.cancel_reason = run.cancel_reason
        self._history.update(run.history)
        self.release()

    def next_wake(self) -> float | None:
        """Seconds until the earliest wait the body is blocked on is over by its own time (a
        sleep, a backoff, a signal timeout; at most 0 when it already is), None without one."""
        times = [s.wake_at for s in self.suspensions if s.wake_at is not None]
        return (min(times) - self.clock()).total_seconds() if times else None

    def release(self) -> None:
        """Let every blocked call check its wait again (``resume``; or, with the sticky cache,
        once a wait that ends within ``runner.SHORT_WAIT`` is over: no suspension, no claim)."""
        self.suspensions = []
        self.held = False
        blocked, self._blocked = self._blocked, []
        self._quiet.clear()
        for fut in blocked:
            if not fut.done():
                fut.set_result(None)

    async def _suspend(self, suspension: Suspension) -> None:
        """Block this branch until the run suspends (raises ``SuspendRun``) or, for a held
        run, until it is resumed (returns: the caller checks its wait again)."""
        self.suspensions.append(suspension)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._blocked.append(fut)
        self._maybe_quiet()
        await fut

    def abort(self, reason: str) -> None:
        """Cancel requested or lease lost: fire running steps' tokens; stop at the next call."""
        for token in list(self._tokens):
            token.fire(reason)

    # -- the database under ctx calls --------------------------------------------------------
    # A core call that still fails after the core's retries (DatabaseUnavailable, or a
    # DatabaseError) is iterflow's fault, not the body's: it must not reach user code as an
    # exception it could catch, nor fail the step or the run. The execution is abandoned: the
    # body unwinds with SuspendRun (a BaseException), every later ctx call raises it again,
    # and the runner writes nothing; the worker releases the lease and the run replays.
    def _abandon(self, exc: BaseException) -> None:
        if self.abandoned is None:
            self.abandoned = exc
        self.abort("the database is unavailable")
        for fut in self._blocked:
            if not fut.done():
                fut.set_exception(SuspendRun())

    async def _io(self, call: Awaitable[T]) -> T:
        """Await a core call made for a ctx call, abandoning the execution if it fails."""
        try:
            return await call
        except (DatabaseError, EngineStateError) as exc:
            self._abandon(exc)
            raise SuspendRun() from None

    def _record(self, rec: StepRecord, result: str | None, error: str | None) -> Awaitable[StoredStep]:
        return self._io(self._services.core.record_step(self.run_id, rec, result, error))

    def clock(self) -> datetime:
        """Database time estimate, never ahead of it (``clock.DbClock``)."""
        now = self._services.clock.now()
        assert now is not None  # (the worker read this run's claim into it: Worker._claim_loop, _go_on)
        return now

    def now(self) -> datetime:
        """The time of the current replay position: when the latest resolved ctx call finished.

        Derived from recorded timestamps, so the first run and every replay see the same value
        at the same place in the body, without a write.
        """
        return self._position

    def _advance(self, at: datetime | None) -> None:
        if at is not None and at > self._position:
            self._position = at

    # -- steps -------------------------------------------------------------------------------
    async def step(self, name: str, fn: Callable[..., Any], **options: Any) -> Any:
        """Run ``fn`` once (memoized by cursor key); see docs/guide.md §2 ("Steps") for the options."""
        opts = StepOptions.cached(options, self._services.default_step_timeout)
        return await self.run_step(name, fn, opts, None)

    async def run_step(self, name: str, fn: Callable[..., Any], opts: StepOptions, channel: Any) -> Any:
        key, seq, rec = self._next("step", name)
        if rec is not None and rec.status == "done":
            return self._step_value(rec, opts)
        attempt = (rec.attempts if rec is not None else 0) + 1
        while True:
            self._begin()
            try:
                await self._gate("step", key)
                outcome = await self._attempt(key, name, fn, opts, channel, attempt)
                value = await self._record_attempt(key, seq, name, attempt, opts, outcome)
            finally:
                self._end()
            if not isinstance(value, _Retry):
                return self._step_value(value, opts)
            backoff = Suspension(
                "retrying", {"kind": "retry", "step": key, "attempt": attempt + 1, "max_attempts": opts.retries + 1,
                 "until": value.at.isoformat()},
                value.at, progress=False, keys=(key,),
            )
            await self._suspend(backoff)  # resumed: the next attempt, as a replay would make it
            attempt += 1

    async def _attempt(
        self, key: str, name: str, fn: Callable[..., Any], opts: StepOptions, channel: Any, attempt: int
    ) -> Any:
        token = AbortToken()
        self._tokens.add(token)
        permit: Permit | None = None
        start: float | None = None  # when the call began (after any wait for its limit)
        span = self._services.hooks.span(f"iterflow.step {name}", lambda: {
            "iterflow.run_id": self.run_id, "iterflow.step": name, "iterflow.attempt": attempt,
        })
        try:
            if opts.limit is not None:  # waits (no connection held) until the limit allows the call
                permit = await self._io(self._services.step_limits.acquire(
                    opts.limit, opts.limit_key, self.run_id, key, self._run.lease_token, token))
            start = time.monotonic()
            with span:
                value = await call_step(fn, StepArgs(channel, token, attempt), opts.timeout)
            encoded = codec.encode(
                value, field="step result", limit=self._services.limits.max_step_result_bytes,
                code=Code.STEP_RESULT_TOO_LARGE,
            )
            self._services.hooks.emit("step_finished", "ok", time.monotonic() - start)
            return _Ok(encoded)
        except (SuspendRun, DriftDetected):
            raise
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and self.cancel_reason is None:
                raise
            if start is not None:  # (a wait for the limit that ended in an abort made no call)
                self._services.hooks.emit("step_finished", "error", time.monotonic() - start)
            return _Err(exc)
        finally:
            self._tokens.discard(token)
            if permit is not None and self.abandoned is None:  # (abandoned: the lease goes, and the permit)
                await self._io(self._services.step_limits.release(permit))

    async def _record_attempt(
        self, key: str, seq: int, name: str, attempt: int, opts: StepOptions, outcome: Any
    ) -> Any:
        rec = StepRecord(key=key, seq=seq, kind="step", name=name, status="done", attempts=attempt)
        if isinstance(outcome, _Ok):
            stored = await self._record(rec, outcome.encoded, None)
            return stored
        exc = outcome.exc
        # a result the codec refused (too large, or no JSON form) would be refused again
        terminal = isinstance(exc, (LimitExceeded, InvalidArgument)) or opts.is_terminal(exc, attempt)
        error = error_record(exc)
        if terminal:
            stored = await self._record(rec, None, codec.dumps(error))
            self._services.log.warning(
                "step %s failed: %s", key, error["message"], extra={"run_id": self.run_id, "step": key}
            )
            return stored
        rec.status = "attempt"
        stored = await self._record(rec, None, codec.dumps(error))
        if stored.status == "done":  # a concurrent (stale) worker finished it first
            return stored
        return _Retry(self.clock() + opts.delay(attempt))

    def _step_value(self, rec: Any, opts: StepOptions) -> Any:
        self._advance(rec.finished_at)
        if rec.error is not None:
            raise_recorded(rec.error)
        if opts.result is not None and rec.result is not None:
            schema = Schema.of(opts.result)
            assert schema is not None
            return schema.validate(rec.result, code=Code.STEP_FAILED, what="step result")
        return rec.result

    # -- waits ------------------------------------------------------------------------------------
    async def sleep(self, duration: DeadlineLike) -> None:
        """Durable sleep; the deadline is pinned on first execution, so replays agree on it."""
        await self._sleep(lambda now: to_deadline(duration, now, field="duration"))

    async def sleep_until(self, when: datetime) -> None:
        if not isinstance(when, datetime):
            raise InvalidArgument("when", f"sleep_until needs a datetime, got {type(when).__name__}")
        await self._sleep(lambda now: to_deadline(when, now, field="when"))

    async def _sleep(self, compute: Callable[[datetime], datetime]) -> None:
        key, seq, rec = self._next("sleep", "sleep")
        if rec is not None and rec.deadline is None:
            self._advance(rec.finished_at)
            return
        now = self.clock()
        if rec is None:
            until = compute(now)
            if until <= now:
                return
            self._begin()
            try:
                await self._gate("sleep", key)
                await self._record(StepRecord(key, seq, "sleep", "sleep", "waiting", deadline=until), None, None)
            finally:
                self._end()
        else:
            pinned = rec.deadline
            assert pinned is not None
            until = pinned
            if until <= now or rec.status == "done":  # (done: closed by the claim, by the database's clock)
                self._advance(until)
                if rec.status == "waiting":  # close the record so timelines show the sleep as over
                    self._begin(replay=True)
                    try:
                        done = StepRecord(key, seq, "sleep", "sleep", "done", deadline=until)
                        await self._record(done, None, None)
                    finally:
                        self._end(replay=True)
                return
        sleeping = Suspension("sleeping", {"kind": "sleep", "until": until.isoformat()}, until, True, keys=(key,))
        await self._suspend(sleeping)
        # resumed: the sleep is over, unless another branch's wake-up came first
        while self.clock() < (until := self._deadline_of(key, until)):
            await self._suspend(sleeping)
        self._advance(until)
        closed = self._history.get(key)
        if closed is not None and closed.status == "done":  # by the claim that resumed us
            return
        self._begin()
        try:
            await self._record(StepRecord(key, seq, "sleep", "sleep", "done", deadline=until), None, None)
        finally:
            self._end()

    async def signal(self, name: str, *, schema: Any = None, timeout: DurationLike | None = None) -> Any:
        """Wait for the next signal ``name`` (single consumer); SIGNAL_TIMEOUT when it expires."""
        key, seq, rec = self._next("signal", name)
        schema_ = Schema.of(schema) if schema is not None else self._signal_schemas.get(name)
        if rec is not None and rec.status == "done":
            self._advance(rec.finished_at)
            return self._signal_value(rec.result, rec.error, schema_, name)
        now = self.clock()
        until = rec.deadline if rec is not None else (
            to_deadline(timeout, now, field="timeout") if timeout is not None else None
        )
        timeout_error = make_error(Code.SIGNAL_TIMEOUT, f"signal {name!r} timed out")
        replay = rec is not None
        self._begin(replay)
        try:
            if rec is None:
                await self._gate("signal", key)
            resolved = await self._io(self._services.core.resolve_signal(
                self.run_id, key, seq, name, until is not None and until <= now, codec.dumps(timeout_error)
            ))
            if resolved.outcome == "none" and rec is None and until is not None:
                await self._record(StepRecord(key, seq, "signal", name, "waiting", deadline=until), None, None)
        finally:
            self._end(replay)
        if resolved.outcome != "none":
            self._advance(resolved.at)
        if resolved.outcome == "signal":
            return self._signal_value(resolved.payload, None, schema_, name)
        if resolved.outcome == "timeout":
            return self._signal_value(None, timeout_error, schema_, name)
        waiting = {"kind": "signal", "name": name, "key": key, "seq": seq,
                   "until": until.isoformat() if until else None}
        while True:
            await self._suspend(Suspension("awaiting_signal", waiting, until, True, keys=(key,)))
            got = self._history.get(key)
            if got is not None and got.status == "done":  # consumed by the claim that resumed us
                self._advance(got.finished_at)
                return self._signal_value(got.result, got.error, schema_, name)
            until = self._deadline_of(key, until)
            if until is not None and until <= self.clock():
                return await self._signal_expired(key, seq, name, schema_, timeout_error)

    async def _signal_expired(self, key: str, seq: int, name: str, schema: Schema | None,
                              timeout_error: dict[str, Any]) -> Any:
        """A resumed signal wait whose deadline passed: record the timeout, unless a signal
        raced it in (resolve_signal decides under the run's lock)."""
        self._begin()
        try:
            resolved = await self._io(self._services.core.resolve_signal(
                self.run_id, key, seq, name, True, codec.dumps(timeout_error)
            ))
        finally:
            self._end()
        self._advance(resolved.at)
        if resolved.outcome == "signal":
            return self._signal_value(resolved.payload, None, schema, name)
        return self._signal_value(None, timeout_error, schema, name)

    def _signal_value(self, payload: Any, error: dict[str, Any] | None, schema: Schema | None, name: str) -> Any:
        if error is not None:
            raise_recorded(error)
        if schema is None:
            return payload
        try:
            return schema.validate(payload, code=Code.SIGNAL_PAYLOAD_INVALID, what=f"signal {name!r} payload")
        except FlowRuntimeError:
            raise
        except Exception as exc:
            raise FlowRuntimeError(Code.SIGNAL_PAYLOAD_INVALID, str(exc), non_retryable=True) from exc

    # -- children --------------------------------------------------------------------------------
    async def invoke(self, flow: FlowRef, input: Any = None, *, idempotency_key: str | None = None,
                     tags: Sequence[str] = ()) -> Any:
        """Run a child flow and return its output (a failed child raises with its code)."""
        (out,) = await self._invoke_many([(flow, input, validate.idempotency_key(idempotency_key),
                                            validate.tags(tags))])
        return out

    async def invoke_all(self, items: Sequence[Any]) -> list[Any]:
        """Fan out children in one write and join them; outputs in the order given."""
        norm = []
        for i, item in enumerate(items):
            if isinstance(item, dict):
                norm.append((item["flow"], item.get("input"),
                             validate.idempotency_key(item.get("idempotency_key"), f"items[{i}].idempotency_key"),
                             validate.tags(item.get("tags", ()), f"items[{i}].tags")))
            else:
                flow, inp = item[0], item[1] if len(item) > 1 else None
                norm.append((flow, inp, None, ()))
        return await self._invoke_many(norm)

    async def _invoke_many(self, items: Sequence[tuple[Any, Any, str | None, tuple[str, ...]]]) -> list[Any]:
        calls = []
        for flow, inp, ikey, tags in items:
            key, seq, rec = self._next("invoke", f"{flow.name}@{flow.version}")
            calls.append((flow, inp, ikey, tags, key, seq, rec))
        to_spawn = [c for c in calls if c[6] is None]
        replay = not to_spawn
        self._begin(replay)
        try:
            if to_spawn:
                await self._gate("invoke", to_spawn[0][4])
                await self._spawn(to_spawn)
            outputs = [await self._child_outcome(c) for c in calls]
        finally:
            self._end(replay)
        while pending := [(c, o) for c, o in zip(calls, outputs, strict=True) if isinstance(o, _Pending)]:
            waiting = {"kind": "child", "child_id": pending[0][1].child_id, "children": len(pending)}
            await self._suspend(Suspension("awaiting_child", waiting, None, True, keys=tuple(c[4] for c, _ in pending)))
            self._begin()
            try:  # resumed: the held waits' records came with the claim
                outputs = [await self._child_outcome(c) if isinstance(o, _Pending) else o
                           for c, o in zip(calls, outputs, strict=True)]
            finally:
                self._end()
        for out in outputs:
            if isinstance(out, _Err):
                raise out.exc
        return [o.value for o in outputs]

    async def _spawn(self, calls: Sequence[Any]) -> None:
        limits = self._services.limits
        for flow, _inp, _ikey, _tags, key, seq, _rec in calls:
            code, msg = None, ""
            if self._run.depth + 1 > limits.max_invoke_depth:
                code, msg = Code.INVOKE_DEPTH_EXCEEDED, f"child depth {self._run.depth + 1} > {limits.max_invoke_depth}"
            elif self._spawned + len(calls) > limits.max_children_per_run:
                code, msg = Code.INVOKE_FANOUT_EXCEEDED, f"more than {limits.max_children_per_run} children"
            if code is not None:
                err = make_error(code, msg)
                rec = StepRecord(key, seq, "invoke", f"{flow.name}@{flow.version}", "done")
                stored = await self._record(rec, None, codec.dumps(err))
                self._history[key] = _as_record(rec, stored)
        specs, recs = [], []
        for flow, inp, ikey, tags, key, seq, _rec in calls:
            if key in self._history:
                continue
            encoded = self._services.encode_input(flow, inp)
            specs.append(RunSpec(
                id=self._services.new_id(), name=flow.name, version=flow.version, input=encoded,
                idempotency_key=ikey, tags=tags, parent_id=self.run_id, parent_key=key, depth=self._run.depth + 1,
            ))
            recs.append(StepRecord(key, seq, "invoke", f"{flow.name}@{flow.version}", "waiting"))
        if specs:
            created = await self._io(self._services.core.spawn_children(self.run_id, recs, specs))
            self._spawned += len(specs)
            for rec, made in zip(recs, created, strict=True):
                rec.child_id, rec.child_status = made.run_id, made.status
                self._history[rec.key] = rec

    async def _child_outcome(self, call: Any) -> Any:
        key = call[4]
        rec = self._history.get(key) or call[6]
        assert rec is not None
        if rec.status == "done":
            self._advance(rec.finished_at)
            return _Err(_recorded_exc(rec.error)) if rec.error is not None else _Value(rec.result)
        if rec.child_status not in TERMINAL:
            return _Pending(rec.child_id or "")
        if rec.child_status == "done":
            result, error = codec.dumps(rec.child_output), None
        else:
            child_err = rec.child_error or {}
            error = codec.dumps(make_error(
                child_err.get("code") or Code.STEP_FAILED,
                f"child {rec.child_id} {rec.child_status}: {child_err.get('message', '')}",
            ))
            result = None
        done = StepRecord(rec.key, rec.seq, "invoke", rec.name, "done", child_id=rec.child_id)
        stored = await self._record(done, result, error)
        self._advance(stored.finished_at)
        if stored.error is not None:
            return _Err(_recorded_exc(stored.error))
        return _Value(stored.result)

    # -- continue-as-new ---------------------------------------------------------------------------
    def continue_as_new(self, input: Any = None) -> NoReturn:
        """End this run and start a fresh run of the same flow and version with ``input`` and an
        empty history, in one transaction (docs/guide.md, "Loops that run forever"): a loop that
        continues every so many iterations keeps its history, and so its replays, bounded.

        Raises (does not return): the body unwinds and the run ends ``done``, its
        ``continued_to`` naming the successor; ``result()`` of any run of the chain returns the
        chain's final output. ``input`` is validated and encoded like a start's (the flow's input
        schema, ``max_input_bytes``) before anything is written; a bad one raises its typed
        error here. Only the body's last live branch may call it (``CONTINUE_AS_NEW_INVALID``
        otherwise), and never inside a step (``STEP_INVALID_AWAIT``).
        """
        self._guard()
        others = self._in_flight - len(self._log_writes)
        if others > 0 or self._blocked:
            raise FlowRuntimeError(
                Code.CONTINUE_AS_NEW_INVALID,
                "continue_as_new needs every other branch of the body to have finished "
                f"({others} ctx call(s) in flight, {len(self._blocked)} waiting)",
                non_retryable=True,
            )
        if self._flow is None:  # (a Context made without its flow: only tests make one)
            raise FlowRuntimeError(Code.CONTINUE_AS_NEW_INVALID, "no flow to continue", non_retryable=True)
        self.continued = self._services.encode_input(self._flow, input)
        raise ContinueAsNew(self.continued)

    # -- deterministic helpers ------------------------------------------------------------------
    def log(self, message: str, **data: Any) -> None:
        """Log once across replays: the record is written in the background, like a step."""
        key, seq, rec = self._next("log", "log")
        if rec is not None:
            return
        payload = codec.encode({"message": message, **data}, field="log data", limit=None, code=Code.STEP_FAILED)
        self._services.log.info(message, extra={"run_id": self.run_id, "flow": self.flow_name, "data": data})
        write = asyncio.get_running_loop().create_task(self._record_log(key, seq, payload))
        self._log_writes.add(write)
        write.add_done_callback(self._log_writes.discard)
        self._in_flight += 1
        self._quiet.clear()

    async def logs_written(self) -> None:
        """Wait for the background log records: a run becomes terminal only after everything
        it recorded, so whoever reads it after ``result()`` sees every log line."""
        if self._log_writes:
            await asyncio.gather(*self._log_writes, return_exceptions=True)

    async def _record_log(self, key: str, seq: int, payload: str) -> None:
        try:
            rec = StepRecord(key, seq, "log", "log", "done")
            await self._services.core.record_step(self.run_id, rec, payload, None)
        except (DatabaseError, EngineStateError) as exc:  # (a background write: nobody to raise to)
            self._abandon(exc)
        finally:
            self._in_flight -= 1
            self._maybe_quiet()


class _Flag:
    """``asyncio.Event`` for the runner's bookkeeping, minus its per-instance setup cost
    (two of these per execution attempt, on the hot path)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter


@dataclass
class _Ok:
    encoded: str


@dataclass
class _Err:
    exc: BaseException


@dataclass
class _Retry:
    at: datetime


@dataclass
class _Value:
    value: Any


@dataclass
class _Pending:
    child_id: str


def _recorded_exc(error: dict[str, Any] | None) -> FlowRuntimeError:
    error = error or {}
    return FlowRuntimeError(str(error.get("code") or Code.STEP_FAILED), str(error.get("message") or ""),
                            non_retryable=True)


def _as_record(rec: StepRecord, stored: Any) -> StepRecord:
    rec.status, rec.result, rec.error = stored.status, stored.result, stored.error
    return rec
