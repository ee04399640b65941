"""Why is this run stuck? ``engine.explain(run_id)`` as typed reasons, each with what moves it.

One read-only statement per run (``explain_run``: the run, its queue row and lease, its inbox,
the step it retries, the runs ahead of it) and, only when a reason needs it, one read of the
workers registry (``list_workers``, shared by the whole explanation). A parent waiting for a
child carries the child's own explanation, down to ``MAX_DEPTH`` levels. Every reason kind and
its action are listed in docs/operations.md ("Why is this run stuck?"); the kinds are stable,
the messages are for humans.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .cores.base import Core
from .errors import Code
from .fleet import list_workers
from .runner import PARK_RECHECK
from .types import TERMINAL, Explanation, Reason, WorkerInfo
from .worker import MAX_SWEEP, sweep_interval

# How many levels of children an explanation follows (a parent, its child, the grandchild).
MAX_DEPTH = 3
DEFAULT_SCHEMA = "workflow"


@dataclass
class _Reader:
    """One explanation's reads: the core, the schema (for the commands it suggests) and the
    registry, read at most once."""

    core: Core
    schema: str
    _workers: list[WorkerInfo] | None = field(default=None)

    async def workers(self) -> list[WorkerInfo]:
        if self._workers is None:
            self._workers = await list_workers(self.core)
        return self._workers

    def command(self, *words: str) -> str:
        """An ``iterflow`` command line for this engine's schema."""
        schema = [] if self.schema == DEFAULT_SCHEMA else ["--schema", self.schema]
        return " ".join(["iterflow", *words, *schema])


async def explain_run(core: Core, schema: str, run_id: str, depth: int = MAX_DEPTH) -> Explanation | None:
    """The explanation of ``run_id`` (a canonical id), or None when there is no such run."""
    return await _explain(_Reader(core, schema), run_id, depth)


async def limit_of(core: Core, run_id: str) -> Reason | None:
    """The flow-control limit a ready, unleased run waits for (``flow_limit`` or
    ``key_limit``), or None: what ``engine.status`` names for a queued run."""
    rows = await core.admin_query("explain_run", run_id)
    if not rows:
        return None
    row = rows[0]
    if row["status"] in TERMINAL or row["lease_owner"] is not None or not row["queued"] \
            or row["ready_at"] > row["db_now"]:
        return None
    limits = _limits(row)
    return limits[0] if limits else None


async def _explain(reader: _Reader, run_id: str, depth: int) -> Explanation | None:
    rows = await reader.core.admin_query("explain_run", run_id)
    if not rows:
        return None
    row = rows[0]
    reasons = await _reasons(reader, row, depth)
    return Explanation(run_id=str(row["id"]), flow=f"{row['name']}@{row['version']}", status=row["status"],
                       summary=reasons[0].message, reasons=tuple(reasons), at=row["db_now"])


async def _reasons(reader: _Reader, row: Mapping[str, Any], depth: int) -> list[Reason]:
    if row["status"] in TERMINAL:
        return [_terminal(reader, row)]
    reasons: list[Reason] = []
    if row["cancel_reason"] is not None:
        reasons.append(_cancel_requested(row))
    if row["lease_owner"] is not None:
        reasons.append(await _leased(reader, row))
        return reasons
    reasons += await _waits(reader, row, depth)
    if row["queued"] and row["ready_at"] <= row["db_now"]:
        reasons += await _ready(reader, row)
    elif row["queued"] and row["status"] == "pending":
        reasons.append(Reason("delayed", f"its start is delayed until {_t(row['ready_at'])}",
                              until=row["ready_at"]))
    if not reasons:
        reasons.append(_unqueued(row))
    return reasons


def _terminal(reader: _Reader, row: Mapping[str, Any]) -> Reason:
    status, error, at = row["status"], row["error"] or {}, row["finished_at"]
    if status == "done":
        return Reason("done", f"it finished at {_t(at)}; nothing is waiting", since=at)
    what = f"{error.get('code')}: {error.get('message')}"
    if status == "failed":
        return Reason("failed", f"it failed at {_t(at)} with {what}; nothing is waiting",
                      action=f"fix the cause, then {reader.command('runs', 'retry', str(row['id']))} "
                             "(completed steps are kept)",
                      since=at, details={"code": error.get("code"), "error": dict(error)})
    return Reason("canceled", f"it was canceled at {_t(at)} ({error.get('message')}); nothing is waiting",
                  since=at, details={"code": error.get("code"), "reason": error.get("message")})


def _cancel_requested(row: Mapping[str, Any]) -> Reason:
    return Reason(
        "cancel_requested",
        f"cancel requested ({row['cancel_reason']}) but not applied yet: the worker holding its lease "
        "cancels it at its next lease renewal (every third of a lease) or write",
        details={"reason": row["cancel_reason"]},
    )


async def _leased(reader: _Reader, row: Mapping[str, Any]) -> Reason:
    owner, until, seen, now = row["lease_owner"], row["lease_until"], row["owner_seen"], row["db_now"]
    heard = f"its last heartbeat at {_t(seen)}" if seen is not None else "it is not in the workers registry"
    details = {"worker": owner, "last_heartbeat": seen}
    if until > now:
        return Reason("leased", f"running on worker {owner}, lease until {_t(until)} ({heard})",
                      since=row["updated_at"], until=until, details=details)
    live = [w for w in await reader.workers() if w.alive]
    message = (f"the lease of worker {owner} ran out at {_t(until)} ({heard}): the next sweep of expired "
               f"leases makes it claimable again; every live worker sweeps every half lease, at most "
               f"{MAX_SWEEP:g} s")
    action = None
    if live:
        soonest = min(sweep_interval(w.lease_ms) for w in live)
        message += f" (here: within {soonest:g} s)"
    else:
        action = f"start a worker: no live worker is running to sweep it ({reader.command('worker', 'APP:ENGINE')})"
    return Reason("lease_expired", message, action=action, since=until, details=details)


async def _waits(reader: _Reader, row: Mapping[str, Any], depth: int) -> list[Reason]:
    """What the run's recorded wait (``runs.waiting``) says it is waiting for."""
    waiting: Mapping[str, Any] = row["waiting"] or {}
    kind, since = waiting.get("kind"), row["updated_at"]
    until = _when(waiting.get("until"))
    if row["status"] == "awaiting_signal":
        return _signal_waits(reader, row, waiting, until)
    if row["status"] == "sleeping":
        ended = until is not None and until <= row["db_now"]
        message = f"its sleep ended at {_t(until)}" if ended else f"sleeping until {_t(until)}"
        return [Reason("sleeping", message, since=since, until=until)]
    if row["status"] == "retrying":
        return [_retry_backoff(row, waiting, until)]
    if row["status"] == "awaiting_child":
        return [await _awaiting_child(reader, row, waiting, depth)]
    if row["status"] == "parked" or kind == "parked":
        return [_parked(reader, row, waiting)]
    return []


def _signal_waits(reader: _Reader, row: Mapping[str, Any], waiting: Mapping[str, Any],
                  until: datetime | None) -> list[Reason]:
    names = list(waiting.get("signals") or {}) or [waiting.get("name")]
    inbox: list[Mapping[str, Any]] = row["inbox"] or []
    reasons = []
    for name in names:
        queued = [s for s in inbox if s["name"] == name]
        if queued:
            received = _when(queued[0]["received_at"])
            reasons.append(Reason(
                "signal_queued",
                f"signal {name!r} arrived at {_t(received)} and is queued: the run takes it at its next claim",
                since=received, details={"name": name, "queued": len(queued)},
            ))
            continue
        timeout = "no timeout" if until is None else (
            f"timed out at {_t(until)}" if until <= row["db_now"] else f"times out at {_t(until)}")
        reasons.append(Reason(
            "awaiting_signal", f"waiting for signal {name!r} since {_t(row['updated_at'])} ({timeout})",
            action=reader.command("signal", str(row["id"]), str(name), "'<JSON payload>'"),
            since=row["updated_at"], until=until, details={"name": name},
        ))
    return reasons


def _retry_backoff(row: Mapping[str, Any], waiting: Mapping[str, Any], until: datetime | None) -> Reason:
    step: Mapping[str, Any] = row["retry_step"] or {}
    error: Mapping[str, Any] = step.get("error") or {}
    attempt, most = waiting.get("attempt"), waiting.get("max_attempts")
    of = f" of {most}" if most is not None else ""
    return Reason(
        "retry_backoff",
        f"step {waiting.get('step')!r} failed ({error.get('code')}: {error.get('message')}); "
        f"attempt {attempt}{of} {'was due' if until is not None and until <= row['db_now'] else 'is'} "
        f"at {_t(until)}",
        since=row["updated_at"], until=until,
        details={"step": waiting.get("step"), "attempt": attempt, "max_attempts": most,
                 "code": error.get("code"), "error_message": error.get("message")},
    )


async def _awaiting_child(reader: _Reader, row: Mapping[str, Any], waiting: Mapping[str, Any],
                          depth: int) -> Reason:
    child_id = str(waiting.get("child_id"))
    pending = int(waiting.get("children") or 1)
    child = await _explain(reader, child_id, depth - 1) if depth > 1 else None
    status = child.status if child is not None else "unknown"
    more = f" (and {pending - 1} more)" if pending > 1 else ""
    note = "" if child is not None or depth > 1 else f"; {reader.command('runs', 'explain', child_id)} says why"
    return Reason(
        "awaiting_child", f"waiting for child run {child_id} ({status}){more}{note}",
        since=row["updated_at"], details={"child_id": child_id, "child_status": status, "pending": pending},
        child=child,
    )


def _parked(reader: _Reader, row: Mapping[str, Any], waiting: Mapping[str, Any]) -> Reason:
    code, flow, run_id = waiting.get("code"), f"{row['name']}@{row['version']}", str(row["id"])
    if code == Code.FLOW_UNKNOWN:
        fix = f"deploy a worker that registers {flow}"
    else:
        fix = f"deploy code for {flow} whose calls match the recorded history (`iterflow check APP:ENGINE` " \
              "shows what would still strand)"
    return Reason(
        "parked",
        f"parked ({code}): {waiting.get('reason')}; it is re-checked every "
        f"{int(PARK_RECHECK.total_seconds())} s and when a worker of {row['name']} starts",
        action=f"{fix}; or {reader.command('runs', 'cancel', run_id)}",
        since=row["updated_at"], details={"code": code, "reason": waiting.get("reason")},
    )


async def _ready(reader: _Reader, row: Mapping[str, Any]) -> list[Reason]:
    """A claimable queue row: who could claim it, and how many runs a claim takes first."""
    flow = f"{row['name']}@{row['version']}"
    workers = await reader.workers()
    serving = [w for w in workers if w.alive and w.serves(flow)]
    reasons = []
    if not serving:
        seen = [{"owner": w.owner, "flows": list(w.flows), "alive": w.alive, "last_seen": w.last_seen}
                for w in workers]
        listing = "; ".join(f"{w.owner} serves {', '.join(w.flows) or 'nothing'}"
                            f"{'' if w.alive else ' (gone)'}" for w in workers) or "none registered"
        reasons.append(Reason(
            "no_worker", f"ready since {_t(row['ready_at'])}, but no live worker serves {flow} "
                         f"(workers seen: {listing})",
            action=f"start a worker that registers {flow} ({reader.command('worker', 'APP:ENGINE')})",
            since=row["ready_at"], details={"flow": flow, "workers": seen},
        ))
    limited = _limits(row)
    reasons.extend(limited)
    if row["ahead"]:
        reasons.append(Reason(
            "queued_behind", f"{row['ahead']} ready runs of {row['name']} are claimed before it "
                             "(higher priority, or the same priority and ready earlier)",
            since=row["ready_at"], details={"ahead": row["ahead"]},
        ))
    if serving and not row["ahead"] and not limited:
        reasons.append(Reason(
            "ready", f"ready since {_t(row['ready_at'])}: the next claim of a worker serving {flow} takes it",
            since=row["ready_at"], details={"workers": [w.owner for w in serving]},
        ))
    return reasons


def _limits(row: Mapping[str, Any]) -> list[Reason]:
    """The flow-control limits a ready run waits for (docs/guide.md, "Flow control"): its
    flow's places, or its key's, all taken by runs executing now."""
    reasons = []
    flow, key = row["name"], row["concurrency_key"]
    if row["flow_limit"] is not None and row["flow_running"] >= row["flow_limit"]:
        reasons.append(Reason(
            "flow_limit", f"{row['flow_running']} runs of {flow} execute now, its limit (concurrency="
                          f"{row['flow_limit']}): it starts when one of them finishes or suspends",
            since=row["ready_at"], details={"limit": row["flow_limit"], "running": row["flow_running"]},
        ))
    if row["key_limit"] is not None and row["key_running"] >= row["key_limit"]:
        reasons.append(Reason(
            "key_limit", f"{row['key_running']} runs of {flow} with key {key or ''!r} execute now, its "
                         f"limit (key_concurrency={row['key_limit']}): it starts when one of them finishes "
                         "or suspends",
            since=row["ready_at"],
            details={"key": key, "limit": row["key_limit"], "running": row["key_running"]},
        ))
    return reasons


def _unqueued(row: Mapping[str, Any]) -> Reason:
    return Reason(
        "unqueued", f"it is {row['status']} with nothing queued for it: the reconciler re-queues a run "
                    "left like this (docs/operations.md, the reconciler)",
        since=row["updated_at"],
    )


def _when(value: Any) -> datetime | None:
    """A timestamp stored in JSON (``runs.waiting``, the inbox) as a datetime."""
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _t(value: datetime | None) -> str:
    return value.isoformat(timespec="milliseconds") if value is not None else "-"
