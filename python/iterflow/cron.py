"""Cron (docs/operations.md §6): schedules that start runs, exactly once per occurrence across a fleet.

Each due occurrence starts a run keyed ``cron:<name>:<fire-time>`` *before* the schedule is
advanced with a compare-and-set. Any number of workers may tick at once: the idempotency key
makes the run exactly-once, the compare-and-set makes the advance exactly-once, and a crash
between the two only means the next tick finds the run already there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from . import validate
from .cores.base import Core, JsonArg, RunSpec
from .durations import parse_duration
from .errors import InvalidArgument
from .services import ExecutionServices, FlowRef

# A backfill never starts more than this many runs for one cron in one tick.
MAX_BACKFILL = 1000


@dataclass(frozen=True)
class Cron:
    name: str
    schedule: str
    timezone: str
    flow_name: str
    flow_version: int
    input: str
    overlap: str
    jitter: timedelta | None
    backfill: timedelta | None

    @property
    def tag(self) -> str:
        return f"cron:{self.name}"

    def next_after(self, moment: datetime) -> datetime:
        return next_fire(self.schedule, self.timezone, moment)


def _fields(schedule: str) -> int:
    return len(schedule.split())


def next_fire(schedule: str, tz: str, moment: datetime) -> datetime:
    """The first fire time strictly after ``moment``, in UTC (DST handled in the cron's zone)."""
    it = croniter(schedule, moment.astimezone(ZoneInfo(tz)), second_at_beginning=_fields(schedule) == 6)
    fire: datetime = it.get_next(datetime)  # (croniter is untyped)
    return fire.astimezone(UTC)


def define(
    services: ExecutionServices, name: str, schedule: str, flow: FlowRef, input: Any, *, timezone: str = "UTC",
    overlap: str = "skip", jitter: Any = None, backfill: Any = None,
) -> Cron:
    """Validate everything at definition, so a bad expression fails at deploy, not at 3 a.m."""
    validate.name(name, "name")
    if not isinstance(schedule, str) or _fields(schedule) not in (5, 6) or not croniter.is_valid(
        schedule, second_at_beginning=_fields(schedule) == 6
    ):
        raise InvalidArgument(
            "schedule", f"{schedule!r} is not a cron expression (5 fields, or 6 with seconds first)"
        )
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidArgument("timezone", f"{timezone!r} is not an IANA time zone (e.g. 'Europe/Paris')") from exc
    if overlap not in ("skip", "allow"):
        raise InvalidArgument("overlap", f"must be 'skip' or 'allow', got {overlap!r}")
    if not hasattr(flow, "name") or not hasattr(flow, "version"):
        raise InvalidArgument("flow", "pass a Flow or a FlowHandle")
    return Cron(
        name=name, schedule=schedule, timezone=timezone, flow_name=flow.name, flow_version=flow.version,
        input=services.encode_input(flow, input), overlap=overlap,
        jitter=parse_duration(jitter, field="jitter") if jitter is not None else None,
        backfill=parse_duration(backfill, field="backfill") if backfill is not None else None,
    )


def _ms(value: timedelta | None) -> int | None:
    return None if value is None else int(value.total_seconds() * 1000)


async def register(core: Core, crons: dict[str, Cron], now: datetime) -> None:
    for cron in crons.values():
        await core.admin_query(
            "upsert_cron", cron.name, cron.schedule, cron.timezone, cron.flow_name, cron.flow_version,
            JsonArg(cron.input), cron.overlap, _ms(cron.jitter), cron.next_after(now), _ms(cron.backfill),
        )


def occurrences(cron: Cron, first_due: datetime, now: datetime) -> list[datetime]:
    """Fire times to start now: every missed one within ``backfill``, else only the latest."""
    due, moment = [], first_due
    floor = now - cron.backfill if cron.backfill is not None else None
    while moment <= now:
        if floor is None or moment >= floor:
            due.append(moment)
        moment = cron.next_after(moment)
        if len(due) > MAX_BACKFILL:
            due = due[-MAX_BACKFILL:]
    if cron.backfill is None:
        return due[-1:]
    return due


async def tick(core: Core, services: ExecutionServices, crons: dict[str, Cron], now: datetime | None = None) -> int:
    """Start the runs of every due cron defined here; returns how many runs were created."""
    if not crons:
        return 0
    created = 0
    for row in await core.admin_query("due_crons", sorted(crons), now):
        cron = crons.get(row["name"])
        if cron is not None:
            created += await _fire(core, services, cron, row["next_fire_at"], row["now"])
    return created


async def _fire(core: Core, services: ExecutionServices, cron: Cron, first_due: datetime, now: datetime) -> int:
    created = 0
    fired = occurrences(cron, first_due, now)
    for moment in fired:
        if cron.overlap == "skip":
            (live,) = await core.admin_query("cron_live_run", cron.tag)
            if live["exists"]:
                continue
        jitter_ms = int(random.uniform(0, cron.jitter.total_seconds()) * 1000) if cron.jitter else 0
        spec = RunSpec(
            id=services.new_id(), name=cron.flow_name, version=cron.flow_version, input=cron.input,
            idempotency_key=f"cron:{cron.name}:{moment.astimezone(UTC).isoformat()}",
            tags=(cron.tag,), delay_ms=jitter_ms,
        )
        (made,) = await core.insert_runs([spec])
        created += made.created
    last = fired[-1] if fired else None
    await core.admin_query("advance_cron", cron.name, first_due, cron.next_after(now), last)
    return created
