"""The engine facade: configuration, registration, lifecycle and the client calls."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal as signal_module
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import codec, cron, fleet, validate
from . import step_limits as step_limits_module
from .chain import last_run
from .config import Limits, Retention
from .cores.base import Core, RunFilter, StepRecord
from .cores.resilient import ResilientCore
from .durations import MAX_DURATION, DurationLike, format_duration, parse_duration
from .errors import (
    Code,
    CoreUnavailable,
    EngineStateError,
    InvalidArgument,
    RunNotFound,
    ValidationFailed,
)
from .explain import explain_run, limit_of
from .faults import RetryPolicy
from .flow import Flow
from .handle import FlowHandle
from .observe import HOOKS, Hooks
from .schemas import Schema
from .services import ExecutionServices
from .sql import validate_schema_name
from .step_limits import StepLimits
from .sticky import DEFAULT_BYTES, DEFAULT_RUNS, DEFAULT_WINDOW_MS, StickyCache
from .sync import SyncEngine
from .types import (
    STATUSES,
    TERMINAL,
    Explanation,
    RetryResult,
    Run,
    RunDetail,
    RunPage,
    RunSummary,
    SignalResult,
    Waiting,
    WorkerInfo,
    decode_cursor,
    encode_cursor,
    require_run_id,
    run_id_of,
)
from .waiters import WaiterRegistry
from .worker import Worker

MAX_PAGE = 500
# The prefix of the idempotency key engine.signal makes up when the caller passes none.
AUTO_SIGNAL_KEY = "auto:"
# The ranges of the engine options (docs/guide.md § 3 lists them with their defaults).
CORES = ("auto", "rust", "python")
MAX_CONCURRENCY = 10_000
# max_connections: the LISTEN connection and two pooled ones (retention holds its lock on one
# while it deletes on another), at most what a large
# server allows (the Rust pool's own ceiling is higher)
CONNECTIONS_RANGE = (3, 1_000)
MAX_RUN_ATTEMPTS = 1_000_000
LEASE_RANGE = (timedelta(milliseconds=500), timedelta(days=1))
POLL_RANGE = (timedelta(milliseconds=10), timedelta(hours=1))
SHUTDOWN_RANGE = (timedelta(), timedelta(days=1))
RETRY_TIMEOUT_RANGE = (timedelta(), timedelta(days=1))
STEP_TIMEOUT_RANGE = (timedelta(milliseconds=1), MAX_DURATION)
# bulk calls (cancel_many, retry_many, purge, check) and prune batches
MAX_BULK = 1_000_000
# the sticky cache (docs/replay.md, "Sticky execution"): held runs, their memory, the window
MAX_STICKY_RUNS = 1_000_000
STICKY_BYTES_RANGE = (0, 1 << 40)
STICKY_WINDOW_RANGE = (timedelta(), timedelta(minutes=10))
MAX_PRUNE_BATCH = 100_000
FILTER_KEYS = ("name", "status", "tag", "since", "until")


@dataclass(frozen=True)
class Settings:
    concurrency: int
    lease: Any
    poll_interval: float
    reconcile_interval: float | None
    shutdown_timeout: float
    sticky_cache: int = DEFAULT_RUNS
    sticky_cache_bytes: int = DEFAULT_BYTES
    sticky_window_ms: int = DEFAULT_WINDOW_MS


def _duration_in(value: Any, field: str, low: timedelta, high: timedelta) -> timedelta:
    duration = parse_duration(value, field=field)
    if not low <= duration <= high:
        raise InvalidArgument(
            field, f"must be from {format_duration(low)} to {format_duration(high)}, got {validate.show(value)}"
        )
    return duration


def _check_dsn(value: Any, field: str) -> None:
    """A DSN that libpq could parse (a malformed one is a mistake to say now, not a connection
    fault to retry until the bound)."""
    validate.text(value, field)
    try:
        conninfo_to_dict(value)
    except psycopg.ProgrammingError as exc:
        raise InvalidArgument(field, f"not a valid PostgreSQL DSN: {exc}") from None


def _check_metrics(metrics: Any) -> None:
    """A dict names hooks: an unknown name or a non-callable is a typo, said now (objects are
    looked up by attribute, so they may carry anything else)."""
    if isinstance(metrics, Mapping):
        for name, hook in metrics.items():
            if name not in HOOKS:
                raise InvalidArgument(f"metrics.{name}", f"unknown hook; known hooks: {', '.join(HOOKS)}")
            if not callable(hook):
                raise InvalidArgument(f"metrics.{name}", f"must be callable, got {validate.show(hook)}")


def _pick_core(core: str, dsn: str | None, pool: Any, schema: str, size: int, notify: bool,
               log: logging.Logger, retry_timeout: float = 30.0, listen_dsn: str | None = None,
               prepared_statements: bool = True) -> Core:
    if core in ("auto", "rust"):
        try:
            from .cores.rust import RustCore
        except ImportError as exc:
            if core == "rust":
                raise CoreUnavailable(f"core='rust' needs the iterflow._core extension: {exc}") from exc
        else:
            if pool is not None and not isinstance(pool, str):
                if core == "rust":
                    raise InvalidArgument("pool", "the Rust core opens its own pool: pass a DSN, not a psycopg pool")
            else:
                log.info("iterflow: using the Rust core")
                return RustCore(dsn or pool, schema=schema, pool_size=size, notify=notify,
                                listen_dsn=listen_dsn, prepared_statements=prepared_statements)
    from .cores.python import ACQUIRE_TIMEOUT, PythonCore

    log.info("iterflow: using the pure-Python core")
    if isinstance(pool, str):
        dsn, pool = pool, None
    # one wait for a pooled connection never outlasts the retry bound (a stopped server must
    # not hold a call for the pool's own 30 s timeout)
    return PythonCore(dsn, pool=pool, schema=schema, pool_size=size, notify=notify,
                      acquire_timeout=max(min(retry_timeout, ACQUIRE_TIMEOUT), 0.1),
                      listen_dsn=listen_dsn, prepared_statements=prepared_statements)


def _pool_size(max_connections: int, notify: bool) -> int:
    """The pool's share of the connection cap: the LISTEN connection takes one. Concurrency
    does not size it: runs in flight queue for a connection (docs/scaling.md)."""
    return max_connections - 1 if notify else max_connections


class Engine:
    """Create with ``create_engine``. A process that never calls ``listen()`` executes nothing."""

    def __init__(self, dsn: str | None = None, *, pool: Any = None, core: str = "auto", schema: str = "workflow",
                 concurrency: int = 5, max_run_attempts: int = 100, default_step_timeout: Any = None,
                 lease: Any = "30s", retention: Any = None, limits: Any = None, metrics: Any = None,
                 logger: logging.Logger | None = None, notify: bool = True, reconciler: bool = True,
                 drift: str = "park", poll_interval: Any = None, shutdown_timeout: Any = "10s",
                 database_retry_timeout: Any = "30s", max_connections: int = 10,
                 listen_dsn: str | None = None, prepared_statements: bool = True, step_limits: Any = None,
                 sticky_cache: int = DEFAULT_RUNS, sticky_cache_bytes: int = DEFAULT_BYTES,
                 sticky_window: Any = f"{DEFAULT_WINDOW_MS}ms") -> None:
        self._options = dict(
            dsn=dsn, pool=pool, core=core, schema=schema, concurrency=concurrency, max_run_attempts=max_run_attempts,
            default_step_timeout=default_step_timeout, lease=lease, retention=retention, limits=limits,
            metrics=metrics, logger=logger, notify=notify, reconciler=reconciler, drift=drift,
            poll_interval=poll_interval, shutdown_timeout=shutdown_timeout,
            database_retry_timeout=database_retry_timeout, max_connections=max_connections,
            listen_dsn=listen_dsn, prepared_statements=prepared_statements, step_limits=step_limits,
            sticky_cache=sticky_cache, sticky_cache_bytes=sticky_cache_bytes, sticky_window=sticky_window,
        )
        # every option is checked here, before anything is built (ranges: docs/guide.md § 3)
        if dsn is None and pool is None:
            raise InvalidArgument("dsn", "pass a DSN or pool= (see iterflow.embedded.database_url() for local use)")
        if dsn is not None:
            validate.text(dsn, "dsn")
        # behind a transaction-mode pooler (docs/operations.md, "Behind PgBouncer"): LISTEN
        # needs a session of its own, and named statements do not survive a server switch
        if listen_dsn is not None:
            _check_dsn(listen_dsn, "listen_dsn")
        prepared_statements = validate.flag(prepared_statements, "prepared_statements")
        if not isinstance(core, str) or core not in CORES:
            raise InvalidArgument("core", f"must be 'auto', 'rust' or 'python', got {validate.show(core)}")
        self.schema = validate_schema_name(schema)
        if logger is not None and not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
            raise InvalidArgument("logger", f"must be a logging.Logger (or LoggerAdapter), got {validate.show(logger)}")
        self.log = logger if logger is not None else logging.getLogger("iterflow")
        notify = validate.flag(notify, "notify")
        reconciler = validate.flag(reconciler, "reconciler")
        concurrency = validate.integer(concurrency, "concurrency", 1, MAX_CONCURRENCY)
        max_connections = validate.integer(max_connections, "max_connections", *CONNECTIONS_RANGE)
        max_run_attempts = validate.integer(max_run_attempts, "max_run_attempts", 1, MAX_RUN_ATTEMPTS)
        if not isinstance(drift, str) or drift not in validate.DRIFT_MODES:
            raise InvalidArgument("drift", f"must be 'park' or 'fail', got {validate.show(drift)}")
        lease_td = _duration_in(lease, "lease", *LEASE_RANGE)
        poll = _duration_in(poll_interval, "poll_interval", *POLL_RANGE).total_seconds() \
            if poll_interval is not None else (1.0 if notify else 0.25)
        if default_step_timeout is not None:
            default_step_timeout = _duration_in(default_step_timeout, "default_step_timeout", *STEP_TIMEOUT_RANGE)
        limits = Limits.coerce(limits)
        named_limits = step_limits_module.coerce(step_limits)
        _check_metrics(metrics)
        retry_timeout = _duration_in(database_retry_timeout, "database_retry_timeout",
                                     *RETRY_TIMEOUT_RANGE).total_seconds()
        self.settings = Settings(
            concurrency=concurrency, lease=lease_td, poll_interval=poll,
            reconcile_interval=max(lease_td.total_seconds(), 5.0) if reconciler else None,
            shutdown_timeout=_duration_in(shutdown_timeout, "shutdown_timeout", *SHUTDOWN_RANGE).total_seconds(),
            sticky_cache=validate.integer(sticky_cache, "sticky_cache", 0, MAX_STICKY_RUNS),
            sticky_cache_bytes=validate.integer(sticky_cache_bytes, "sticky_cache_bytes", *STICKY_BYTES_RANGE),
            sticky_window_ms=int(_duration_in(sticky_window, "sticky_window", *STICKY_WINDOW_RANGE)
                                 .total_seconds() * 1000),
        )
        self.retention = Retention.coerce(retention)
        self._caller_pool = pool
        # every core call goes through the retry layer: a database fault is retried for up to
        # database_retry_timeout, then raised as DatabaseUnavailable (never a driver's error)
        self.core: Core = ResilientCore(
            _pick_core(core, dsn, pool, schema, _pool_size(max_connections, notify), notify, self.log, retry_timeout,
                       listen_dsn, prepared_statements),
            RetryPolicy(timeout=retry_timeout), self.log,
        )
        hooks = Hooks(metrics, self.log)
        self.services = ExecutionServices(
            core=self.core, limits=limits, hooks=hooks, log=self.log,
            default_step_timeout=default_step_timeout, max_run_attempts=max_run_attempts, drift=drift,
            step_limits=StepLimits(named_limits, self.core, hooks),
        )
        self.flows: dict[tuple[str, int], Flow] = {}  # the registry: what this process can execute
        self._handles: dict[tuple[str, int], FlowHandle] = {}
        self.crons: dict[str, cron.Cron] = {}
        self._crons_registered = False
        self._worker: Worker | None = None
        self._open = False
        self._open_lock: asyncio.Lock | None = None
        self._sync: SyncEngine | None = None
        self._sync_lock = threading.Lock()
        self.waiters = WaiterRegistry()  # every result()/wait() of this engine (waiters.py)

    # -- lifecycle -----------------------------------------------------------------------------
    def register(self, flow: Flow) -> FlowHandle:
        if not isinstance(flow, Flow):
            raise InvalidArgument("flow", f"expected a Flow (from flow(...).build() or @define_flow), got {flow!r}")
        if self._worker is not None:
            raise EngineStateError(f"register({flow.ref}) after listen(): register every flow before listening")
        key = (flow.name, flow.version)
        if key in self.flows:
            raise EngineStateError(f"{flow.ref} is already registered")
        self.flows[key] = flow
        handle = FlowHandle(self, flow.name, flow.version, flow.input_schema, flow)
        self._handles[key] = handle
        return handle

    def define_cron(self, name: str, schedule: str, flow: Flow | FlowHandle, input: Any = None, *,
                    timezone: str = "UTC", overlap: str = "skip", jitter: Any = None, backfill: Any = None) -> None:
        """Start ``flow`` on a schedule (docs/operations.md §6). Define before ``listen()``; workers fire it."""
        validate.name(name, "name")
        if self._worker is not None:
            raise EngineStateError(f"define_cron({name!r}) after listen(): define crons before listening")
        if name in self.crons:
            raise EngineStateError(f"cron {name!r} is already defined")
        self.crons[name] = cron.define(self.services, name, schedule, flow, input, timezone=timezone,
                                       overlap=overlap, jitter=jitter, backfill=backfill)

    async def list_crons(self) -> list[dict[str, Any]]:
        """Every cron in the database; ``defined_here=False`` marks ones no longer in this code."""
        core = await self.client()
        rows = await core.admin_query("list_crons")
        return [dict(row, defined_here=row["name"] in self.crons) for row in rows]

    async def remove_cron(self, name: str) -> bool:
        """Delete a cron that no longer exists in code (it would otherwise be reported forever)."""
        validate.lookup(name, "name")
        core = await self.client()
        (row,) = await core.admin_query("delete_cron", name)
        return bool(row["rowcount"])

    async def fire_crons(self, now: datetime | None = None) -> int:
        """One scheduler tick (workers call this on their own); ``now`` overrides the DB clock."""
        core = await self.client()
        if not self._crons_registered:
            await self._register_crons(core)
        return await cron.tick(core, self.services, self.crons, now)

    def handle(self, name: str, version: int = 1, input_schema: Any = None) -> FlowHandle:
        """An enqueue-only handle: start and await a flow whose body lives on other processes."""
        # checked before the lookup: True == 1, so (name, True) would find version 1's handle
        registered = self._handles.get((validate.name(name, "name"), validate.version(version)))
        if registered is not None:
            return registered
        return FlowHandle(self, name, version, Schema.of(input_schema))

    @property
    def sync(self) -> SyncEngine:
        """The blocking client API, for code without an event loop (created on first use)."""
        with self._sync_lock:
            if self._sync is None:
                self._sync = SyncEngine(self.clone_client())
            return self._sync

    def clone_client(self) -> Engine:
        """A client-only engine with this configuration and these flows' schemas (never listens).

        A caller's async pool belongs to the caller's loop, so the clone opens its own from the DSN.
        """
        options = dict(self._options)
        pool = options.pop("pool")
        if options["dsn"] is None:
            options["dsn"] = pool if isinstance(pool, str) else getattr(pool, "conninfo", None)
        clone = Engine(**options)
        clone.flows.update(self.flows)
        for key, handle in self._handles.items():
            clone._handles[key] = FlowHandle(clone, handle.name, handle.version, handle.input_schema, handle.flow)
        return clone

    async def client(self) -> Core:
        """The core, opened on first use (create_engine is synchronous)."""
        if not self._open:
            if self._open_lock is None:
                self._open_lock = asyncio.Lock()
            async with self._open_lock:
                if not self._open:
                    await self.core.open()
                    try:
                        await self.core.check_schema()
                    except BaseException:
                        # stop() only closes an open engine: do not leak the pool and LISTEN task
                        await self.core.close()
                        raise
                    self._open = True
        return self.core

    async def listen(self) -> None:
        """Start working: claim, renew leases, fire timers, reconcile. Idempotent."""
        if self._worker is not None:
            return
        core = await self.client()
        if not self.flows:
            self.log.warning("iterflow: listen() with no registered flows; this process will execute nothing")
        s = self.settings
        self._startup_warnings()
        await self._register_crons(core)
        self._worker = Worker(
            self.services, self.flows, concurrency=s.concurrency, lease=s.lease, poll_interval=s.poll_interval,
            reconcile_interval=s.reconcile_interval, shutdown_timeout=s.shutdown_timeout, retention=self.retention,
            cron_tick=self.fire_crons if self.crons else None, notify=bool(self._options["notify"]),
            sticky=StickyCache(s.sticky_cache, s.sticky_cache_bytes, self.services.hooks) if s.sticky_cache else None,
            sticky_window_ms=s.sticky_window_ms,
        )
        await self._worker.start()

    async def _register_crons(self, core: Core) -> None:
        await cron.register(core, self.crons, datetime.now(UTC))
        self._crons_registered = True
        stale = [r["name"] for r in await core.admin_query("list_crons") if r["name"] not in self.crons]
        if stale:
            self.log.warning("iterflow: crons %s exist in the database but not in this code; "
                             "remove them with engine.remove_cron(name)", stale)

    def _startup_warnings(self) -> None:
        """Configurations that work in a demo and hurt in production, said once at listen()."""
        pool_max = getattr(self._caller_pool, "max_size", None)
        if isinstance(pool_max, int) and pool_max < self.settings.concurrency:
            self.log.warning(
                "iterflow: pool max_size=%d is smaller than concurrency=%d; runs will queue for connections",
                pool_max, self.settings.concurrency,
            )
        if self.services.default_step_timeout is None:
            self.log.warning("iterflow: no default_step_timeout; a hung step holds its slot until it returns")
        if self.retention.runs_older_than is None and self.retention.events_older_than is None:
            self.log.warning("iterflow: no retention configured; finished runs are kept forever")

    async def stop(self) -> None:
        """Graceful: stop claiming, let in-flight steps finish (or abort them at the deadline)."""
        if self._worker is not None:
            await self._worker.stop()
        await self.waiters.close()
        if self._open:
            await self.core.close()
            self._open = False

    async def __aenter__(self) -> Engine:
        await self.listen()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def pause(self) -> None:
        """Stop claiming new runs; in-flight work finishes."""
        if self._worker is not None:
            self._worker.paused = True

    def resume(self) -> None:
        if self._worker is not None:
            self._worker.paused = False
            self._worker.nudge()

    # -- client calls ------------------------------------------------------------------------------
    async def signal(self, run_id: str, name: str, payload: Any = None, *,
                     idempotency_key: str | None = None) -> SignalResult:
        """Deliver a signal (docs/signals.md); validated at delivery when the flow declared a schema."""
        run_id = require_run_id(run_id)
        name = validate.name(name, "name")
        idempotency_key = validate.idempotency_key(idempotency_key)
        core = await self.client()
        schema = await self._declared_signal_schema(core, run_id, name)
        if schema is not None:
            try:
                schema.validate(payload, code=Code.SIGNAL_PAYLOAD_INVALID, what=f"signal {name!r} payload")
            except ValidationFailed as exc:
                self.services.hooks.emit("signal_delivered", "invalid_payload")
                return SignalResult("invalid_payload", issues=tuple(exc.issues))
        encoded = codec.encode(payload, field="payload", limit=self.services.limits.max_signal_payload_bytes,
                               code=Code.SIGNAL_PAYLOAD_TOO_LARGE)
        # without a key of the caller's, one is made up: a delivery the core repeats after its
        # commit went unacknowledged (the connection dropped) then finds its own row
        key = idempotency_key if idempotency_key is not None else f"{AUTO_SIGNAL_KEY}{uuid.uuid4().hex}"
        target = run_id
        while True:
            outcome = await core.deliver_signal(target, name, encoded, key)
            kind, _, cursor_key = outcome.partition(" ")
            if kind == "not_found":
                raise RunNotFound(run_id)
            if idempotency_key is None and kind in ("duplicate", "closed"):
                # only this call knows that key: a duplicate means that its first attempt stored
                # the signal, and so may a `closed` (the run took the signal and finished before
                # the repeat): what became of it is read back
                kind, cursor_key = await self._own_delivery(core, target, name, key) or (kind, cursor_key)
            if kind != "closed":
                break
            # a run that continued as new stands for its chain: the signal goes to its live run
            last = await last_run(core, target)
            if last is None or last == target:
                break
            target = last
        self.services.hooks.emit("signal_delivered", kind)
        if kind == "delivered" and self._worker is not None and not self._worker.notify:
            # a run this process holds goes on without a replay (with notifications, the
            # delivery hands it over, or announces it, to its holder: claim_woken)
            self._worker.wake_held(run_id)
        return SignalResult(kind, cursor_key or None)

    @staticmethod
    async def _own_delivery(core: Core, run_id: str, name: str, key: str) -> tuple[str, str] | None:
        """What a delivery whose first attempt committed unacknowledged did, read back (None:
        it stored nothing). Its payload was consumed, or a suspended run waits for that name
        with nothing older of it queued (the run is woken and takes it): ``delivered``; else
        it waits in the inbox: ``buffered``."""
        detail = await core.run_detail(run_id)
        own = next((s for s in detail["signals"] if s["idempotency_key"] == key), None) if detail else None
        if detail is None or own is None:
            return None
        if own["consumed_by"]:
            return "delivered", str(own["consumed_by"])
        run = detail["run"]
        waiting = (run.get("waiting") or {}).get("signals") or {}
        older = any(s["name"] == name and s["consumed_at"] is None and s["id"] < own["id"] for s in detail["signals"])
        if run["status"] not in ("running", *TERMINAL) and name in waiting and not older:
            return "delivered", str(waiting[name])
        return "buffered", ""

    async def _declared_signal_schema(self, core: Core, run_id: str, name: str) -> Schema | None:
        if not any(name in f.signal_schemas for f in self.flows.values()):
            return None
        row = await core.get_run(run_id)
        if row is None:
            raise RunNotFound(run_id)
        flow = self.flows.get((row["name"], row["version"]))
        return flow.signal_schemas.get(name) if flow is not None else None

    async def cancel(self, run_id: str, reason: str | None = None) -> None:
        """Cancel a run and all its live descendants (sticky; a no-op on a terminal run). A run
        that continued as new stands for its chain: the chain's live run is canceled."""
        run_id = require_run_id(run_id)
        reason = validate.reason(reason) or "canceled"
        core = await self.client()
        target = run_id
        while not await core.cancel(target, reason):
            # nothing live under this id: no such run, a terminal one, or one that continued
            # (perhaps while this call ran: then its successor is the one to cancel)
            last = await last_run(core, target)
            if last is None:
                raise RunNotFound(run_id)
            if last == target:
                break
            target = last
        if self._worker is not None:
            self._worker.abort_local(target, reason)

    async def retry(self, run_id: str) -> RetryResult:
        rid = run_id_of(run_id)
        if rid is None:
            return RetryResult("missing")
        core = await self.client()
        return RetryResult(await core.retry(rid))

    async def status(self, run_id: str) -> RunDetail | None:
        rid = run_id_of(run_id)
        if rid is None:
            return None
        core = await self.client()
        detail = await core.run_detail(rid)
        if detail is None:
            return None
        timers: list[Mapping[str, Any]] = []
        if detail["run"]["status"] not in TERMINAL:
            timers = [dict(t, kind="queue") for t in detail["timer"]]
            timers += [{"kind": s["kind"], "key": s["key"], "deadline": s["deadline"]}
                       for s in detail["steps"] if s["status"] == "waiting" and s["deadline"] is not None]
        run = Run.from_row(detail["run"])
        if run.status == "pending":  # queued: a flow-control limit may be what it waits for
            limit = await limit_of(core, rid)
            if limit is not None:
                run = dataclasses.replace(run, waiting=Waiting("limit", name=limit.kind, reason=limit.message))
        return RunDetail(run=run, steps=detail["steps"], signals=detail["signals"],
                         timers=timers, children=detail["children"], events=detail["events"])

    async def explain(self, run_id: str) -> Explanation:
        """Why the run is where it is, and what would move it (docs/operations.md, "Why is this
        run stuck?"). A run id that is not a string or UUID is ``INVALID_ARGUMENT``; a string
        that names no run (malformed ones included, as in every call) is ``RUN_NOT_FOUND``."""
        if not isinstance(run_id, (str, uuid.UUID)):
            raise InvalidArgument("run_id", f"must be a run id string, got {validate.show(run_id)}")
        rid = require_run_id(run_id)
        core = await self.client()
        found = await explain_run(core, self.schema, rid)
        if found is None:
            raise RunNotFound(rid)
        return found

    async def list_workers(self) -> list[WorkerInfo]:
        """The workers registry: every listening process seen in the last day, what it serves,
        and whether it is alive (docs/operations.md, "The workers registry")."""
        core = await self.client()
        return await fleet.list_workers(core)

    async def list_runs(self, *, name: str | None = None, status: str | Sequence[str] | None = None,
                        tag: str | None = None, since: datetime | None = None, until: datetime | None = None,
                        limit: int = 50, cursor: str | None = None) -> RunPage:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise InvalidArgument("limit", f"must be an int from 1 to {MAX_PAGE}, got {limit!r}")
        flt = _filter(name=name, status=status, tag=tag, since=since, until=until)
        core = await self.client()
        rows = await core.list_runs(flt, limit + 1, decode_cursor(cursor) if cursor else None)
        runs = [RunSummary.from_row(r) for r in rows[:limit]]
        nxt = encode_cursor(runs[-1].created_at, runs[-1].run_id) if len(rows) > limit else None
        return RunPage(runs, nxt)

    async def _bulk_ids(self, flt: Mapping[str, Any] | RunFilter, limit: int) -> list[str]:
        if isinstance(flt, RunFilter):
            rf = flt
        elif isinstance(flt, Mapping):
            unknown = sorted(map(str, set(flt) - set(FILTER_KEYS)))
            if unknown:
                raise InvalidArgument("filter", f"unknown keys {unknown}; known keys: {', '.join(FILTER_KEYS)}")
            rf = _filter(**dict(flt))
        else:
            raise InvalidArgument("filter", f"must be a dict of {', '.join(FILTER_KEYS)}, got {type(flt).__name__}")
        if rf.is_empty():
            raise InvalidArgument("filter", "an empty filter would touch every run; pass name, status, tag or dates")
        validate.integer(limit, "limit", 1, MAX_BULK)
        core = await self.client()
        return await core.select_runs(rf, limit)

    async def cancel_many(self, filter: Mapping[str, Any] | RunFilter, limit: int = 1000,
                          reason: str | None = None) -> int:
        reason = validate.reason(reason)
        ids = await self._bulk_ids(filter, limit)
        total = 0
        for run_id in ids:
            total += min(await self.core.cancel(run_id, reason or "canceled"), 1)
        return total

    async def retry_many(self, filter: Mapping[str, Any] | RunFilter, limit: int = 1000) -> int:
        ids = await self._bulk_ids(filter, limit)
        return sum([await self.core.retry(run_id) == "queued" for run_id in ids])

    async def purge(self, filter: Mapping[str, Any] | RunFilter, limit: int = 1000) -> int:
        """Delete terminal runs (and their records) matching the filter; live runs are kept."""
        ids = await self._bulk_ids(filter, limit)
        return await self.core.purge(ids)

    async def reconcile(self) -> dict[str, int] | None:
        core = await self.client()
        return await core.reconcile(int(self.settings.lease.total_seconds() * 2000))

    async def prune(self, *, events_older_than: DurationLike | None = None,
                    runs_older_than: DurationLike | None = None,
                    batch: int = 1000) -> dict[str, int] | None:
        """Delete old events and terminal runs, in batches; None if another process is pruning."""
        cutoffs = [
            int(parse_duration(v, field=f).total_seconds() * 1000) if v is not None else None
            for f, v in (("events_older_than", events_older_than), ("runs_older_than", runs_older_than))
        ]
        if cutoffs == [None, None]:
            raise InvalidArgument("prune", "pass events_older_than and/or runs_older_than")
        validate.integer(batch, "batch", 1, MAX_PRUNE_BATCH)
        core = await self.client()
        return await core.prune(cutoffs[0], cutoffs[1], batch)

    async def pending_work(self, names: Sequence[str] | None = None) -> int:
        """Claimable runs and due crons right now (what an autoscaler should look at)."""
        if names is not None:
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise InvalidArgument("names", f"must be a list of flow names, got {type(names).__name__}")
            names = [validate.text(n, f"names[{i}]") for i, n in enumerate(names)]
        core = await self.client()
        return await core.pending_work(names)

    def attach_shutdown_signals(self, signals: Sequence[str] = ("SIGTERM", "SIGINT")) -> Callable[[], None]:
        """Stop gracefully on these signals; returns a function that detaches the handlers."""
        loop = asyncio.get_running_loop()
        numbers = []
        for name in signals:
            number = getattr(signal_module, name, None)
            if not isinstance(number, signal_module.Signals):
                raise InvalidArgument("signals", f"unknown signal {name!r}")
            numbers.append(number)
            loop.add_signal_handler(number, lambda: loop.create_task(self.stop()))

        def detach() -> None:
            for number in numbers:
                loop.remove_signal_handler(number)

        return detach

    async def check(self, *, limit: int = 10_000) -> list[dict[str, Any]]:
        """Live runs this code would strand (docs/replay.md §6), for ``iterflow check`` before a deploy.

        A run strands when no registered body knows its ``name@version`` (it would park with
        FLOW_UNKNOWN) or when a builder flow's static shape no longer fits its history. Body
        flows are checked call by call at replay, so they are reported only when unknown.
        """
        core = await self.client()
        live = [s for s in STATUSES if s not in TERMINAL]
        found: list[dict[str, Any]] = []
        for run_id in await core.select_runs(RunFilter(statuses=live), validate.integer(limit, "limit", 1, MAX_BULK)):
            detail = await core.run_detail(run_id)
            if detail is None:
                continue
            problem = self._strands(detail)
            if problem is not None:
                run = detail["run"]
                found.append({"run_id": run_id, "flow": run["name"], "version": run["version"],
                              "status": run["status"], "code": problem[0], "message": problem[1]})
        return found

    def _strands(self, detail: dict[str, Any]) -> tuple[str, str] | None:
        run = detail["run"]
        flow = self.flows.get((run["name"], run["version"]))
        if flow is None:
            return Code.FLOW_UNKNOWN, f"no body registered for {run['name']}@{run['version']}"
        if flow.shape is None:
            return None
        history = {s["key"]: StepRecord(key=s["key"], seq=s["seq"], kind=s["kind"], name=s["name"],
                                        status=s["status"]) for s in detail["steps"]}
        return flow.shape.check(history)

    def health(self) -> dict[str, Any]:
        worker = self._worker
        return {
            "core": self.core.name, "open": self._open, "listening": worker is not None,
            "paused": bool(worker and worker.paused), "active_runs": len(worker.active) if worker else 0,
            "flows": sorted(f"{n}@{v}" for n, v in self.flows),
        }


def _filter(*, name: str | None = None, status: str | Sequence[str] | None = None, tag: str | None = None,
            since: datetime | None = None, until: datetime | None = None) -> RunFilter:
    statuses = [status] if isinstance(status, str) else (list(status) if status is not None else None)
    for st in statuses or ():
        if not isinstance(st, str) or st not in STATUSES:
            raise InvalidArgument("status", f"unknown status {validate.show(st)}; one of {', '.join(STATUSES)}")
    name = validate.lookup(name, "name")
    tag = validate.lookup(tag, "tag")
    for field, value in (("since", since), ("until", until)):
        if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
            raise InvalidArgument(field, "must be a timezone-aware datetime")
    return RunFilter(name=name, statuses=statuses, tag=tag, since=since, until=until)


def create_engine(dsn: str | None = None, **options: Any) -> Engine:
    """Nothing touches the database until first use. Every option, with its default and range:
    README.md ("The knobs") and docs/guide.md §3."""
    return Engine(dsn, **options)



