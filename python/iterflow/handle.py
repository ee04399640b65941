"""``FlowHandle``: start runs of one ``name@version`` and await them."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from . import control, validate
from .cores.base import Core, RunSpec
from .durations import MAX_DURATION, DurationLike, parse_duration
from .errors import Code, InvalidArgument, IterflowError, RunCanceled, RunFailed, RunNotFound
from .schemas import Schema
from .types import TERMINAL, StartResult, StartSpec, require_run_id

if TYPE_CHECKING:
    from .flow import Flow
    from .services import ExecutionServices
    from .waiters import WaiterRegistry

# Seconds a wait() watch lives unrenewed (renewed at half-life while its waiter waits).
WATCH_TTL = 600.0
# Seconds after registering a watch before wait() reads the run again even without a wake-up.
# A step record whose statement began before the watch committed does not see the watch, so
# it sends no `p` wake-up, yet it may commit after wait()'s first read: without this second
# look, the wait would end only at the next safety read (waiters.SAFETY, seconds later).
WATCH_SETTLE = 0.2
# A start_many this large refreshes the hot tables' statistics (not on a caller's connection:
# their transaction is theirs); autovacuum would get there too, but up to a minute later.
ANALYZE_AFTER = 1000
MAX_WAIT = MAX_DURATION.total_seconds()
T = TypeVar("T")


class CoroutineRunner(Protocol):
    """Runs a coroutine to its end for a plain thread (the blocking facade's loop, sync.py)."""

    def run(self, coro: Coroutine[Any, Any, T]) -> T: ...


class BlockingHandles(Protocol):
    """What ``FlowHandle.sync`` asks of ``engine.sync``: the blocking handle of a flow."""

    def handle(self, name: str, version: int = 1, input_schema: Any = None) -> SyncHandle: ...


class HandleOwner(Protocol):
    """What a ``FlowHandle`` needs from the engine that made it (``Engine`` is one).

    A protocol, not the class: the engine makes handles, so this module names only what a
    handle uses (docs/architecture.md §1)."""

    @property
    def services(self) -> ExecutionServices: ...

    @property
    def waiters(self) -> WaiterRegistry: ...

    @property
    def sync(self) -> BlockingHandles: ...

    async def client(self) -> Core: ...


class FlowHandle:
    """Starts and awaits runs. Enqueue-only handles (``engine.handle``) need no body."""

    def __init__(self, engine: HandleOwner, name: str, version: int, input_schema: Schema | None,
                 flow: Flow | None = None) -> None:
        self._engine = engine
        self.name = validate.name(name, "name")
        self.version = validate.version(version)
        self.input_schema = input_schema
        self.flow = flow

    @property
    def sync(self) -> SyncHandle:
        """The blocking form of this handle (``start``, ``start_many``, ``result``, ``wait``)."""
        return self._engine.sync.handle(self.name, self.version, self.input_schema)

    def __repr__(self) -> str:
        return f"FlowHandle({self.name}@{self.version})"

    def _spec(self, item: StartSpec, index: int | None = None) -> RunSpec:
        where = "" if index is None else f"items[{index}]."
        services = self._engine.services
        key = validate.idempotency_key(item.idempotency_key, f"{where}idempotency_key")
        tags = validate.tags(item.tags, f"{where}tags")
        priority = validate.integer(item.priority, f"{where}priority", -(2**31), 2**31 - 1)
        delay = parse_duration(item.delay, field=f"{where}delay") if item.delay is not None else None
        run_key = control.run_key(item.key, f"{where}key")
        if self.flow is not None and self.flow.control is not None:
            run_key = self.flow.control.run_key(run_key, item.input, f"{where}key")
        return RunSpec(
            id=services.new_id(), name=self.name, version=self.version, input=services.encode_input(self, item.input),
            idempotency_key=key, tags=tags, priority=priority,
            delay_ms=int(delay.total_seconds() * 1000) if delay else 0, concurrency_key=run_key,
        )

    async def start(self, input: Any = None, *, idempotency_key: str | None = None, tags: Sequence[str] = (),
                    delay: DurationLike | None = None, priority: int = 0, key: str | None = None,
                    conn: Any = None, debounce: DurationLike | None = None) -> StartResult:
        """Create a run (or return the existing one for this idempotency key).

        ``key`` is the run's key for per-key limits and fair claims (docs/guide.md, "Flow
        control"); without it, the flow's key function, if it has one, computes it from ``input``.
        With ``conn`` the run is written inside the caller's open transaction: it commits or
        rolls back with it, and workers see it only after commit.

        With ``debounce``, starts of this flow and version with the same key within the window
        collapse into one run with the last input (docs/guide.md, "Flow control").
        """
        spec = self._spec(StartSpec(input, idempotency_key, tags, delay, priority, key))
        if debounce is not None:
            return await self._start_debounced(spec, debounce, idempotency_key, delay, conn)
        core = await self._engine.client()
        (made,) = await core.insert_runs([spec], conn=conn)
        return StartResult(made.run_id, made.status, made.created)

    async def _start_debounced(self, spec: RunSpec, debounce: DurationLike, idempotency_key: str | None,
                               delay: DurationLike | None, conn: Any) -> StartResult:
        """A debounced start: the run of this flow, version and key that has not begun takes
        this input and begins ``debounce`` from now, or a new run is made to begin then. The
        key is the run's key (``key=``, or the flow's key function)."""
        if spec.concurrency_key is None:
            raise InvalidArgument("key", "a debounced start needs key= (the starts it collapses share it)")
        window = parse_duration(debounce, field="debounce")
        for field, value in (("idempotency_key", idempotency_key), ("delay", delay), ("conn", conn)):
            if value is not None:
                raise InvalidArgument(field, "cannot be combined with debounce (the window is the delay, "
                                             "the key is the identity)")
        core = await self._engine.client()
        made = await core.start_debounced(spec, spec.concurrency_key, int(window.total_seconds() * 1000))
        return StartResult(made.run_id, made.status, made.created)

    async def start_many(self, items: Sequence[Any], *, conn: Any = None) -> list[StartResult]:
        """All-or-nothing: every item is validated before anything is written, and the whole
        batch is one transaction (chunked statements inside it)."""
        if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
            raise InvalidArgument("items", f"must be a list of StartSpec or dicts, got {type(items).__name__}")
        specs = [self._spec(StartSpec.coerce(item, i), i) for i, item in enumerate(items)]
        core = await self._engine.client()
        made = await core.insert_runs(specs, conn=conn)
        if conn is None and len(specs) >= ANALYZE_AFTER:
            await core.admin_query("analyze_hot")
        return [StartResult(m.run_id, m.status, m.created) for m in made]

    async def result(self, run_id: str, *, timeout: float | None = None) -> Any:
        """The run's output once terminal; ``RunFailed``/``RunCanceled``/``RunNotFound``/``TimeoutError``.
        A run that continued as new stands for its chain: the chain's final run's outcome.

        Waiting costs nothing per waiter: every ``result()`` of the process shares one LISTEN
        connection and batched reads (see ``waiters.py``)."""
        rid = require_run_id(run_id)
        _check_timeout(timeout)
        core = await self._engine.client()
        deadline = None if timeout is None else time.monotonic() + timeout
        waiters = self._engine.waiters.here(core)
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            row = await waiters.terminal(rid, left)
            if row is None:
                raise RunNotFound(rid)
            if row.get("continued_to") is None:
                return _outcome(rid, row)
            rid = str(row["continued_to"])  # it continued as new: the chain's result is its last run's

    async def wait(self, run_id: str, *, step: str | None = None, signal: str | None = None,
                   timeout: float | None = None) -> None:
        """Return once ``step`` has finished or ``signal`` has arrived for the run.

        The run is watched while this waits: its progress is announced on the LISTEN
        connection (docs/signals.md), so the run's detail is re-read on a wake-up, not polled."""
        if (step is None) == (signal is None):
            raise InvalidArgument("step", "pass exactly one of step= or signal=")
        validate.lookup(step, "step")
        validate.lookup(signal, "signal")
        rid = require_run_id(run_id)
        _check_timeout(timeout)
        core = await self._engine.client()
        deadline = None if timeout is None else time.monotonic() + timeout
        async with self._engine.waiters.here(core).progress(rid) as changes, _Watch(core, rid) as watch:
            settled = time.monotonic() + WATCH_SETTLE  # one read after this one is due (WATCH_SETTLE)
            while True:
                read_at = time.monotonic()
                detail = await core.run_detail(rid)
                if detail is None:
                    raise RunNotFound(rid)
                if _reached(detail, step, signal):
                    return
                if detail["run"]["status"] in TERMINAL:
                    raise RunFailed(rid, Code.STEP_FAILED, f"run ended {detail['run']['status']} before that point")
                remaining = WATCH_TTL if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"run {rid} did not reach {step or signal} within {timeout}s")
                await watch.renew()
                wait = min(remaining, WATCH_TTL / 2)
                if read_at < settled:
                    wait = min(wait, max(settled - time.monotonic(), 0.0))
                await changes.next(wait)


class _Watch:
    """A ``watches`` row for one ``wait()`` call (migration 0005): while it lives, the run's
    step records and signal deliveries send ``p <run id>`` wake-ups."""

    def __init__(self, core: Core, run_id: str) -> None:
        self._core = core
        self._run_id = run_id
        self._watcher = str(uuid.uuid4())
        self._renewed = 0.0

    async def renew(self) -> None:
        """(Re)write the watch when half its life has gone by."""
        if time.monotonic() - self._renewed >= WATCH_TTL / 2:
            await self._core.admin_query("watch_run", self._run_id, self._watcher, WATCH_TTL)
            self._renewed = time.monotonic()

    async def __aenter__(self) -> _Watch:
        await self.renew()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # a watch left behind (the database is down now) expires on its own
        with contextlib.suppress(IterflowError):
            await self._core.admin_query("unwatch_run", self._run_id, self._watcher)


def _check_timeout(timeout: Any) -> None:
    """``None`` (wait forever) or a finite number of seconds, at most ``MAX_DURATION``."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= MAX_WAIT:
        raise InvalidArgument("timeout", f"must be None or seconds from 0 to {MAX_WAIT:g}, "
                                         f"got {validate.show(timeout)}")


def _reached(detail: dict[str, Any], step: str | None, signal: str | None) -> bool:
    if step is not None:
        return any(s["name"] == step and s["kind"] == "step" and s["status"] == "done" for s in detail["steps"])
    return any(s["name"] == signal for s in detail["signals"])


def _outcome(run_id: str, row: dict[str, Any]) -> Any:
    if row["status"] == "done":
        return row["output"]
    error = row["error"] or {}
    if row["status"] == "canceled":
        raise RunCanceled(run_id, str(error.get("message") or row.get("cancel_reason") or "canceled"))
    raise RunFailed(run_id, str(error.get("code") or Code.STEP_FAILED), str(error.get("message") or ""), error)


class SyncHandle:
    """``handle.sync``: ``start``/``start_many``/``result``/``wait``, blocking."""

    def __init__(self, runner: CoroutineRunner, handle: FlowHandle) -> None:
        self._runner = runner
        self._handle = handle

    def start(self, input: Any = None, *, idempotency_key: str | None = None, tags: Sequence[str] = (),
              delay: DurationLike | None = None, priority: int = 0, key: str | None = None,
              conn: Any = None, debounce: DurationLike | None = None) -> StartResult:
        return self._runner.run(self._handle.start(input, idempotency_key=idempotency_key, tags=tags, delay=delay,
                                                   priority=priority, key=key, conn=conn, debounce=debounce))

    def start_many(self, items: Sequence[Any], *, conn: Any = None) -> list[StartResult]:
        return self._runner.run(self._handle.start_many(items, conn=conn))

    def result(self, run_id: str, *, timeout: float | None = None) -> Any:
        return self._runner.run(self._handle.result(run_id, timeout=timeout))

    def wait(self, run_id: str, *, step: str | None = None, signal: str | None = None,
             timeout: float | None = None) -> None:
        self._runner.run(self._handle.wait(run_id, step=step, signal=signal, timeout=timeout))
