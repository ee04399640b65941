"""Per-step limits: a named limit that steps of any flow share, fleet-wide.

For when the scarce thing is one call (an API that takes 5 requests at a time, a provider that
takes 100 a minute), not the whole run: ``create_engine(step_limits={"call-openai":
StepLimit(concurrency=5)})`` and ``ctx.step("ask", fn, limit="call-openai")``. Semantics and
failure modes: docs/guide.md, "Flow control".

- **Concurrency** is a permit per running step call, a row of ``step_permits`` taken by the
  ``acquire_permit`` function in one short statement (serialized per (limit, key) by an
  advisory lock, never fleet-wide) and given back by ``release_permit`` when the call ends. A
  permit counts only while its run's lease, the one it was taken under, is alive: a dead
  worker's permits come back when its lease expires, and the heartbeat that renews the lease
  renews them. A step waiting for a permit holds no connection: it waits for ``l <limit>``
  (the core's listener, ``Core.wait_limit``), with a timer at the earliest holder's lease
  expiry as the safety net.
- **Rate** is a GCRA per (limit, key): ``"100/1m"`` is an emission interval of 0.6 s with a
  burst of ``burst`` calls (default 1: evenly spaced). ``take_rate`` reserves the earliest slot
  the rate allows, up to ``RATE_HORIZON`` ahead; the step then sleeps locally until its slot,
  keeping its run's lease and its worker slot, with no more statements.
- **Keys**: ``per_key=True`` counts each key apart; the key is the step's ``limit_key=``, or
  else the run's key (``start(..., key=)`` or the flow's key function, read by the database).

The limits are configuration, read by the processes that run the steps: processes that share
a limit must configure it alike (a changed limit applies to new acquisitions at once).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from . import validate
from .durations import parse_duration
from .errors import Code, FlowRuntimeError, InvalidArgument
from .observe import Hooks

if TYPE_CHECKING:
    from .cores.base import Core
    from .steps import AbortToken

# The most permits or calls a limit may name (a bigger one is no limit at all).
MAX_LIMIT = 1_000_000
# How far ahead a rate-limited call may reserve its slot. Further away, it asks again when a
# slot comes within reach: a run does not sit on its lease for hours waiting for one.
RATE_HORIZON = 60.0
# The longest a permit wait sleeps without hearing a release (a lost notification, a listener
# reconnecting): the earliest holder's lease expiry is usually sooner.
PERMIT_RECHECK = 30.0

_RATE = re.compile(r"^\s*(\d+)\s*/\s*(.+?)\s*$")


@dataclass(frozen=True)
class StepLimit:
    """One named limit. ``concurrency``: at most that many steps using it run at once across
    the fleet; ``rate``: ``"N/<duration>"`` calls, evenly spaced, with ``burst`` calls allowed
    back to back; ``per_key``: counted per key (the step's ``limit_key``, else the run's key)
    instead of globally. Set at least one of ``concurrency`` and ``rate`` (both: the permit is
    taken first)."""

    concurrency: int | None = None
    per_key: bool = False
    rate: str | None = None
    burst: int = 1

    def checked(self, where: str) -> StepLimit:
        """This limit, or ``InvalidArgument`` naming the bad field (``where`` + field)."""
        if self.concurrency is not None:
            validate.integer(self.concurrency, f"{where}.concurrency", 1, MAX_LIMIT)
        validate.flag(self.per_key, f"{where}.per_key")
        validate.integer(self.burst, f"{where}.burst", 1, MAX_LIMIT)
        if self.rate is not None:
            _interval_ms(self.rate, f"{where}.rate")
        if self.concurrency is None and self.rate is None:
            raise InvalidArgument(where, "sets neither concurrency nor rate")
        return self

    @property
    def interval_ms(self) -> float:
        """The rate's emission interval: milliseconds between two calls at the steady rate."""
        assert self.rate is not None
        return _interval_ms(self.rate, "rate")


@lru_cache(maxsize=256)
def _interval_ms(rate: Any, field: str) -> float:
    if not isinstance(rate, str) or (match := _RATE.match(rate)) is None:
        raise InvalidArgument(field, f"must be 'N/<duration>' like '100/1m' or '5/s', got {validate.show(rate)}")
    count, per = int(match.group(1)), match.group(2)
    if not per[0].isdigit():
        per = f"1{per}"  # "5/s": per one second
    window = parse_duration(per, field=field).total_seconds() * 1000
    if not 1 <= count <= MAX_LIMIT or window <= 0:
        raise InvalidArgument(field, f"needs 1 to {MAX_LIMIT:,} calls per a positive duration, got {rate!r}")
    return window / count


def coerce(value: Any) -> dict[str, StepLimit]:
    """``create_engine(step_limits=...)``: a mapping of limit names to ``StepLimit`` or to a
    dict of its fields, each checked now (a typed error naming the field)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument("step_limits", f"must be a dict of name -> StepLimit, got {validate.show(value)}")
    out = {}
    known = {f.name for f in fields(StepLimit)}
    for name, limit in value.items():
        where = f"step_limits.{validate.name(name, 'step_limits')}"
        if isinstance(limit, Mapping):
            unknown = sorted(set(limit) - known, key=str)
            if unknown:
                raise InvalidArgument(f"{where}.{unknown[0]}", f"unknown option; known: {', '.join(sorted(known))}")
            limit = StepLimit(**limit)
        if not isinstance(limit, StepLimit):
            raise InvalidArgument(where, f"must be a StepLimit or a dict, got {validate.show(limit)}")
        out[name] = limit.checked(where)
    return out


@dataclass(frozen=True)
class Permit:
    """A held permit of a concurrency limit, given back by ``StepLimits.release``."""

    name: str
    key: str
    run_id: str
    step_key: str
    maximum: int


class StepLimits:
    """The engine's limits and the waits for them (one per engine, in ``ExecutionServices``)."""

    def __init__(self, limits: Mapping[str, StepLimit], core: Core, hooks: Hooks) -> None:
        self.limits = dict(limits)
        self._core = core
        self._hooks = hooks

    def resolve(self, name: str, limit_key: str | None) -> tuple[StepLimit, str | None]:
        """The limit a step names and the key it counts under: '' for a global limit, the
        step's ``limit_key`` for a per-key one, or None for the run's key (found by the
        database: ``start(..., key=)`` or the flow's key function; '' without one)."""
        limit = self.limits.get(name)
        if limit is None:
            known = ", ".join(sorted(self.limits)) or "none"
            raise InvalidArgument("limit", f"no step limit named {name!r} (configured: {known})")
        return limit, limit_key if limit.per_key else ""

    async def acquire(self, name: str, limit_key: str | None, run_id: str, step_key: str, lease_token: int,
                      abort: AbortToken) -> Permit | None:
        """Wait for the limit's permit (if it has a concurrency) and then its rate slot (if it
        has a rate). Returns the permit to release. A fired ``abort`` ends the wait with the
        step's error, giving back a permit already held."""
        limit, key = self.resolve(name, limit_key)
        permit = None
        if limit.concurrency is not None:
            permit = await self._take_permit(name, key, run_id, step_key, lease_token, limit.concurrency, abort)
            key = permit.key
        if limit.rate is not None:
            try:
                await self._take_rate(name, key, run_id, limit, abort)
            except BaseException:
                if permit is not None:
                    await self.release(permit)
                raise
        return permit

    async def release(self, permit: Permit) -> None:
        await self._core.release_permit(permit.name, permit.key, permit.run_id, permit.step_key, permit.maximum)

    async def _take_permit(self, name: str, key: str | None, run_id: str, step_key: str, lease_token: int,
                           maximum: int, abort: AbortToken) -> Permit:
        while True:
            # the stamp is read before asking, so that a release after the answer wakes us; the
            # run's key (None) is known from the first answer, which is then asked again at once
            seen = None if key is None else self._core.limit_seen(_channel(name, key))
            granted, wait, key = await self._core.acquire_permit(name, key, run_id, step_key, lease_token, maximum)
            self._hooks.emit("step_limit", name, "granted" if granted else "waiting")
            if granted:
                return Permit(name, key, run_id, step_key, maximum)
            if seen is not None:
                timeout = min(max(wait or 0.0, 0.01), PERMIT_RECHECK)
                await _unless_aborted(self._core.wait_limit(_channel(name, key), seen, timeout), abort, name)

    async def _take_rate(self, name: str, key: str | None, run_id: str, limit: StepLimit, abort: AbortToken) -> None:
        while True:
            granted, wait = await self._core.take_rate(
                name, key, run_id, limit.interval_ms, limit.burst, RATE_HORIZON * 1000)
            self._hooks.emit("step_limit", name, "granted" if granted else "waiting")
            if wait > 0:
                await _unless_aborted(asyncio.sleep(wait), abort, name)
            if granted:
                return


def _channel(name: str, key: str) -> str:
    """What a release of (name, key) is announced as: ``l <channel>`` (release_permit)."""
    return name if not key else f"{name} {key}"


async def _unless_aborted(wait: Awaitable[Any], abort: AbortToken, name: str) -> None:
    """Await ``wait`` unless the step's abort token fires first (then the step fails with it)."""
    waiting = asyncio.ensure_future(wait)
    aborted = asyncio.ensure_future(abort.wait())
    try:
        await asyncio.wait((waiting, aborted), return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        aborted.cancel()
    if abort.aborted:
        raise FlowRuntimeError(Code.STEP_FAILED, f"step aborted while waiting for limit {name!r}: {abort.reason}")
    if waiting.done() and not waiting.cancelled():
        waiting.result()  # a failure of the wait itself (the database) is the caller's
