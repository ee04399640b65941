"""What the dashboard reads that the engine's client calls do not offer: the runs list with
every filter the page has, counts per status, flows, workers.

Each read is one named statement of ``sql/queries.sql`` (``dashboard_*``), sent through the
engine's core (``Core.admin_query``), so both cores run it and rows are read by column name.
Every read is bounded: the list is keyset-paginated, counts read at most ``COUNT_CAP`` rows
or the planner's statistics (docs/operations.md, "Dashboard": which count is which).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from ..cores.base import Core, RunFilter
from ..errors import InvalidArgument
from ..types import STATUSES, TERMINAL, decode_cursor, encode_cursor, run_id_of

PAGE_SIZE = 50
# runs a page with a status filter reads at most (the status is checked among them: no index
# covers it); a page that found fewer matches says so and searches on from where it stopped
STATUS_WINDOW = 10_000
# rows a count reads at most; a count that reached it is shown as a lower bound ("≥ n")
COUNT_CAP = 10_000
_HEX = re.compile(r"[0-9a-f]{1,32}")


@dataclass(frozen=True)
class RunsQuery:
    """The runs page's filter, as the page's query string gives it (validated)."""

    flow: str | None = None
    version: int | None = None
    status: str | None = None
    tag: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    q: str | None = None  # a run id or the start of one
    cursor: str | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> RunsQuery:
        """From query parameters; an empty value is no filter. Bad values: ``InvalidArgument``
        naming the parameter."""
        def get(key: str) -> str | None:
            value = params.get(key, "").strip()
            return value or None

        version = get("version")
        status = get("status")
        if status is not None and status not in STATUSES:
            raise InvalidArgument("status", f"unknown status {status!r}; one of {', '.join(STATUSES)}")
        query = cls(flow=get("flow"), version=_version(version), status=status, tag=get("tag"),
                    since=_instant(get("since"), "since"), until=_instant(get("until"), "until"),
                    q=get("q"), cursor=get("cursor"))
        query.id_range()
        if query.cursor is not None:
            decode_cursor(query.cursor)
        return query

    def id_range(self) -> tuple[str, str] | None:
        """The uuid range an id search covers: a whole id is itself, a prefix every id starting so."""
        if self.q is None:
            return None
        whole = run_id_of(self.q)
        if whole is not None:
            return whole, whole
        digits = self.q.lower().replace("-", "")
        if not _HEX.fullmatch(digits):
            raise InvalidArgument("q", "search by run id: hex digits (and dashes), at most a whole id")
        return _uuid(digits.ljust(32, "0")), _uuid(digits.ljust(32, "f"))

    def without(self, *fields: str) -> RunsQuery:
        return replace(self, **dict.fromkeys(fields))

    def is_empty(self) -> bool:
        return self.without("cursor") == RunsQuery()

    def params(self, **changes: Any) -> dict[str, str]:
        """The query string of this filter (with ``changes``), for links and forms."""
        values = {
            "flow": self.flow, "version": self.version, "status": self.status, "tag": self.tag,
            "since": _show_instant(self.since), "until": _show_instant(self.until), "q": self.q,
            "cursor": self.cursor, **changes,
        }
        return {k: str(v) for k, v in values.items() if v is not None}

    def bulk_filter(self) -> RunFilter | None:
        """The engine's bulk filter for this one, or None when it has a part the engine's bulk
        calls cannot express (a version, an id search) or is empty (bulk needs a filter)."""
        if self.version is not None or self.q is not None:
            return None
        flt = RunFilter(name=self.flow, statuses=[self.status] if self.status else None, tag=self.tag,
                        since=self.since, until=self.until)
        return None if flt.is_empty() else flt

    def _filter_args(self) -> tuple[Any, ...]:
        lo, hi = self.id_range() or (None, None)
        return (self.flow, self.version, self.status, self.tag, self.since, self.until, lo, hi)


@dataclass(frozen=True)
class Page:
    """One page of runs. ``searched``: the page's status filter was checked on only that many
    runs (the window), and ``next_cursor`` searches on after them."""

    runs: list[dict[str, Any]]
    next_cursor: str | None
    searched: int | None = None


@dataclass(frozen=True)
class StatusCount:
    """One status's count and how exact it is: ``"="`` exact, ``"≥"`` a lower bound (the read
    stopped at ``COUNT_CAP`` rows), ``"≈"`` the planner's estimate for the whole table."""

    status: str
    n: int
    kind: str

    @property
    def label(self) -> str:
        prefix = "" if self.kind == "=" else f"{self.kind} "
        return f"{prefix}{self.n:,}"


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or not 1 <= int(text) < 2**31:
        raise InvalidArgument("version", f"must be a positive integer, got {text!r}")
    return int(text)


def _instant(text: str | None, field: str) -> datetime | None:
    """A time from the page's form (``datetime-local``, read as UTC) or an ISO 8601 one."""
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(field, f"not a date and time (YYYY-MM-DDTHH:MM, UTC): {text[:40]!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _show_instant(value: datetime | None) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M") if value is not None else None


def _uuid(digits: str) -> str:
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


async def runs_page(core: Core, query: RunsQuery, size: int = PAGE_SIZE) -> Page:
    """One page of runs, newest first, after ``query.cursor``; with a status filter, among at
    most ``STATUS_WINDOW`` runs (``Page.searched``)."""
    at, after = decode_cursor(query.cursor) if query.cursor else (None, None)
    args = query._filter_args()
    # without a status the window is the page itself: the planner sees how few rows are wanted
    window = STATUS_WINDOW if query.status is not None else size + 1
    rows = await core.admin_query("dashboard_runs", *args, at, after, size + 1, window)
    runs = rows[:size]
    if len(rows) > size:
        return Page(runs, encode_cursor(runs[-1]["created_at"], runs[-1]["id"]))
    if query.status is None:
        return Page(runs, None)
    others = (*args[:2], *args[3:])  # the filter without the status
    ends = await core.admin_query("dashboard_window_end", *others, at, after, STATUS_WINDOW)
    if not ends or int(ends[0]["scanned"]) < STATUS_WINDOW:
        return Page(runs, None)
    return Page(runs, encode_cursor(ends[0]["created_at"], ends[0]["id"]), searched=STATUS_WINDOW)


async def status_counts(core: Core, query: RunsQuery) -> list[StatusCount]:
    """Runs per status for the filter without its status (the page's status tabs).

    Live statuses: exact, from the live runs (few; ``≥`` past ``COUNT_CAP``). Terminal ones:
    with no filter, the planner's estimate for the whole table (``≈``); with one, exact
    among the newest ``COUNT_CAP`` matching runs (``≥`` when there are more).
    """
    scope = query.without("status", "cursor")
    args = scope._filter_args()
    live_rows = await core.admin_query("dashboard_live_counts", *args, COUNT_CAP + 1)
    live = {r["status"]: int(r["n"]) for r in live_rows}
    live_kind = "≥" if sum(live.values()) > COUNT_CAP else "="
    terminal, kind = {}, "≈"
    if scope.is_empty():
        terminal = {r["status"]: int(r["n"]) for r in await core.admin_query("dashboard_status_estimates")
                    if r["status"] in TERMINAL}
    if not terminal:
        rows = await core.admin_query("dashboard_recent_counts", *args, COUNT_CAP + 1)
        terminal = {r["status"]: int(r["n"]) for r in rows if r["status"] in TERMINAL}
        kind = "≥" if sum(int(r["n"]) for r in rows) > COUNT_CAP else "="
    return [StatusCount(s, terminal.get(s, 0), kind) if s in TERMINAL else StatusCount(s, live.get(s, 0), live_kind)
            for s in STATUSES]


@dataclass(frozen=True)
class FlowRow:
    name: str
    version: int
    last_created: datetime | None
    live: dict[str, int]
    last_5m: dict[str, int]
    last_hour: dict[str, int]


async def flows(core: Core) -> list[FlowRow]:
    """Every flow version with runs: live runs per status, and what finished recently."""
    found = await core.admin_query("dashboard_flows")
    live = await core.admin_query("dashboard_flow_live")
    recent = await core.admin_query("dashboard_flow_throughput")
    out = []
    for row in found:
        key = (row["name"], row["version"])
        out.append(FlowRow(
            name=row["name"], version=int(row["version"]), last_created=row["last_created"],
            live=_by_status(live, key, "n"), last_5m=_by_status(recent, key, "last_5m"),
            last_hour=_by_status(recent, key, "last_hour"),
        ))
    return out


def _by_status(rows: Sequence[Mapping[str, Any]], key: tuple[str, int], column: str) -> dict[str, int]:
    return {r["status"]: int(r[column]) for r in rows if (r["name"], r["version"]) == key and r[column]}


async def workers(core: Core) -> list[dict[str, Any]]:
    """The owners of the queue's leases: who executes runs now, how many, until when."""
    return await core.admin_query("dashboard_workers")
