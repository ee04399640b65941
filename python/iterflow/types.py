"""The values the public API returns: frozen dataclasses with readable one-line renderings."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .durations import DurationLike
from .errors import InvalidArgument, RunNotFound

STATUSES = (
    "pending", "running", "sleeping", "awaiting_signal", "awaiting_child", "retrying", "parked",
    "done", "failed", "canceled",
)
TERMINAL = ("done", "failed", "canceled")


@dataclass(frozen=True)
class StartResult:
    run_id: str
    status: str
    created: bool


@dataclass(frozen=True)
class SignalResult:
    kind: str
    cursor_key: str | None = None
    issues: tuple[Mapping[str, str], ...] = ()


@dataclass(frozen=True)
class RetryResult:
    kind: str  # queued | missing | not_failed


@dataclass(frozen=True)
class StartSpec:
    input: Any = None
    idempotency_key: str | None = None
    tags: Sequence[str] = ()
    delay: DurationLike | None = None
    priority: int = 0
    key: str | None = None

    @classmethod
    def coerce(cls, item: Any, index: int) -> StartSpec:
        if isinstance(item, StartSpec):
            return item
        if isinstance(item, Mapping):
            unknown = set(item) - {"input", "idempotency_key", "tags", "delay", "priority", "key"}
            if unknown:
                raise InvalidArgument(f"items[{index}]", f"unknown keys {sorted(unknown)}")
            return cls(**item)
        raise InvalidArgument(f"items[{index}]", f"expected a StartSpec or a dict, got {type(item).__name__}")


@dataclass(frozen=True)
class Waiting:
    """Why a live run is not moving, as one readable line."""

    kind: str
    name: str | None = None
    until: datetime | None = None
    child_id: str | None = None
    worker: str | None = None
    reason: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        until = f" until {self.until.isoformat()}" if self.until else ""
        if self.kind == "signal":
            return f"waiting for signal {self.name!r}{until or ' (no timeout)'}"
        if self.kind == "sleep":
            return f"sleeping{until}"
        if self.kind == "child":
            return f"waiting for child run {self.child_id}"
        if self.kind == "retry":
            return f"retrying step {self.name!r}{until.replace(' until', ' at')}"
        if self.kind == "parked":
            return f"parked ({self.code}): {self.reason}"
        if self.kind == "running":
            return f"running on {self.worker}, lease{until}"
        if self.kind == "limit":
            return f"queued for a place: {self.reason}"
        return "queued"

    @classmethod
    def from_row(cls, status: str, data: Mapping[str, Any] | None) -> Waiting | None:
        if status in TERMINAL:
            return None
        if status == "pending" or not data:
            return cls("queued")
        until = data.get("until")
        return cls(
            kind=str(data.get("kind", "queued")),
            name=data.get("name") or data.get("step"),
            until=datetime.fromisoformat(until) if isinstance(until, str) else None,
            child_id=data.get("child_id"),
            worker=data.get("worker"),
            reason=data.get("reason"),
            code=data.get("code"),
        )


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    name: str
    version: int
    status: str
    tags: tuple[str, ...]
    attempts: int
    created_at: datetime
    updated_at: datetime
    error: Mapping[str, Any] | None
    waiting: Waiting | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> RunSummary:
        return cls(
            run_id=str(row["id"]), name=row["name"], version=row["version"], status=row["status"],
            tags=tuple(row["tags"] or ()), attempts=row["attempts"], created_at=row["created_at"],
            updated_at=row["updated_at"], error=row["error"], waiting=Waiting.from_row(row["status"], row["waiting"]),
        )


@dataclass(frozen=True)
class Run(RunSummary):
    """One run in full. ``continued_from``/``continued_to``: its neighbours in a continue-as-new
    chain (``ctx.continue_as_new``, docs/guide.md): the run it continues, the run that continued
    it (a run that continued ended ``done`` with no output of its own)."""

    input: Any = None
    output: Any = None
    continued_from: str | None = None
    continued_to: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Run:
        base = RunSummary.from_row(row)
        return cls(**base.__dict__, input=row.get("input"), output=row.get("output"),
                   continued_from=_id_or_none(row.get("continued_from")),
                   continued_to=_id_or_none(row.get("continued_to")))


def _id_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class RunDetail:
    run: Run
    steps: list[Mapping[str, Any]] = field(default_factory=list)
    signals: list[Mapping[str, Any]] = field(default_factory=list)
    timers: list[Mapping[str, Any]] = field(default_factory=list)
    children: list[Mapping[str, Any]] = field(default_factory=list)
    events: list[Mapping[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class RunPage:
    runs: list[RunSummary]
    next: str | None


_RUN_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def run_id_of(value: object) -> str | None:
    """The canonical form of a run id, or None when ``value`` is not one.

    One rule for every call that takes a run id, on both cores: the 36-character hyphenated
    UUID text the engine returns (8-4-4-4-12 hex digits), in any letter case, or a
    ``uuid.UUID``; it is lower-cased before it reaches a query. Other spellings that Python's
    ``uuid.UUID`` or PostgreSQL accept (``urn:uuid:...``, ``{...}``, 32 digits without hyphens,
    surrounding spaces) are not run ids: they name no run, like any other malformed id.
    """
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str) or len(value) != 36 or not _RUN_ID.fullmatch(value):
        return None
    return str.lower(value)


def require_run_id(value: object) -> str:
    """``run_id_of(value)``, or ``RunNotFound``: a malformed id names no run, so calls that act
    on one run report it as not found before any query."""
    rid = run_id_of(value)
    if rid is None:
        raise RunNotFound(str(value))
    return rid


def is_run_id(value: object) -> bool:
    """A malformed id names no run: callers answer it like an unknown one, before any query."""
    return run_id_of(value) is not None


def encode_cursor(created_at: datetime, run_id: str) -> str:
    raw = f"{created_at.isoformat()}|{run_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, run_id = raw.split("|", 1)
        created_at, canonical = datetime.fromisoformat(stamp), run_id_of(run_id)
    except Exception as exc:
        raise InvalidArgument("cursor", "not a cursor returned by list_runs") from exc
    if canonical is None or created_at.utcoffset() is None:
        raise InvalidArgument("cursor", "not a cursor returned by list_runs")
    return created_at, canonical


def _plain(value: Any) -> Any:
    """A value of an explanation or a worker row in its JSON form (timestamps as ISO text)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Reason:
    """One thing that holds a run where it is, and what would move it.

    ``kind`` is stable (docs/operations.md, "Why is this run stuck?", lists every kind);
    ``message`` is for humans; ``action`` is what would move the run (often an exact
    ``iterflow`` command), None when nothing needs doing but waiting. ``since`` and ``until``
    bound the wait where they are known; ``details`` carries the kind's own fields (a signal
    name, an attempt count, an error code, a worker id...). ``child`` is the explanation of
    the child run a parent waits for.
    """

    kind: str
    message: str
    action: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    child: Explanation | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "message": self.message, "action": self.action,
            "since": _plain(self.since), "until": _plain(self.until), "details": _plain(self.details),
            "child": self.child.to_dict() if self.child is not None else None,
        }


@dataclass(frozen=True)
class Explanation:
    """``engine.explain(run_id)``: why a run is where it is, as of ``at`` (the database's clock).

    ``summary`` is one line; ``reasons`` say what holds the run, each with the action that
    would move it. A terminal run has one reason (its status) and nothing waiting.
    """

    run_id: str
    flow: str
    status: str
    summary: str
    reasons: tuple[Reason, ...]
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "flow": self.flow, "status": self.status, "summary": self.summary,
                "reasons": [r.to_dict() for r in self.reasons], "at": _plain(self.at)}

    def __str__(self) -> str:
        """The explanation as indented text (what ``iterflow runs explain`` prints): the run, then
        each reason (the first is the summary) with its action, a child's explanation nested."""
        return "\n".join(self._lines(0))

    def _lines(self, depth: int) -> list[str]:
        pad = "  " * depth
        lines = [f"{pad}run {self.run_id} ({self.flow}) is {self.status}"]
        for reason in self.reasons:
            lines.append(f"{pad}  - [{reason.kind}] {reason.message}")
            if reason.action:
                lines.append(f"{pad}    action: {reason.action}")
            if reason.child is not None:
                lines.extend(reason.child._lines(depth + 2))
        return lines


@dataclass(frozen=True)
class WorkerInfo:
    """A row of the workers registry (``engine.list_workers()``): a listening process.

    ``alive`` is False once the worker has not written its row for a lease (it writes it
    every third of one): it stopped without saying so, or cannot reach the database.
    """

    owner: str
    host: str
    pid: int
    flows: tuple[str, ...]
    core: str
    concurrency: int
    lease_ms: int
    started_at: datetime
    last_seen: datetime
    alive: bool

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WorkerInfo:
        return cls(owner=row["owner"], host=row["host"], pid=row["pid"], flows=tuple(row["flows"] or ()),
                   core=row["core"], concurrency=row["concurrency"], lease_ms=row["lease_ms"],
                   started_at=row["started_at"], last_seen=row["last_seen"], alive=bool(row["alive"]))

    def serves(self, flow: str) -> bool:
        """Whether this worker registered ``flow`` (``name@version``)."""
        return flow in self.flows

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self.__dataclass_fields__}
