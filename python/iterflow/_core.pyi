"""The typed face of the Rust extension ``iterflow._core`` (crates/iterflow-py/src).

Every ``Core`` call takes a ``Pump`` and a ticket and returns at once; its value arrives
through ``Pump.drain`` (the "->" of each method's docstring). Rows come back as the named
frozen classes below, whose fields are those of their counterparts in ``cores/base.py``
(tests/test_seam.py checks the extension, this stub and ``cores/base.py`` agree).
"""

from collections.abc import Sequence
from datetime import datetime
from typing import Any, final

__version__: str

class CoreError(Exception):
    """An error from the Rust core (see ``iterflow.faults`` for how it is classified)."""

    code: str
    message: str
    sqlstate: str | None
    detail: str | None
    transient: bool

@final
class Json:
    """Already-encoded JSON, sent as jsonb by ``Core.query``."""

    def __new__(cls, text: str) -> Json: ...

@final
class Pump:
    """Completion pump of one event loop; takes ownership of the pipe's write end ``fd``."""

    def __new__(cls, fd: int) -> Pump: ...
    def drain(self) -> list[tuple[int, bool, Any]]:
        """Every finished call since the last drain: ``(ticket, ok, value or exception)``."""
    def flush(self) -> None: ...
    def cancel(self, ticket: int) -> None: ...

@final
class StepRecord:
    key: str
    seq: int
    kind: str
    name: str
    status: str
    result: Any
    error: dict[str, Any] | None
    attempts: int
    deadline: datetime | None
    child_id: str | None
    child_status: str | None
    child_output: Any
    child_error: dict[str, Any] | None
    finished_at: datetime | None

@final
class ClaimedRun:
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
    held_token: int | None
    history: list[StepRecord]

@final
class Woken:
    claimed: list[ClaimedRun]
    handed: list[HandedRun]

@final
class HandedRun:
    run_id: str
    held_token: int
    notice: str

@final
class StoredStep:
    status: str
    result: Any
    error: dict[str, Any] | None
    written: bool
    finished_at: datetime | None

@final
class Resolved:
    outcome: str
    payload: Any
    at: datetime

@final
class Created:
    run_id: str
    status: str
    created: bool

@final
class LeaseState:
    run_id: str
    held: bool
    cancel_reason: str | None

@final
class ChangedRuns:
    run_ids: list[str]
    everything: bool
    listening: bool

@final
class QueryResult:
    rows: list[dict[str, Any]]
    rowcount: int
    has_columns: bool

def check_connection(pump: Pump, ticket: int, dsn: str) -> None:
    """-> str: the server's version."""

@final
class Core:
    def __new__(
        cls, dsn: str, schema: str, pool_size: int = 10, notify: bool = True,
        application_name: str = "iterflow", writer_shards: int = 1, max_batch: int = 256,
        listen_dsn: str | None = None, prepared_statements: bool = True,
    ) -> Core: ...
    def stats(self) -> dict[str, Any]: ...
    def listen(self) -> None: ...
    def nudge(self) -> None: ...
    def close(self, pump: Pump, ticket: int) -> None:
        """-> None"""
    def check_schema(self, pump: Pump, ticket: int, need: int) -> None:
        """-> None"""
    def insert_runs(
        self, pump: Pump, ticket: int, chunks_: Sequence[tuple[str, str, int]], wake: Sequence[str]
    ) -> None:
        """-> list[Created]"""
    def deliver_signal(
        self, pump: Pump, ticket: int, run_id: str, name: str, payload: str | None, key: str | None
    ) -> None:
        """-> str"""
    def cancel(self, pump: Pump, ticket: int, run_id: str, reason: str) -> None:
        """-> int"""
    def retry(self, pump: Pump, ticket: int, run_id: str) -> None:
        """-> str"""
    def get_run(self, pump: Pump, ticket: int, run_id: str) -> None:
        """-> dict[str, Any] | None"""
    def run_detail(self, pump: Pump, ticket: int, run_id: str) -> None:
        """-> dict[str, Any] | None (keys run, steps, signals, children, events, timer)"""
    def list_runs(
        self, pump: Pump, ticket: int, name: str | None, statuses: Sequence[str] | None,
        tag: str | None, since: datetime | None, until: datetime | None,
        cursor_at: datetime | None, cursor_id: str | None, limit: int,
    ) -> None:
        """-> list[dict[str, Any]]"""
    def select_runs(
        self, pump: Pump, ticket: int, name: str | None, statuses: Sequence[str] | None,
        tag: str | None, since: datetime | None, until: datetime | None, limit: int,
    ) -> None:
        """-> list[str]"""
    def purge(self, pump: Pump, ticket: int, run_ids: Sequence[str]) -> None:
        """-> int"""
    def changed_runs(self, pump: Pump, ticket: int, timeout: float) -> None:
        """-> ChangedRuns (cancellable with ``Pump.cancel``)"""
    def claim_woken(self, pump: Pump, ticket: int, owner: str, lease_ms: int, limit: int, timeout: float) -> None:
        """-> Woken (cancellable with ``Pump.cancel`` while it waits)"""
    def limit_seen(self, channel: str) -> int: ...
    def wait_limit(self, pump: Pump, ticket: int, channel: str, seen: int, timeout: float) -> None:
        """-> None (cancellable with ``Pump.cancel``)"""
    def wait_runs(self, pump: Pump, ticket: int, run_ids: Sequence[str]) -> None:
        """-> list[dict[str, Any]]"""
    def claim(
        self, pump: Pump, ticket: int, names: Sequence[str], limit: int, owner: str, lease_ms: int,
        wait: float | None = None,
    ) -> None:
        """-> list[ClaimedRun]"""
    def claim_runs(
        self, pump: Pump, ticket: int, run_ids: Sequence[str], owner: str, lease_ms: int,
        expected: Sequence[int],
    ) -> None:
        """-> list[ClaimedRun] (those that could be claimed)"""
    def record_step(
        self, pump: Pump, ticket: int, run_id: str, key: str, seq: int, kind: str, name: str,
        status: str, result: str | None, error: str | None, attempts: int,
        deadline: datetime | None, child_id: str | None,
    ) -> None:
        """-> StoredStep"""
    def spawn_children(
        self, pump: Pump, ticket: int, run_id: str, records: Sequence[tuple[str, int, str, str]],
        chunks_: Sequence[tuple[str, str, int]], wake: Sequence[str],
    ) -> None:
        """-> list[Created]"""
    def resolve_signal(
        self, pump: Pump, ticket: int, run_id: str, key: str, seq: int, name: str,
        deadline_passed: bool, timeout_error: str,
    ) -> None:
        """-> Resolved"""
    def suspend(
        self, pump: Pump, ticket: int, run_id: str, token: int, status: str, waiting: str,
        wake_at: datetime | None, attempts_delta: int | None,
    ) -> None:
        """-> bool"""
    def finish(
        self, pump: Pump, ticket: int, run_id: str, token: int | None, status: str,
        output: str | None, error: str | None,
    ) -> None:
        """-> bool"""
    def continue_run(self, pump: Pump, ticket: int, run_id: str, token: int, new_id: str, input: str) -> None:
        """-> bool"""
    def add_event(self, pump: Pump, ticket: int, run_id: str, kind: str, data: str | None) -> None:
        """-> None"""
    def heartbeat(self, pump: Pump, ticket: int, leases: Sequence[tuple[str, int]], lease_ms: int) -> None:
        """-> list[LeaseState]"""
    def expire_leases(self, pump: Pump, ticket: int, limit: int) -> None:
        """-> int"""
    def next_due(self, pump: Pump, ticket: int, names: Sequence[str]) -> None:
        """-> float | None"""
    def requeue_parked(self, pump: Pump, ticket: int, names: Sequence[str]) -> None:
        """-> int"""
    def reconcile(self, pump: Pump, ticket: int, stale_ms: int) -> None:
        """-> dict[str, int] | None (keys lost, parents, orphans)"""
    def prune(
        self, pump: Pump, ticket: int, events_ms: int | None, runs_ms: int | None, batch: int
    ) -> None:
        """-> dict[str, int] | None (keys events, runs)"""
    def pending_work(self, pump: Pump, ticket: int, names: Sequence[str] | None) -> None:
        """-> int"""
    def query(self, pump: Pump, ticket: int, name: str, params: Sequence[Any]) -> None:
        """-> QueryResult"""
