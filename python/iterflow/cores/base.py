"""The core protocol: every database round trip and every wait, behind one interface.

Everything above it (builder, replay, step execution, validation, the public API) is shared;
``cores/python.py`` implements it on psycopg and ``cores/rust.py`` on the Rust extension.
Calls are coarse and batched on purpose: one call per claim batch, per record, per transition,
so the Rust implementation crosses the language boundary once per unit of work.

JSON values cross as already-encoded text (``str``) on the way in, so limits are checked and
encoding happens once in Python; they come back decoded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

# start_many is one transaction; statements inside it carry at most this many runs (both cores)
INSERT_CHUNK = 1000


@dataclass(frozen=True)
class RunSpec:
    """A run to create. ``input`` is encoded JSON text; ``delay_ms`` delays the first claim."""

    id: str
    name: str
    version: int
    input: str
    idempotency_key: str | None = None
    tags: Sequence[str] = ()
    priority: int = 0
    delay_ms: int = 0
    parent_id: str | None = None
    parent_key: str | None = None
    depth: int = 1
    concurrency_key: str | None = None

    def row_json(self, ord_: int) -> str:
        """This spec as one element of the ``insert_runs`` JSON array (input embedded as is)."""
        head = json.dumps({
            "ord": ord_, "id": self.id, "name": self.name, "version": self.version,
            "idempotency_key": self.idempotency_key, "tags": list(self.tags),
            "priority": self.priority, "parent_id": self.parent_id, "parent_key": self.parent_key,
            "depth": self.depth, "delay_ms": self.delay_ms, "concurrency_key": self.concurrency_key,
        }, separators=(",", ":"), ensure_ascii=False)
        return f'{head[:-1]},"input":{self.input}}}'


def rows_json(specs: Sequence[RunSpec]) -> str:
    return "[" + ",".join(spec.row_json(i) for i, spec in enumerate(specs)) + "]"


@dataclass(frozen=True)
class JsonArg:
    """An already-encoded JSON parameter (sent as jsonb) in generic statements like admin_query."""

    text: str


# Statements outside the hot path that both cores run generically through ``admin_query``.
ADMIN_QUERIES = frozenset({
    "upsert_cron", "due_crons", "advance_cron", "cron_live_run", "list_crons", "delete_cron",
    "shift_time", "next_wake", "analyze_hot", "release_leases", "watch_run", "unwatch_run",
    "upsert_flow_limits",
    "upsert_worker", "delete_worker", "list_workers", "explain_run",
    # the dashboard's reads (iterflow.dashboard)
    "dashboard_runs", "dashboard_window_end", "dashboard_live_counts", "dashboard_recent_counts",
    "dashboard_status_estimates", "dashboard_flows", "dashboard_flow_live", "dashboard_flow_throughput",
    "dashboard_workers",
    "chain_last",
    "unstick_runs", "handed_records",
})


@dataclass(frozen=True)
class Created:
    run_id: str
    status: str
    created: bool


@dataclass
class StepRecord:
    """One memoized ctx call as stored; ``child_*`` describe the child of a waiting invoke."""

    key: str
    seq: int
    kind: str
    name: str
    status: str
    result: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    deadline: datetime | None = None
    child_id: str | None = None
    child_status: str | None = None
    child_output: Any = None
    child_error: dict[str, Any] | None = None
    finished_at: datetime | None = None


@dataclass
class ClaimedRun:
    """A leased run with everything replay needs, fetched in the claim round trip(s)."""

    run_id: str
    lease_token: int
    name: str
    version: int
    input: Any
    attempts: int
    cancel_reason: str | None
    parent_id: str | None
    depth: int
    created_at: datetime
    parent_status: str | None
    db_now: datetime
    # the lease token under which a worker holds the run in its sticky cache (sticky.py), or None
    held_token: int | None = None
    history: dict[str, StepRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class Handoff:
    """A held run leased to its holder by the transaction that woke it (migration 0014,
    docs/replay.md "Handoff"): what a claim by id would have returned, read from the notice
    ``H <run id> <held token> <owner> <json>``. ``history`` is None when the records were too
    large for a notice (read them with the ``handed_records`` statement)."""

    run_id: str
    held_token: int
    lease_token: int
    attempts: int
    parent_status: str | None
    db_now: datetime
    history: dict[str, StepRecord] | None

    @classmethod
    def from_notice(cls, run_id: str, held_token: int, body: str) -> Handoff:
        """Decode the JSON part of an ``H`` notice (both cores hand it over as text)."""
        data = json.loads(body)
        steps = data["steps"]
        return cls(
            run_id=run_id, held_token=held_token, lease_token=int(data["token"]),
            attempts=int(data["attempts"]), parent_status=data["parent_status"],
            db_now=datetime.fromisoformat(data["now"]),
            history=None if steps is None else held_history(steps),
        )


def held_history(steps: list[dict[str, Any]]) -> dict[str, StepRecord]:
    """The records of a held run's waits, by key, from the JSON array ``held_records`` makes
    (in a handoff's notice, or read back by ``handed_records``)."""
    return {row["key"]: StepRecord(
        key=row["key"], seq=row["seq"], kind=row["kind"], name=row["name"], status=row["status"],
        result=row["result"], error=row["error"], attempts=row["attempts"] or 0,
        deadline=_when(row["deadline"]), child_id=row["child_id"], child_status=row["child_status"],
        child_output=row["child_output"], child_error=row["child_error"], finished_at=_when(row["finished_at"]),
    ) for row in steps}


def _when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True)
class Woken:
    """Held runs other processes woke (``Core.claim_woken``): those claimed by id, and those
    already handed to this worker by the waking transaction."""

    claimed: list[ClaimedRun] = field(default_factory=list)
    handed: list[Handoff] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.claimed or self.handed)


@dataclass(frozen=True)
class StoredStep:
    """What ``record_step`` left in the database: ours if ``written``, else the first writer's."""

    status: str
    result: Any
    error: dict[str, Any] | None
    written: bool
    finished_at: datetime | None


@dataclass(frozen=True)
class LeaseState:
    run_id: str
    held: bool
    cancel_reason: str | None


@dataclass(frozen=True)
class Resolved:
    """What ``resolve_signal`` did: ``outcome`` "signal" (consumed ``payload``), "timeout" (the
    deadline passed; recorded) or "none" (nothing yet); ``at`` is the database's time of it."""

    outcome: str
    payload: Any
    at: datetime


@dataclass(frozen=True)
class ChangedRuns:
    """``changed_runs``' answer: the runs that may have changed; ``everything``: changes may
    have been missed, re-read them all; ``listening``: whether LISTEN is up."""

    run_ids: list[str]
    everything: bool
    listening: bool


@dataclass(frozen=True)
class RunFilter:
    """Bulk-operation and listing filter; all None means "everything" and is refused for bulk."""

    name: str | None = None
    statuses: Sequence[str] | None = None
    tag: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def is_empty(self) -> bool:
        return all(v is None for v in (self.name, self.statuses, self.tag, self.since, self.until))


def filter_args(flt: RunFilter, instant: Callable[[datetime | None], datetime | None] | None = None,
                ) -> tuple[Any, ...]:
    """A filter's parameters of ``list_runs`` and ``select_runs_by_filter``, in statement order
    (name, statuses, tag, since, until), for both cores; ``instant`` converts the two datetimes
    (the Rust binding takes them in UTC)."""
    statuses = list(flt.statuses) if flt.statuses is not None else None
    since, until = (flt.since, flt.until) if instant is None else (instant(flt.since), instant(flt.until))
    return (flt.name, statuses, flt.tag, since, until)


class Core(Protocol):
    """What an engine needs from its database layer. See module docstring for conventions."""

    name: str

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def check_schema(self) -> None: ...

    # -- client side -------------------------------------------------------------------
    async def insert_runs(self, specs: Sequence[RunSpec], conn: Any = None) -> list[Created]: ...
    async def deliver_signal(self, run_id: str, name: str, payload: str, key: str | None) -> str:
        """The SQL function's answer as is: a kind, then for ``delivered`` the waiting cursor key."""
        ...
    async def start_debounced(self, spec: RunSpec, key: str, window_ms: int) -> Created:
        """A debounced start (``debounce_start``): the run of ``spec``'s flow and version with
        debounce ``key`` that has not begun gets ``spec.input`` and begins ``window_ms`` from
        now (``created`` False), else ``spec`` is created to begin then."""
        ...
    async def cancel(self, run_id: str, reason: str) -> int: ...
    async def retry(self, run_id: str) -> str: ...
    async def get_run(self, run_id: str) -> dict[str, Any] | None: ...
    async def run_detail(self, run_id: str) -> dict[str, Any] | None: ...
    async def list_runs(
        self, flt: RunFilter, limit: int, cursor: tuple[datetime, str] | None
    ) -> list[dict[str, Any]]: ...
    async def select_runs(self, flt: RunFilter, limit: int) -> list[str]: ...
    async def purge(self, run_ids: Sequence[str]) -> int: ...
    async def listen(self) -> None:
        """Open the LISTEN connection (with ``notify``; idempotent). Waiting for work or for a
        run opens it too; until then a process that only starts runs and sends signals holds
        no LISTEN connection and is not woken by every notification of the schema."""
        ...
    async def changed_runs(self, timeout: float) -> ChangedRuns:
        """The runs that may have changed (became terminal, or a watched run made progress)
        since the last call, waiting up to ``timeout`` seconds for one. ``everything``: changes
        may have been missed (the LISTEN connection came back), re-read them all.
        ``listening``: whether LISTEN is up; without it only this process's own finishes are
        logged. One consumer (waiters.py)."""
        ...
    async def wait_runs(self, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The ``wait_runs`` rows of ``run_ids`` (one statement, one row per id)."""
        ...
    async def claim_woken(self, owner: str, lease_ms: int, limit: int, timeout: float) -> Woken:
        """Up to ``limit`` runs ``owner`` holds in its sticky cache that other processes woke:
        announced ones (``h`` notifications, migration 0013) claimed by id (:meth:`claim_runs`)
        as their wake-ups arrive, and ones the waking transaction already leased to ``owner``
        (``H`` notifications, migration 0014); waits up to ``timeout`` seconds for one.
        Wake-ups are hints: a lost ``h`` leaves the run to its holder's next claim, a lost
        ``H`` to the fleet once its short lease runs out. One consumer (the worker); nothing
        is kept before its first call."""
        ...

    # -- worker side -------------------------------------------------------------------
    async def claim(
        self, names: Sequence[str], limit: int, owner: str, lease_ms: int, wait: float | None = None
    ) -> list[ClaimedRun]:
        """Lease up to ``limit`` ready runs with their history. With ``wait``, first wait until
        new work may be ready (a notification, a local timer, :meth:`nudge`) or that many
        seconds; a claim that started is never abandoned (the runs it leased are returned)."""
        ...
    async def claim_runs(
        self, run_ids: Sequence[str], owner: str, lease_ms: int, expected: Sequence[int]
    ) -> list[ClaimedRun]:
        """Lease the runs ``run_ids`` that this process holds in its sticky cache, in one
        statement; each one only if it is ready and nobody claimed it since the attempt with
        lease token ``expected[i]`` suspended it. A claimed run's ``history`` holds only the
        current records of the keys its held body waits on (``waiting.sticky.keys``) and the
        signals this claim consumed. A run left out: resume it the normal way."""
        ...
    def nudge(self) -> None:
        """New work may be ready (this process knows it): a waiting claim claims now."""
        ...
    async def record_step(self, run_id: str, rec: StepRecord, result: str | None, error: str | None) -> StoredStep: ...
    async def spawn_children(
        self, run_id: str, records: Sequence[StepRecord], children: Sequence[RunSpec]
    ) -> list[Created]: ...
    async def resolve_signal(
        self, run_id: str, key: str, seq: int, name: str, deadline_passed: bool, timeout_error: str
    ) -> Resolved:
        """Outcome 'signal' (with its payload), 'timeout' or 'none' (payload None)."""
        ...
    async def suspend(
        self, run_id: str, token: int, status: str, waiting: str, wake_at: datetime | None,
        attempts_delta: int | None,
    ) -> bool: ...
    async def finish(
        self, run_id: str, token: int | None, status: str, output: str | None, error: str | None
    ) -> bool: ...
    async def continue_run(self, run_id: str, token: int, new_id: str, input: str) -> bool:
        """End the leased run and start its successor ``new_id`` (same flow and version, input
        ``input``) in one transaction (``ctx.continue_as_new``); False when the lease was lost."""
        ...
    async def add_event(self, run_id: str, kind: str, data: str | None) -> None: ...
    async def acquire_permit(
        self, limit: str, key: str | None, run_id: str, step_key: str, lease_token: int, maximum: int
    ) -> tuple[bool, float | None, str]:
        """Take a permit of step limit ``limit`` for ``key`` (None: the run's key) with
        ``acquire_permit``: (granted, None when granted else seconds until the earliest
        holder's lease expires, the key counted under)."""
        ...
    async def release_permit(self, limit: str, key: str, run_id: str, step_key: str, maximum: int) -> None:
        """Give a permit back (``release_permit``); announces ``l <channel>`` if it was full."""
        ...
    async def take_rate(
        self, limit: str, key: str | None, run_id: str, interval_ms: float, burst: int, horizon_ms: float
    ) -> tuple[bool, float]:
        """One call of a rate limit for ``key`` (None: run ``run_id``'s key) with ``take_rate``:
        (granted, seconds to wait first); not granted: ask again after that long."""
        ...
    def limit_seen(self, channel: str) -> int:
        """A stamp of the last ``l <channel>`` heard (0: none): ``wait_limit`` returns at once
        if another was heard since. Read before asking for a permit, so no release is missed."""
        ...
    async def wait_limit(self, channel: str, seen: int, timeout: float) -> None:
        """Until a release of ``channel`` (``l <channel>``) is heard after stamp ``seen``, or
        ``timeout`` seconds (a quarter second at most while not listening)."""
        ...
    async def heartbeat(self, leases: Sequence[tuple[str, int]], lease_ms: int) -> list[LeaseState]: ...
    async def expire_leases(self, limit: int) -> int: ...
    async def next_due(self, names: Sequence[str]) -> float | None:
        """Seconds until the earliest unleased queued run of ``names`` is ready (<= 0: now)."""
        ...
    async def requeue_parked(self, names: Sequence[str]) -> int: ...
    async def prune(self, events_ms: int | None, runs_ms: int | None, batch: int) -> dict[str, int] | None:
        """Delete events / terminal runs older than the cutoffs in batches; None when another
        process holds the fleet-wide retention lock."""
        ...
    async def pending_work(self, names: Sequence[str] | None) -> int: ...
    async def admin_query(self, name: str, *params: Any) -> list[dict[str, Any]]:
        """Run one of the ``ADMIN_QUERIES`` statements of queries.sql (crons, test clock);
        rows as dicts, ``[{"rowcount": n}]`` for statements that return no rows."""
        ...
    async def reconcile(self, stale_ms: int) -> dict[str, int] | None:
        """Re-drive stranded runs; None when another process holds the fleet-wide lock."""
        ...
