"""The Rust core: the core protocol on ``iterflow._core`` (tokio, tokio-postgres).

Same behaviour and return types as ``cores/python.py``; the hot path differs: step records,
suspensions, completions, events and signal resolutions are group-committed by a writer task,
claims fetch the history in the same statement, and one LISTEN connection serves every
waiter of the process. Importing this module raises ImportError when the extension is missing
(``create_engine(core="auto")`` relies on that). The extension's values are named classes
typed in ``iterflow/_core.pyi``; this module turns them into the protocol's types of
``cores/base.py`` by field name.

Tuning knobs for benchmarks (environment): ``ITERFLOW_RUST_WRITER_SHARDS`` (concurrent
group-commit transactions, default 1; 2 doubles the transactions per step, which costs more
database CPU than it saves in commit waits on a small machine) and ``ITERFLOW_RUST_MAX_BATCH``
(ops per transaction, 256).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any, Concatenate, ParamSpec

from .. import _core, sql  # _core: ImportError when the extension is not built
from .._core import Core as _RustCore
from .._core import CoreError
from .._core import Json as _Json
from .._core import Pump as _RustPump
from ..errors import EngineStateError, SchemaMismatch
from .base import (
    ADMIN_QUERIES,
    INSERT_CHUNK,
    ChangedRuns,
    ClaimedRun,
    Created,
    Handoff,
    JsonArg,
    LeaseState,
    Resolved,
    RunFilter,
    RunSpec,
    StepRecord,
    StoredStep,
    Woken,
    filter_args,
    rows_json,
)
from .pg import insert_on_connection

_UTC = UTC
_P = ParamSpec("_P")
# A binding of ``_core.Core``: takes the pump and a ticket, answers through the pump.
_Call = Callable[Concatenate[_RustPump, int, _P], None]


def _fields_of(cls: type[Any], *, but: str = "") -> attrgetter[Any]:
    """Reads the fields of ``cls`` (a protocol dataclass) by name from its extension twin, in
    the dataclass's order: one C call per row on the hot path, no positional contract."""
    return attrgetter(*(f.name for f in dataclasses.fields(cls) if f.name != but))


_RUN_FIELDS = _fields_of(ClaimedRun, but="history")
_STEP_FIELDS = _fields_of(StepRecord)
_STORED_FIELDS = _fields_of(StoredStep)
_RESOLVED_FIELDS = _fields_of(Resolved)
_CHANGED_FIELDS = _fields_of(ChangedRuns)

__all__ = ["CoreError", "RustCore", "check_connection"]


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is _UTC:
        return value
    return value.astimezone(_UTC)


def _find_json(specs: Sequence[RunSpec]) -> str:
    return json.dumps([
        {"ord": i, "id": s.id, "name": s.name, "version": s.version, "idempotency_key": s.idempotency_key,
         "parent_id": s.parent_id, "parent_key": s.parent_key}
        for i, s in enumerate(specs)
    ])


def _chunks(specs: Sequence[RunSpec]) -> list[tuple[str, str, int]]:
    out = []
    for i in range(0, len(specs), INSERT_CHUNK):
        part = specs[i:i + INSERT_CHUNK]
        out.append((rows_json(part), _find_json(part), len(part)))
    return out


def _reraise(exc: CoreError) -> BaseException:
    """The typed iterflow error the Python core would raise for this core error."""
    if getattr(exc, "code", None) == "SCHEMA_MISMATCH":
        return SchemaMismatch(getattr(exc, "message", str(exc)))
    return exc


class _Pump:
    """Delivers the Rust core's results to one event loop.

    A call takes a ticket and returns at once; the calls made during one loop turn are handed
    to the runtime together (one ``flush`` at the end of the turn, one thread wake-up). The
    runtime queues each finished call in the Rust ``Pump`` and writes one byte to a pipe when
    the queue becomes non-empty. The loop watches the pipe and drains every finished call in
    one go, converting the values on this thread: runtime threads never take the GIL, and a
    burst of completions costs one wake-up.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.rust = _RustPump(self._w)  # takes ownership of the write end
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._flush_pending = False
        loop.add_reader(self._r, self._ready)
        self.closed = False

    def call(self, method: _Call[_P], *args: _P.args, **kwargs: _P.kwargs) -> tuple[int, asyncio.Future[Any]]:
        self._next += 1
        ticket = self._next
        fut = self.loop.create_future()
        self._waiting[ticket] = fut
        try:
            method(self.rust, ticket, *args, **kwargs)
        except BaseException:
            del self._waiting[ticket]
            raise
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)
        return ticket, fut

    def _flush(self) -> None:
        self._flush_pending = False
        self.rust.flush()

    def _ready(self) -> None:
        try:
            os.read(self._r, 4096)
        except (BlockingIOError, InterruptedError):
            pass
        for ticket, ok, value in self.rust.drain():
            fut = self._waiting.pop(ticket, None)
            if fut is None or fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def close(self) -> None:
        """Stop watching; the write end belongs to the Rust pump (closed when it is dropped,
        after the last call that could write to it has finished)."""
        if self.closed:
            return
        self.closed = True
        self.rust.flush()  # calls of this turn still run (their results are no longer awaited)
        if not self.loop.is_closed():
            self.loop.remove_reader(self._r)
        os.close(self._r)


class RustCore:
    """Core protocol on the Rust extension. It opens its own pool (a DSN, not a psycopg pool)."""

    name = "rust"

    def __init__(self, dsn: str | None, *, schema: str, pool_size: int, notify: bool,
                 application_name: str = "iterflow", listen_dsn: str | None = None,
                 prepared_statements: bool = True) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise ValueError("the Rust core needs a DSN")
        self.schema = sql.validate_schema_name(schema)
        self._q = sql.queries(schema)
        self._dsn = dsn
        self._pool_size = pool_size
        self._notify = notify
        self._application_name = application_name
        self._listen_dsn = listen_dsn
        self._prepared_statements = prepared_statements
        self._core: _RustCore | None = None
        self._pump: _Pump | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def open(self) -> None:
        if self._core is None:
            tuning = {k: int(v) for k, v in (
                ("writer_shards", os.environ.get("ITERFLOW_RUST_WRITER_SHARDS")),
                ("max_batch", os.environ.get("ITERFLOW_RUST_MAX_BATCH")),
            ) if v}
            self._core = _RustCore(
                self._dsn, self.schema, pool_size=self._pool_size, notify=self._notify,
                application_name=self._application_name, listen_dsn=self._listen_dsn,
                prepared_statements=self._prepared_statements, **tuning,
            )

    async def close(self) -> None:
        core = self._core
        if core is not None:
            await self._run(core.close)
            self._core = None
        if self._pump is not None and self._pump.loop is asyncio.get_running_loop():
            self._pump.close()
            self._pump = None

    def _pump_here(self) -> _Pump:
        loop = asyncio.get_running_loop()
        pump = self._pump
        if pump is None or pump.loop is not loop:
            if pump is not None and pump.loop.is_closed():
                pump.close()
            pump = self._pump = _Pump(loop)
        return pump

    def _run(self, method: _Call[_P], *args: _P.args, **kwargs: _P.kwargs) -> asyncio.Future[Any]:
        """Start ``method`` on the runtime now; the future resolves on this loop with the
        value the method's docstring in ``_core.pyi`` names."""
        return self._pump_here().call(method, *args, **kwargs)[1]

    async def _wait(self, method: _Call[_P], *args: _P.args, **kwargs: _P.kwargs) -> Any:
        """A cancellable call: cancelling the awaiting task aborts it on the runtime."""
        pump = self._pump_here()
        ticket, fut = pump.call(method, *args, **kwargs)
        try:
            return await fut
        except asyncio.CancelledError:
            pump.rust.cancel(ticket)
            raise

    @property
    def _c(self) -> _RustCore:
        if self._core is None:
            raise EngineStateError("the engine is stopped (its core is not open)")
        return self._core

    def stats(self) -> dict[str, Any]:
        """Writer batching, listener state, pool and timers (tests and benchmarks)."""
        return dict(self._c.stats())

    async def check_schema(self) -> None:
        try:
            await self._run(self._c.check_schema, sql.latest_version())
        except CoreError as exc:
            raise _reraise(exc) from None

    # -- client side ---------------------------------------------------------------------
    async def insert_runs(self, specs: Sequence[RunSpec], conn: Any = None) -> list[Created]:
        if not specs:
            return []
        if conn is not None:  # the caller's transaction lives on a psycopg connection
            return await insert_on_connection(self._q, conn, specs)
        wake = sorted({s.name for s in specs if s.delay_ms <= 0})
        made: list[_core.Created] = await self._run(self._c.insert_runs, _chunks(specs), wake)
        return _created(made, specs)

    async def deliver_signal(self, run_id: str, name: str, payload: str, key: str | None) -> str:
        return str(await self._run(self._c.deliver_signal, run_id, name, payload, key))

    async def start_debounced(self, spec: RunSpec, key: str, window_ms: int) -> Created:
        (row,) = await self._query(
            "debounce_start", spec.id, spec.name, spec.version, key, _Json(spec.input), list(spec.tags),
            spec.priority, window_ms,
        )
        return Created(str(row["run_id"]), str(row["status"]), bool(row["created"]))

    async def cancel(self, run_id: str, reason: str) -> int:
        return int(await self._run(self._c.cancel, run_id, reason))

    async def retry(self, run_id: str) -> str:
        return str(await self._run(self._c.retry, run_id))

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        row: dict[str, Any] | None = await self._run(self._c.get_run, run_id)
        return row

    async def run_detail(self, run_id: str) -> dict[str, Any] | None:
        detail: dict[str, Any] | None = await self._run(self._c.run_detail, run_id)
        return detail

    async def list_runs(
        self, flt: RunFilter, limit: int, cursor: tuple[datetime, str] | None
    ) -> list[dict[str, Any]]:
        name, statuses, tag, since, until = filter_args(flt, _utc)
        rows: list[dict[str, Any]] = await self._run(
            self._c.list_runs, name, statuses, tag, since, until,
            _utc(cursor[0]) if cursor else None, cursor[1] if cursor else None, limit,
        )
        return rows

    async def select_runs(self, flt: RunFilter, limit: int) -> list[str]:
        name, statuses, tag, since, until = filter_args(flt, _utc)
        ids: list[str] = await self._run(self._c.select_runs, name, statuses, tag, since, until, limit)
        return ids

    async def purge(self, run_ids: Sequence[str]) -> int:
        return int(await self._run(self._c.purge, list(run_ids)))

    async def listen(self) -> None:
        if self._core is not None:
            self._c.listen()

    async def changed_runs(self, timeout: float) -> ChangedRuns:
        changed: _core.ChangedRuns = await self._wait(self._c.changed_runs, float(timeout))
        return ChangedRuns(*_CHANGED_FIELDS(changed))

    async def wait_runs(self, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self._run(self._c.wait_runs, list(run_ids))
        return rows

    async def claim_woken(self, owner: str, lease_ms: int, limit: int, timeout: float) -> Woken:
        woken: _core.Woken = await self._wait(self._c.claim_woken, owner, lease_ms, limit, float(timeout))
        return Woken([_claimed(run) for run in woken.claimed],
                     [Handoff.from_notice(h.run_id, h.held_token, h.notice) for h in woken.handed])

    # -- worker side ---------------------------------------------------------------------
    async def claim(
        self, names: Sequence[str], limit: int, owner: str, lease_ms: int, wait: float | None = None
    ) -> list[ClaimedRun]:
        runs: list[_core.ClaimedRun] = await self._run(self._c.claim, list(names), limit, owner, lease_ms, wait)
        return [_claimed(run) for run in runs]

    async def claim_runs(
        self, run_ids: Sequence[str], owner: str, lease_ms: int, expected: Sequence[int]
    ) -> list[ClaimedRun]:
        runs: list[_core.ClaimedRun] = await self._run(
            self._c.claim_runs, list(run_ids), owner, lease_ms, list(expected))
        return [_claimed(run) for run in runs]

    async def record_step(self, run_id: str, rec: StepRecord, result: str | None, error: str | None) -> StoredStep:
        s: _core.StoredStep = await self._run(
            self._c.record_step, run_id, rec.key, rec.seq, rec.kind, rec.name, rec.status, result, error, rec.attempts,
            _utc(rec.deadline), rec.child_id,
        )
        return StoredStep(*_STORED_FIELDS(s))

    async def spawn_children(
        self, run_id: str, records: Sequence[StepRecord], children: Sequence[RunSpec]
    ) -> list[Created]:
        recs = [(r.key, r.seq, r.kind, r.name) for r in records]
        made: list[_core.Created] = await self._run(
            self._c.spawn_children, run_id, recs, _chunks(children), sorted({c.name for c in children})
        )
        return _created(made, children)

    async def resolve_signal(
        self, run_id: str, key: str, seq: int, name: str, deadline_passed: bool, timeout_error: str
    ) -> Resolved:
        r: _core.Resolved = await self._run(
            self._c.resolve_signal, run_id, key, seq, name, deadline_passed, timeout_error
        )
        return Resolved(*_RESOLVED_FIELDS(r))

    async def suspend(
        self, run_id: str, token: int, status: str, waiting: str, wake_at: datetime | None,
        attempts_delta: int | None,
    ) -> bool:
        return bool(await self._run(self._c.suspend, run_id, token, status, waiting, _utc(wake_at), attempts_delta))

    async def finish(self, run_id: str, token: int | None, status: str, output: str | None, error: str | None) -> bool:
        return bool(await self._run(self._c.finish, run_id, token, status, output, error))

    async def continue_run(self, run_id: str, token: int, new_id: str, input: str) -> bool:
        return bool(await self._run(self._c.continue_run, run_id, token, new_id, input))

    async def add_event(self, run_id: str, kind: str, data: str | None) -> None:
        await self._run(self._c.add_event, run_id, kind, data)

    async def acquire_permit(
        self, limit: str, key: str | None, run_id: str, step_key: str, lease_token: int, maximum: int
    ) -> tuple[bool, float | None, str]:
        (row,) = await self._query("acquire_permit", limit, key, run_id, step_key, lease_token, maximum)
        wait_ms = row["wait_ms"]
        return bool(row["granted"]), None if wait_ms is None else float(wait_ms) / 1000, str(row["permit_key"])

    async def release_permit(self, limit: str, key: str, run_id: str, step_key: str, maximum: int) -> None:
        await self._query("release_permit", limit, key, run_id, step_key, maximum)

    async def take_rate(
        self, limit: str, key: str | None, run_id: str, interval_ms: float, burst: int, horizon_ms: float
    ) -> tuple[bool, float]:
        (row,) = await self._query("take_rate", limit, key, run_id, float(interval_ms), burst, float(horizon_ms))
        return bool(row["granted"]), float(row["wait_ms"]) / 1000

    def limit_seen(self, channel: str) -> int:
        return self._c.limit_seen(channel)

    async def wait_limit(self, channel: str, seen: int, timeout: float) -> None:
        await self._wait(self._c.wait_limit, channel, seen, float(timeout))

    async def _query(self, name: str, *params: Any) -> list[dict[str, Any]]:
        """The rows of statement ``name``, through the extension's generic statement call (the
        step-limit and debounce statements: one function call each, nothing to batch)."""
        result: _core.QueryResult = await self._run(self._c.query, name, list(params))
        return result.rows

    async def heartbeat(self, leases: Sequence[tuple[str, int]], lease_ms: int) -> list[LeaseState]:
        if not leases:
            return []
        states: list[_core.LeaseState] = await self._run(
            self._c.heartbeat, [(r, int(t)) for r, t in leases], lease_ms
        )
        return [LeaseState(run_id=s.run_id, held=s.held, cancel_reason=s.cancel_reason) for s in states]

    async def expire_leases(self, limit: int) -> int:
        return int(await self._run(self._c.expire_leases, limit))

    async def next_due(self, names: Sequence[str]) -> float | None:
        due: float | None = await self._run(self._c.next_due, list(names))
        return due

    async def requeue_parked(self, names: Sequence[str]) -> int:
        return int(await self._run(self._c.requeue_parked, list(names)))

    def nudge(self) -> None:
        if self._core is not None:  # a hint: nothing to wake once closed
            self._core.nudge()

    async def prune(self, events_ms: int | None, runs_ms: int | None, batch: int) -> dict[str, int] | None:
        pruned: dict[str, int] | None = await self._run(self._c.prune, events_ms, runs_ms, batch)
        return pruned

    async def pending_work(self, names: Sequence[str] | None) -> int:
        return int(await self._run(self._c.pending_work, list(names) if names is not None else None))

    async def admin_query(self, name: str, *params: Any) -> list[dict[str, Any]]:
        if name not in ADMIN_QUERIES:
            raise ValueError(f"not an admin statement: {name}")
        args = [_param(p) for p in params]
        result: _core.QueryResult = await self._run(self._c.query, name, args)
        if not result.has_columns:
            return [{"rowcount": result.rowcount}]
        return result.rows

    async def reconcile(self, stale_ms: int) -> dict[str, int] | None:
        counts: dict[str, int] | None = await self._run(self._c.reconcile, stale_ms)
        return counts


async def check_connection(dsn: str) -> str:
    """Connect to ``dsn``, run ``SHOW server_version`` and return it (a one-off pump)."""
    pump = _Pump(asyncio.get_running_loop())
    try:
        version: str = await pump.call(_core.check_connection, dsn)[1]
        return version
    finally:
        pump.close()


def _claimed(run: _core.ClaimedRun) -> ClaimedRun:
    """The protocol's ``ClaimedRun`` from the extension's, field by field (by name)."""
    claimed = ClaimedRun(*_RUN_FIELDS(run))
    claimed.history = {s.key: StepRecord(*_STEP_FIELDS(s)) for s in run.history}
    return claimed


def _created(made: list[_core.Created], specs: Sequence[RunSpec]) -> list[Created]:
    # a run found by its own id was written by this very start (repeated after its commit
    # landed unacknowledged): created, as the first attempt would have said
    return [Created(run_id=c.run_id, status=c.status, created=c.created or c.run_id == spec.id)
            for c, spec in zip(made, specs, strict=True)]


def _param(value: Any) -> Any:
    if isinstance(value, JsonArg):
        return _Json(value.text)
    if isinstance(value, datetime):
        return _utc(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    return value
