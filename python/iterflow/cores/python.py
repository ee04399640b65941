"""The pure-Python core: the core protocol on psycopg 3 (async) and a connection pool.

Simple and correct rather than clever: one transaction per write, no group commit. It is the
reference behaviour and the baseline the Rust core is measured against.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import AsyncConnection, AsyncRawCursor
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from .. import sql
from ..errors import EngineStateError, InvalidArgument
from ..faults import sqlstate_of
from ..migrate import check_schema
from .base import (
    ADMIN_QUERIES,
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
)
from .pg import Columns, JsonText, insert_async, insert_on_connection

log = logging.getLogger("iterflow")
# Seconds a connection attempt of the engine's own pool keeps retrying (with the pool's
# backoff) before it gives up; the next checkout starts a new one at once. psycopg_pool's
# default (5 minutes) backs off to minutes between attempts, so after a database restart the
# pool would come back long after the server did.
RECONNECT_TIMEOUT = 2.0
# The longest wait for a pooled connection in one attempt: the retry layer above (see
# cores/resilient.py) bounds the whole call and checks out again, which also restarts the
# pool's connection attempts when they gave up.
ACQUIRE_TIMEOUT = 2.0


def _j(text: str | None) -> JsonText | None:
    return None if text is None else JsonText(text)


# Most run ids the change log holds; past it, it forgets them and asks for a full re-read.
CHANGE_LOG_LIMIT = 50_000


class ChangeLog:
    """Runs that may have changed since the waiters' collector last looked (waiters.py):
    ``d``/``p`` notifications and this process's own finishes. One consumer."""

    def __init__(self) -> None:
        self._ids: list[str] = []
        self._everything = False
        self._event = asyncio.Event()

    def add(self, run_id: str) -> None:
        if len(self._ids) >= CHANGE_LOG_LIMIT:
            self._ids = []
            self._everything = True
        else:
            self._ids.append(run_id)
        self._event.set()

    def everything(self) -> None:
        """Any run may have changed (wake-ups may have been lost while disconnected)."""
        self._everything = True
        self._event.set()

    async def next(self, timeout: float) -> tuple[list[str], bool]:
        """Drain the log, first waiting up to ``timeout`` seconds for it to fill."""
        if not self._ids and not self._everything:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
        self._event.clear()
        ids, self._ids = self._ids, []
        everything, self._everything = self._everything, False
        return ids, everything


# Most channels ``Releases`` keeps a stamp for; past it, it forgets them (a waiter whose stamp
# is forgotten wakes once more than it needed to, and asks again).
RELEASES_LIMIT = 10_000


class Releases:
    """Permits given back (``l <channel>`` notifications), for the steps waiting for one: the
    stamp of the last release heard per channel, and the waiters of each channel."""

    def __init__(self) -> None:
        self._stamps: dict[str, int] = {}
        self._last = 0
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def seen(self, channel: str) -> int:
        return self._stamps.get(channel, 0)

    def released(self, channel: str) -> None:
        if len(self._stamps) >= RELEASES_LIMIT:
            self._stamps = {}
        self._last += 1
        self._stamps[channel] = self._last
        for waiter in self._waiters.pop(channel, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, channel: str, seen: int, timeout: float) -> None:
        if self.seen(channel) != seen:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(channel, set())
        waiters.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            waiters.discard(waiter)
            if not waiters and self._waiters.get(channel) is waiters:
                del self._waiters[channel]


# Most held-run wake-ups kept for the worker; past it the oldest half is dropped (a run whose
# wake-up is dropped is claimed by its holder's next normal claim, with its history).
HELD_LIMIT = 10_000


class HeldLog:
    """Wake-ups of runs held in a worker's sticky cache, for the worker of this process; kept
    only once it asked for them: ``h <run id> <token> <owner>`` (claim it by id) and
    ``H <run id> <token> <owner> <json>`` (already leased to it: the JSON is the claim)."""

    def __init__(self) -> None:
        self._wakeups: list[tuple[str, str, int, str | None]] = []  # (owner, run id, token, handoff)
        self._wanted = False
        self._event = asyncio.Event()

    def woken(self, arg: str, handed: bool = False) -> None:
        run_id, _, rest = arg.partition(" ")
        token, _, rest = rest.partition(" ")
        owner, _, body = rest.partition(" ") if handed else (rest, "", "")
        if not self._wanted or not owner or not token.isdigit() or (handed and not body):
            return
        if len(self._wakeups) >= HELD_LIMIT:
            del self._wakeups[:HELD_LIMIT // 2]
        self._wakeups.append((owner, run_id, int(token), body if handed else None))
        self._event.set()

    async def next(self, owner: str, limit: int, timeout: float) -> list[tuple[str, int, str | None]]:
        """Up to ``limit`` wake-ups of ``owner``'s runs as (run id, token, handoff JSON or
        None), first waiting up to ``timeout`` for one; the rest stay for the next call, the
        other owners' are dropped."""
        self._wanted = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._wakeups = [w for w in self._wakeups if w[0] == owner]
            mine, self._wakeups = self._wakeups[:limit], self._wakeups[limit:]
            if not self._wakeups:
                self._event.clear()
            left = deadline - loop.time()
            if mine or left <= 0:
                return [(run_id, token, body) for _, run_id, token, body in mine]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), left)


class Listener:
    """One LISTEN connection per core: wakes idle workers and feeds the change log.

    Notifications are hints, never the source of truth: waiters re-read the database and
    read everything once per safety interval, so a dropped connection only costs latency.
    Reconnects with backoff.
    """

    def __init__(self, dsn: str, listen: str, changes: ChangeLog, releases: Releases, held: HeldLog,
                 application_name: str | None = None) -> None:
        self._dsn = dsn
        self._listen = listen
        self._connect_args: dict[str, Any] = {"application_name": application_name} if application_name else {}
        self._changes = changes
        self._releases = releases
        self._held = held
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="iterflow-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                async with await AsyncConnection.connect(self._dsn, autocommit=True, **self._connect_args) as conn:
                    await conn.execute(self._listen.encode())
                    self.connected.set()
                    delay = 0.1
                    self._work.set()  # anything may have happened while we were away
                    self._changes.everything()
                    async for note in conn.notifies():
                        self._dispatch(note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means reconnect
                self.connected.clear()
                log.warning("iterflow listener lost its connection (%s); reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)  # back within a second of the server

    def _dispatch(self, payload: str) -> None:
        kind, _, arg = payload.partition(" ")
        if kind == "q":
            self._work.set()
        elif kind in ("d", "p"):
            self._changes.add(arg)
        elif kind == "l":
            self._releases.released(arg)
        elif kind in ("h", "H"):
            self._held.woken(arg, handed=kind == "H")

    async def wait_work(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._work.wait(), timeout)
        self._work.clear()


class PythonCore:
    """Core protocol on psycopg. ``pool`` may be caller-owned (never closed here)."""

    name = "python"

    def __init__(
        self, dsn: str | None, *, pool: AsyncConnectionPool | None, schema: str, pool_size: int, notify: bool,
        acquire_timeout: float = ACQUIRE_TIMEOUT, listen_dsn: str | None = None, prepared_statements: bool = True,
    ) -> None:
        self.schema = sql.validate_schema_name(schema)
        self._q = sql.queries(schema)
        named = False
        if dsn is not None:
            try:  # a malformed DSN fails here, not as a connection fault retried until the bound
                named = "application_name" in conninfo_to_dict(dsn)
            except (psycopg.ProgrammingError, TypeError) as exc:
                raise InvalidArgument("dsn", f"not a valid PostgreSQL DSN: {exc}") from None
        # connections are named like the Rust core's (`iterflow:<schema>`, the listener
        # `iterflow-listen:<schema>`) unless the DSN names them: visible in pg_stat_activity
        self._app_names: tuple[str | None, str | None] = (
            (None, None) if named else (f"iterflow:{schema}", f"iterflow-listen:{schema}")
        )
        if listen_dsn is not None:  # (a DSN the engine checked already) names the listener, or not
            listen_named = "application_name" in conninfo_to_dict(listen_dsn)
            self._app_names = (self._app_names[0], None if listen_named else f"iterflow-listen:{schema}")
        self._acquire_timeout = acquire_timeout
        self._dsn = dsn
        self._listen_to = listen_dsn
        # psycopg names a statement once it ran prepare_threshold times; None never names one
        # (a pooler in transaction mode moves the next call to a server that lacks it)
        self._prepare_threshold: dict[str, Any] = {} if prepared_statements else {"prepare_threshold": None}
        self._own_pool = pool is None
        self._pool = pool
        self._pool_size = pool_size
        self._notify = notify
        self._listener: Listener | None = None
        self._changes = ChangeLog()
        self._releases = Releases()
        self._held = HeldLog()
        self._closed = False  # no listener starts after close (a caller-owned pool stays set)
        self._nudged = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------
    async def _listen_dsn(self) -> str:
        """The listener's own connection goes to ``listen_dsn`` if given, else where the pool's
        do (a pool's conninfo may be a callable, sync or async, that returns it)."""
        if self._listen_to is not None:
            return self._listen_to
        if self._dsn is not None:
            return self._dsn
        assert self._pool is not None
        conninfo: Any = self._pool.conninfo
        if callable(conninfo):
            conninfo = conninfo()
            if inspect.isawaitable(conninfo):
                conninfo = await conninfo
        return str(conninfo)

    async def open(self) -> None:
        self._closed = False
        if self._pool is None:
            if self._dsn is None:
                raise ValueError("a dsn or a pool is required")
            kwargs: dict[str, Any] = {"autocommit": True, **self._prepare_threshold}
            if self._app_names[0] is not None:
                kwargs["application_name"] = self._app_names[0]
            self._pool = AsyncConnectionPool(
                self._dsn, min_size=1, max_size=self._pool_size, open=False, kwargs=kwargs, name="iterflow",
                timeout=self._acquire_timeout, reconnect_timeout=RECONNECT_TIMEOUT,
            )
            await self._pool.open()

    async def listen(self) -> None:
        if not self._notify or self._listener is not None or self._pool is None or self._closed:
            return
        dsn = await self._listen_dsn()  # (may yield: another caller may have started it since)
        if self._listener is None and not self._closed:
            self._listener = Listener(dsn, self._q["listen"], self._changes, self._releases, self._held,
                                      self._app_names[1])
            self._listener.start()

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._own_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[AsyncConnection[Any]]:
        """A pooled connection; one that failed with a connection fault is closed, so the pool
        replaces it instead of handing it to the next caller."""
        if self._pool is None:
            raise EngineStateError("the engine is stopped (its core is not open)")
        async with self._pool.connection(timeout=self._acquire_timeout) as conn:
            try:
                yield conn
            except BaseException as exc:
                if _breaks_connection(exc) and not conn.closed:
                    with contextlib.suppress(Exception):
                        await conn.close()
                raise

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncRawCursor[Any]]:
        async with self._conn() as conn:
            async with conn.transaction():
                yield AsyncRawCursor(conn)

    @contextlib.asynccontextmanager
    async def _stmt(self) -> AsyncIterator[AsyncRawCursor[Any]]:
        """One statement, one implicit transaction: no BEGIN/COMMIT round trips around it."""
        async with self._conn() as conn:
            yield AsyncRawCursor(conn)

    async def _rows(self, name: str, *params: Any) -> list[tuple[Any, ...]]:
        """Statement ``name``'s rows, for callers that read none of their columns."""
        async with self._stmt() as cur:
            await cur.execute(self._q[name], params)
            return await cur.fetchall() if cur.description else []

    async def _read(self, name: str, columns: Sequence[str], *params: Any) -> list[tuple[Any, ...]]:
        """Statement ``name``'s rows, each as the values of ``columns`` in that order."""
        async with self._stmt() as cur:
            await cur.execute(self._q[name], params)
            pick = Columns(name, cur.description).getter(*columns)
            return [pick(row) for row in await cur.fetchall()]

    async def _read_one(self, name: str, columns: Sequence[str], *params: Any) -> tuple[Any, ...]:
        """The values of ``columns`` in the one row statement ``name`` returns."""
        rows = await self._read(name, columns, *params)
        assert rows, f"{name} returned no row"
        return rows[0]

    async def _scalar(self, name: str, *params: Any) -> Any:
        """The one value statement ``name`` returns (see ``_value``)."""
        async with self._stmt() as cur:
            await cur.execute(self._q[name], params)
            return await _value(cur, name)

    async def check_schema(self) -> None:
        async with self._conn() as conn:
            await check_schema(conn, self.schema)

    # -- client side ---------------------------------------------------------------------
    async def insert_runs(self, specs: Sequence[RunSpec], conn: Any = None) -> list[Created]:
        if not specs:
            return []
        if conn is None:
            async with self._tx() as cur:
                created = await self._insert_async(cur, specs)
            await self._notify_work({s.name for s in specs if s.delay_ms <= 0})
            return created
        return await insert_on_connection(self._q, conn, specs)

    async def _insert_async(self, cur: AsyncRawCursor[Any], specs: Sequence[RunSpec]) -> list[Created]:
        return await insert_async(self._q, cur, specs)

    async def _notify_work(self, names: set[str]) -> None:
        """After the commit of new work: this process's worker claims at once (with or without
        notifications), and other processes hear of it in a transaction of its own that skips
        the WAL flush."""
        if not names:
            return
        self.nudge()
        if not self._notify:
            return
        try:
            await self._rows("relay_notify", [f"q {name}" for name in sorted(names)])
        except psycopg.Error as exc:
            # the work is committed: a lost wake-up costs other workers a poll interval, while
            # failing here would tell the caller that runs it created do not exist
            log.warning("iterflow: could not announce new work (%s); workers find it by polling", exc)

    async def deliver_signal(self, run_id: str, name: str, payload: str, key: str | None) -> str:
        (answer,) = await self._read_one("deliver_signal", ("deliver_signal",), run_id, name, _j(payload), key)
        return str(answer)

    async def start_debounced(self, spec: RunSpec, key: str, window_ms: int) -> Created:
        run_id, status, created = await self._read_one(
            "debounce_start", ("run_id", "status", "created"), spec.id, spec.name, spec.version, key,
            JsonText(spec.input), list(spec.tags), spec.priority, window_ms,
        )
        return Created(str(run_id), str(status), bool(created))

    async def cancel(self, run_id: str, reason: str) -> int:
        return int(await self._scalar("cancel_tree", run_id, reason) or 0)

    async def retry(self, run_id: str) -> str:
        return str(await self._scalar("retry_run", run_id))

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        async with self._stmt() as cur:
            await cur.execute(self._q["get_run"], (run_id,))
            return _dict_one(cur, await cur.fetchone())

    async def run_detail(self, run_id: str) -> dict[str, Any] | None:
        async with self._tx() as cur:
            # one snapshot for every part: a run claimed between two of these reads (the claim
            # consumes its signals) must not show up as still waiting with consumed signals
            await cur.execute(self._q["read_snapshot"])
            await cur.execute(self._q["get_run"], (run_id,))
            run = _dict_one(cur, await cur.fetchone())
            if run is None:
                return None
            detail: dict[str, Any] = {"run": run}
            for part in ("steps", "signals", "children", "events", "timer"):
                await cur.execute(self._q[f"run_{part}"], (run_id,))
                detail[part] = _dicts(cur, await cur.fetchall())
            return detail

    async def list_runs(
        self, flt: RunFilter, limit: int, cursor: tuple[datetime, str] | None
    ) -> list[dict[str, Any]]:
        async with self._stmt() as cur:
            await cur.execute(
                self._q["list_runs"],
                (*filter_args(flt), cursor[0] if cursor else None, cursor[1] if cursor else None, limit),
            )
            return _dicts(cur, await cur.fetchall())

    async def select_runs(self, flt: RunFilter, limit: int) -> list[str]:
        rows = await self._read("select_runs_by_filter", ("id",), *filter_args(flt), limit)
        return [str(id_) for (id_,) in rows]

    async def purge(self, run_ids: Sequence[str]) -> int:
        async with self._stmt() as cur:
            await cur.execute(self._q["purge_runs"], (list(run_ids),))
            return cur.rowcount

    async def changed_runs(self, timeout: float) -> ChangedRuns:
        await self.listen()
        listening = self._listener is not None and self._listener.connected.is_set()
        ids, everything = await self._changes.next(timeout if listening else min(timeout, 0.25))
        return ChangedRuns(ids, everything, listening)

    async def wait_runs(self, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        async with self._stmt() as cur:
            await cur.execute(self._q["wait_runs"], (list(run_ids),))
            return [{**row, "id": str(row["id"])} for row in _dicts(cur, await cur.fetchall())]

    # -- worker side ---------------------------------------------------------------------
    async def claim(
        self, names: Sequence[str], limit: int, owner: str, lease_ms: int, wait: float | None = None
    ) -> list[ClaimedRun]:
        if wait is not None:
            await self._wait_for_work(wait)
        async with self._stmt() as cur:
            await cur.execute(self._q["claim_with_history"], (list(names), limit, owner, lease_ms))
            return _claimed_runs(Columns("claim_with_history", cur.description), await cur.fetchall())

    async def claim_runs(
        self, run_ids: Sequence[str], owner: str, lease_ms: int, expected: Sequence[int]
    ) -> list[ClaimedRun]:
        async with self._stmt() as cur:
            await cur.execute(self._q["claim_runs"], (list(run_ids), owner, lease_ms, list(expected)))
            return _claimed_runs(Columns("claim_runs", cur.description), await cur.fetchall())

    async def record_step(self, run_id: str, rec: StepRecord, result: str | None, error: str | None) -> StoredStep:
        status, stored, stored_error, written, finished_at = await self._read_one(
            "record_step", ("status", "result", "error", "written", "finished_at"),
            run_id, rec.key, rec.seq, rec.kind, rec.name, rec.status, _j(result), _j(error),
            rec.attempts, rec.deadline, rec.child_id,
        )
        return StoredStep(status, stored, stored_error, bool(written), finished_at)

    async def spawn_children(
        self, run_id: str, records: Sequence[StepRecord], children: Sequence[RunSpec]
    ) -> list[Created]:
        async with self._tx() as cur:
            created = await self._insert_async(cur, children)
            for rec, made in zip(records, created, strict=True):
                await cur.execute(
                    self._q["record_step"],
                    (run_id, rec.key, rec.seq, rec.kind, rec.name, "waiting", None, None, 0, None, made.run_id),
                )
        await self._notify_work({c.name for c in children})
        return created

    async def resolve_signal(
        self, run_id: str, key: str, seq: int, name: str, deadline_passed: bool, timeout_error: str
    ) -> Resolved:
        outcome, payload, at = await self._read_one(
            "resolve_signal", ("outcome", "payload", "at"),
            run_id, key, seq, name, deadline_passed, _j(timeout_error),
        )
        return Resolved(str(outcome), payload, at)

    async def suspend(
        self, run_id: str, token: int, status: str, waiting: str, wake_at: datetime | None,
        attempts_delta: int | None,
    ) -> bool:
        return bool(await self._scalar("suspend_run", run_id, token, status, _j(waiting), wake_at, attempts_delta))

    async def finish(self, run_id: str, token: int | None, status: str, output: str | None, error: str | None) -> bool:
        finished = bool(await self._scalar("finish_run", run_id, token, status, _j(output), _j(error)))
        if finished:
            self._changes.add(run_id)  # this process's waiters need no round trip
        return finished

    async def continue_run(self, run_id: str, token: int, new_id: str, input: str) -> bool:
        continued = bool(await self._scalar("continue_run", run_id, token, new_id, _j(input)))
        if continued:
            self._changes.add(run_id)  # this process's waiters follow the chain without a round trip
            self.nudge()  # the successor is ready now
        return continued

    async def add_event(self, run_id: str, kind: str, data: str | None) -> None:
        await self._rows("add_event", run_id, kind, _j(data))

    async def acquire_permit(
        self, limit: str, key: str | None, run_id: str, step_key: str, lease_token: int, maximum: int
    ) -> tuple[bool, float | None, str]:
        granted, wait_ms, permit_key = await self._read_one(
            "acquire_permit", ("granted", "wait_ms", "permit_key"), limit, key, run_id, step_key, lease_token,
            maximum)
        return bool(granted), None if wait_ms is None else float(wait_ms) / 1000, str(permit_key)

    async def release_permit(self, limit: str, key: str, run_id: str, step_key: str, maximum: int) -> None:
        await self._rows("release_permit", limit, key, run_id, step_key, maximum)

    async def take_rate(
        self, limit: str, key: str | None, run_id: str, interval_ms: float, burst: int, horizon_ms: float
    ) -> tuple[bool, float]:
        granted, wait_ms = await self._read_one(
            "take_rate", ("granted", "wait_ms"), limit, key, run_id, interval_ms, burst, horizon_ms)
        return bool(granted), float(wait_ms) / 1000

    async def claim_woken(self, owner: str, lease_ms: int, limit: int, timeout: float) -> Woken:
        await self.listen()
        woken = await self._held.next(owner, max(limit, 1), timeout)
        handed = [Handoff.from_notice(run_id, token, body) for run_id, token, body in woken if body is not None]
        announced = [(run_id, token) for run_id, token, body in woken if body is None]
        claimed: list[ClaimedRun] = []
        try:
            if announced:
                claimed = await self.claim_runs([r for r, _ in announced], owner, lease_ms, [t for _, t in announced])
        except Exception:
            if not handed:
                raise
            log.warning("iterflow could not claim %d woken held runs by id", len(announced), exc_info=True)
        return Woken(claimed, handed)

    def limit_seen(self, channel: str) -> int:
        return self._releases.seen(channel)

    async def wait_limit(self, channel: str, seen: int, timeout: float) -> None:
        await self.listen()
        listening = self._listener is not None and self._listener.connected.is_set()
        await self._releases.wait(channel, seen, timeout if listening else min(timeout, 0.25))

    async def heartbeat(self, leases: Sequence[tuple[str, int]], lease_ms: int) -> list[LeaseState]:
        if not leases:
            return []
        rows = await self._read(
            "heartbeat", ("run_id", "held", "cancel_reason"), [r for r, _ in leases], [t for _, t in leases], lease_ms
        )
        return [LeaseState(str(run_id), bool(held), cancel_reason) for run_id, held, cancel_reason in rows]

    async def expire_leases(self, limit: int) -> int:
        return len(await self._rows("expire_leases", limit))

    async def next_due(self, names: Sequence[str]) -> float | None:
        due = await self._scalar("next_due", list(names))
        return None if due is None else float(due.total_seconds())

    async def requeue_parked(self, names: Sequence[str]) -> int:
        async with self._stmt() as cur:
            await cur.execute(self._q["requeue_parked"], (list(names),))
            return cur.rowcount

    def nudge(self) -> None:
        self._nudged.set()

    async def _wait_for_work(self, timeout: float) -> None:
        """Until new work may be ready (a notification, a nudge) or ``timeout`` seconds."""
        await self.listen()
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._nudged.wait())]
        if self._listener is not None:  # (one that is still connecting wakes us once it is up)
            waits.append(asyncio.ensure_future(self._listener.wait_work(timeout)))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            self._nudged.clear()

    async def prune(self, events_ms: int | None, runs_ms: int | None, batch: int) -> dict[str, int] | None:
        """One pruner per schema at a time: the lock is a transaction-level advisory lock held
        by a transaction of its own, open (and idle: no snapshot, no rows) while the batches
        run in short transactions on a second connection. Nothing lives in the session, so a
        pooler in transaction mode keeps it (docs/operations.md, "Behind PgBouncer")."""
        async with self._tx() as lock:
            await lock.execute(self._q["try_lock"], (f"iterflow.retention.{self.schema}",))
            if not await _value(lock, "try_lock"):
                return None
            async with self._conn() as conn:
                return await self._prune_batches(conn, events_ms, runs_ms, batch)

    async def _prune_batches(
        self, conn: AsyncConnection[Any], events_ms: int | None, runs_ms: int | None, batch: int
    ) -> dict[str, int]:
        counts = {"events": 0, "runs": 0}
        for part, cutoff in (("events", events_ms), ("runs", runs_ms)):
            while cutoff is not None:
                async with conn.transaction():  # short transactions: no long locks on hot tables
                    cur = AsyncRawCursor(conn)
                    await cur.execute(self._q[f"prune_{part}"], (cutoff, batch))
                    counts[part] += cur.rowcount
                if cur.rowcount < batch:
                    break
        return counts

    async def pending_work(self, names: Sequence[str] | None) -> int:
        return int(await self._scalar("pending_work", list(names) if names is not None else None) or 0)

    async def admin_query(self, name: str, *params: Any) -> list[dict[str, Any]]:
        if name not in ADMIN_QUERIES:
            raise ValueError(f"not an admin statement: {name}")
        args = tuple(JsonText(p.text) if isinstance(p, JsonArg) else p for p in params)
        async with self._stmt() as cur:
            await cur.execute(self._q[name], args)
            if cur.description is None:
                return [{"rowcount": cur.rowcount}]
            return _dicts(cur, await cur.fetchall())

    async def reconcile(self, stale_ms: int) -> dict[str, int] | None:
        async with self._tx() as cur:
            await cur.execute(self._q["try_lock"], (f"iterflow.reconcile.{self.schema}",))
            if not await _value(cur, "try_lock"):
                return None
            counts = {}
            for part in ("lost", "parents", "orphans"):
                args = (stale_ms,) if part != "orphans" else ()
                await cur.execute(self._q[f"reconcile_{part}"], args)
                counts[part] = len(await cur.fetchall())
            return counts


def _breaks_connection(exc: BaseException) -> bool:
    """Whether ``exc`` leaves the connection unusable: it broke (no SQLSTATE) or the server
    ended the session (57P01-57P05, class 08). (A call cancelled mid-statement leaves it
    active: the pool closes those itself.)"""
    state = sqlstate_of(exc)
    if state is not None:
        return state[:2] == "08" or state.startswith("57P")
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, OSError))


async def _value(cur: AsyncRawCursor[Any], statement: str) -> Any:
    """The value of a statement that returns one (``SELECT fn(...)``: one column, which
    queries.sql leaves unnamed), just executed on ``cur``; None when it returned no row."""
    Columns(statement, cur.description).single()
    row = await cur.fetchone()
    return None if row is None else row[0]


# The claim_with_history columns of a 'run' row and of a 'step' row, named in the order
# ``_claimed`` and ``_step_record`` unpack them.
_RUN_COLUMNS = ("run_id", "lease_token", "name", "version", "input", "attempts", "cancel_reason", "parent_id",
                "depth", "created_at", "parent_status", "db_now", "held_token")
_STEP_COLUMNS = ("key", "seq", "step_kind", "name", "status", "result", "error", "step_attempts", "deadline",
                 "child_id", "child_status", "child_output", "child_error", "finished_at")


def _claimed_runs(columns: Columns, rows: Sequence[Any]) -> list[ClaimedRun]:
    """The runs of a claim_with_history or claim_runs answer: 'run' rows, and 'step' rows
    holding one record of a claimed run each."""
    kind, run_id = columns.at("kind"), columns.at("run_id")
    run_of, step_of = columns.getter(*_RUN_COLUMNS), columns.getter(*_STEP_COLUMNS)
    by_id = {str(row[run_id]): _claimed(run_of(row)) for row in rows if row[kind] == "run"}
    for row in rows:
        if row[kind] == "step":
            step = _step_record(step_of(row))
            by_id[str(row[run_id])].history[step.key] = step
    return list(by_id.values())


def _claimed(values: tuple[Any, ...]) -> ClaimedRun:
    """A 'run' row of claim_with_history, read by ``_RUN_COLUMNS``."""
    (run_id, token, name, version, input_, attempts, cancel_reason, parent_id, depth, created_at, parent_status,
     db_now, held_token) = values
    return ClaimedRun(
        str(run_id), int(token), name, version, input_, attempts, cancel_reason,
        str(parent_id) if parent_id else None, depth, created_at, parent_status, db_now, held_token,
    )


def _step_record(values: tuple[Any, ...]) -> StepRecord:
    """A 'step' row of claim_with_history, read by ``_STEP_COLUMNS``."""
    (key, seq, kind, name, status, result, error, attempts, deadline, child_id, child_status, child_output,
     child_error, finished_at) = values
    return StepRecord(
        key, seq, kind, name, status, result, error, attempts, deadline, str(child_id) if child_id else None,
        child_status, child_output, child_error, finished_at,
    )


def _names(cur: AsyncRawCursor[Any]) -> list[str]:
    return [d.name for d in cur.description or ()]


def _dict_one(cur: AsyncRawCursor[Any], row: tuple[Any, ...] | None) -> dict[str, Any] | None:
    return None if row is None else dict(zip(_names(cur), row, strict=True))


def _dicts(cur: AsyncRawCursor[Any], rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    names = _names(cur)
    return [dict(zip(names, row, strict=True)) for row in rows]
