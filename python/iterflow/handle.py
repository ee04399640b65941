"""``FlowHandle``: start runs of one ``name@version`` and await them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import validate
from .cores.base import RunSpec
from .durations import MAX_DURATION, parse_duration
from .errors import Code, InvalidArgument, RunCanceled, RunFailed, RunNotFound
from .flow import check_name, check_version
from .schemas import Schema
from .sync import SyncHandle
from .types import TERMINAL, StartResult, StartSpec, run_id_of

if TYPE_CHECKING:
    from .engine import Engine
    from .flow import Flow

POLL = 1.0
# A start_many this large refreshes the hot tables' statistics (not on a caller's connection:
# their transaction is theirs); autovacuum would get there too, but up to a minute later.
ANALYZE_AFTER = 1000
MAX_WAIT = MAX_DURATION.total_seconds()


class FlowHandle:
    """Starts and awaits runs. Enqueue-only handles (``engine.handle``) need no body."""

    def __init__(self, engine: Engine, name: str, version: int, input_schema: Schema | None,
                 flow: Flow | None = None) -> None:
        self._engine = engine
        self.name = check_name(name, "name")
        self.version = check_version(version)
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
        rt = self._engine.runtime
        key = validate.idempotency_key(item.idempotency_key, f"{where}idempotency_key")
        tags = validate.tags(item.tags, f"{where}tags")
        priority = validate.integer(item.priority, f"{where}priority", -(2**31), 2**31 - 1)
        delay = parse_duration(item.delay, field=f"{where}delay") if item.delay is not None else None
        return RunSpec(
            id=rt.new_id(), name=self.name, version=self.version, input=rt.encode_input(self, item.input),
            idempotency_key=key, tags=tags, priority=priority,
            delay_ms=int(delay.total_seconds() * 1000) if delay else 0,
        )

    async def start(self, input: Any = None, *, idempotency_key: str | None = None, tags: Sequence[str] = (),
                    delay: Any = None, priority: int = 0, conn: Any = None) -> StartResult:
        """Create a run (or return the existing one for this idempotency key).

        With ``conn`` the run is written inside the caller's open transaction: it commits or
        rolls back with it, and workers see it only after commit.
        """
        spec = self._spec(StartSpec(input, idempotency_key, tags, delay, priority))
        core = await self._engine.client()
        (made,) = await core.insert_runs([spec], conn=conn)
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
        """The run's output once terminal; ``RunFailed``/``RunCanceled``/``RunNotFound``/``TimeoutError``."""
        rid = run_id_of(run_id)
        if rid is None:
            raise RunNotFound(run_id)
        run_id = rid
        _check_timeout(timeout)
        core = await self._engine.client()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            row = await core.get_run(run_id)
            if row is None:
                raise RunNotFound(run_id)
            if row["status"] in TERMINAL:
                return _outcome(run_id, row)
            remaining = POLL if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"run {run_id} is still {row['status']} after {timeout}s")
            await core.wait_run_change(run_id, min(remaining, POLL))

    async def wait(self, run_id: str, *, step: str | None = None, signal: str | None = None,
                   timeout: float | None = None) -> None:
        """Return once ``step`` has finished or ``signal`` has arrived for the run."""
        if (step is None) == (signal is None):
            raise InvalidArgument("step", "pass exactly one of step= or signal=")
        validate.lookup(step, "step")
        validate.lookup(signal, "signal")
        rid = run_id_of(run_id)
        if rid is None:
            raise RunNotFound(run_id)
        run_id = rid
        _check_timeout(timeout)
        core = await self._engine.client()
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.01
        while True:
            detail = await core.run_detail(run_id)
            if detail is None:
                raise RunNotFound(run_id)
            if _reached(detail, step, signal):
                return
            if detail["run"]["status"] in TERMINAL:
                raise RunFailed(run_id, Code.STEP_FAILED, f"run ended {detail['run']['status']} before that point")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} did not reach {step or signal} within {timeout}s")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)


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
