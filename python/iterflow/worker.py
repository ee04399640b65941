"""The worker loop: claim batches sized to free slots, execute, renew leases, maintain.

Wake-ups come from LISTEN (new work), from local timers (a run this process suspended until
soon), from freed slots, and from a poll as the safety net; the database stays the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import timedelta
from typing import Any

from .config import Retention
from .control import limits_json
from .cores.base import ClaimedRun, Handoff, LeaseState, Woken, held_history
from .errors import DatabaseError, DatabaseUnavailable, EngineStateError
from .fleet import Registration
from .flow import Flow
from .runner import Execution
from .services import ExecutionServices
from .sticky import StickyCache, StickyHolder, WakeTimers
from .types import TERMINAL

log = logging.getLogger("iterflow")
# How often due crons are checked: the lateness bound of a cron fire.
CRON_TICK = 0.25
# Seconds an idle worker trusts its last look at the earliest timer of its flows (other
# processes' timers: its own are woken locally). Without it every idle turn under load, one
# per finished run or wake-up, would cost a query.
DUE_RECHECK = 0.05
# Seconds stop() lets a claim in flight finish before cancelling it.
CLAIM_STOP_GRACE = 5.0
# Longest interval between two sweeps of expired leases (see sweep_interval).
MAX_SWEEP = 5.0
# Longest wait of one call for held-run wake-ups from other processes.
HELD_WAKEUP_WAIT = 5.0
# Seconds before a second claim by id of a held run whose first one claimed nothing.
RESUME_RETRY = 0.05
# A handoff taken later than this share of its lease (the worker was busy) is given back, not
# resumed: its lease may run out under the body, and another worker replay the same step.
STALE_HANDOFF = 0.5
# Longest seconds before the short lease of a run handed to this worker is extended (at most
# a quarter of the sticky window, the handoff's lease): one statement for the runs handed in
# that time.
CONFIRM_DELAY = 0.05


def sweep_interval(lease_ms: int) -> float:
    """Seconds between a worker's sweeps of expired leases: half its lease, at most
    ``MAX_SWEEP`` (engine.explain quotes this rule for a run whose lease ran out)."""
    return min(max(lease_ms / 2000, 0.05), MAX_SWEEP)


class Worker:
    def __init__(
        self, services: ExecutionServices, flows: Mapping[tuple[str, int], Flow], *, concurrency: int, lease: timedelta,
        poll_interval: float, reconcile_interval: float | None, shutdown_timeout: float, retention: Retention,
        cron_tick: Callable[[], Awaitable[int]] | None = None, notify: bool = True,
        sticky: StickyCache | None = None, sticky_window_ms: int = 0,
    ) -> None:
        self.services = services
        self.flows = flows
        self.concurrency = concurrency
        self.lease_ms = int(lease.total_seconds() * 1000)
        self.poll_interval = poll_interval
        self.reconcile_interval = reconcile_interval
        self.shutdown_timeout = shutdown_timeout
        self.retention = retention
        self.cron_tick = cron_tick
        self.notify = notify
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        # suspended runs kept alive here (sticky.py); None: every resume replays
        self.sticky = sticky
        # a worker that listens hears `H` notices: the transaction that wakes a run it holds
        # may hand the run over at once (migration 0014)
        self.holder = StickyHolder(self.owner, sticky_window_ms, hand_off=notify) if sticky is not None else None
        # woken held runs that cannot go on yet (no free slot, or a handoff that came while its
        # run's suspension was still being recorded here): looked at again as executions end
        self._later = Woken()
        self._to_confirm: list[tuple[str, int]] = []  # handed runs whose short lease to extend
        self._slot_freed = asyncio.Event()  # an execution ended (_held_wakeup_loop waits for one)
        self._background: set[asyncio.Task[Any]] = set()
        self._due: dict[str, bool] = {}  # held runs woken, to claim by id: run id -> last try
        self._resuming: set[str] = set()  # held runs with a claim by id in flight
        self._resumer: asyncio.Task[None] | None = None  # claims the due ones (_resume_due)
        self.timers = WakeTimers(services.clock, self.wake_held)  # the held runs' own timers
        self.active: dict[str, tuple[Execution, asyncio.Task[Any]]] = {}
        self.paused = False
        self._may_claim = asyncio.Event()  # a slot freed up, a nudge, or stop: see _wait_for_slot
        self._full = False
        self._due_checked = -DUE_RECHECK
        self._due_at: float | None = None  # loop time of the earliest timer seen at that check
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self.registration = Registration.of(self.owner, flows, services.core.name, concurrency, self.lease_ms)
        self._registered = False  # started and not yet withdrawn: a second stop() deletes nothing

    @property
    def sweep_interval(self) -> float:
        """Seconds between sweeps of expired leases (see ``sweep_interval``)."""
        return sweep_interval(self.lease_ms)

    @property
    def names(self) -> list[str]:
        return sorted({name for name, _ in self.flows})

    async def start(self) -> None:
        await self.services.core.listen()
        await self.services.core.requeue_parked(self.names)
        # the limits of the flows served here, before the first claim enforces them
        await self.services.core.admin_query(
            "upsert_flow_limits", limits_json((name, flow.control) for (name, _), flow in self.flows.items()))
        await self.registration.announce(self.services.core)
        self._registered = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._claim_loop(), name="iterflow-claim"),
            loop.create_task(self._heartbeat_loop(), name="iterflow-heartbeat"),
            loop.create_task(self._maintenance_loop(), name="iterflow-maintenance"),
            loop.create_task(self._registry_loop(), name="iterflow-registry"),
        ]
        if self.cron_tick is not None:
            self._tasks.append(loop.create_task(self._cron_loop(), name="iterflow-cron"))
        if self.sticky is not None:
            self._tasks.append(loop.create_task(self._held_wakeup_loop(), name="iterflow-held-wakeups"))

    def nudge(self) -> None:
        """New work may be ready (a local timer, a cron fire, a call in this process): claim now
        instead of at the next notification or poll."""
        self._may_claim.set()
        self.services.core.nudge()

    def nudge_after(self, delay: float) -> None:
        """Local timer: claim again when a run this process suspended becomes due."""
        asyncio.get_running_loop().call_later(max(delay, 0.0), self.nudge)

    async def stop(self) -> None:
        """Stop claiming, let in-flight runs finish until the deadline, then abort them."""
        self._stopping = True
        if self.sticky is not None:
            await self._unstick(self.sticky.clear())
        self.nudge()
        for task in self._tasks[:1]:
            # a claim in flight finishes (its runs join the ones drained below); cancelling it
            # could strand runs it leased until their leases expire
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), CLAIM_STOP_GRACE)
            await _cancel(task)
        pending = [task for _, task in self.active.values()]
        if pending:
            _done, still = await asyncio.wait(pending, timeout=self.shutdown_timeout)
            unfinished = [(run_id, ex.run.lease_token) for run_id, (ex, task) in self.active.items()
                          if not task.done()]
            for execution, _ in list(self.active.values()):
                execution.abort("worker shutting down", cancel=False)
            if still:
                await asyncio.wait(still, timeout=1.0)
                for task in still:
                    task.cancel()
            await self.release(unfinished)
        if self.sticky is not None:  # (runs that suspended while draining)
            await self._unstick(self.sticky.clear())
            self.timers.clear()
        for task in self._tasks[1:]:
            await _cancel(task)
        if self._registered:
            self._registered = False
            await self.registration.withdraw(self.services.core)

    async def _unstick(self, held: list[tuple[str, Any]]) -> None:
        """Stopping: the runs this worker held go back to the fleet now, not after the window
        (a worker that dies instead leaves them to the window)."""
        pairs = [(run_id, ex.run.lease_token) for run_id, ex in held if isinstance(ex, Execution)]
        if not pairs:
            return
        try:
            await self.services.core.admin_query("unstick_runs", [p[0] for p in pairs], [p[1] for p in pairs])
        except Exception as exc:  # noqa: BLE001 - their window then runs out as after a crash
            log.warning("iterflow could not hand back %d held runs (%r)", len(pairs), exc)

    async def release(self, leases: list[tuple[str, int]]) -> None:
        """Give these leases back so the rest of the fleet claims the runs at once, instead of
        when the leases run out (fenced by token: a lease already lost is left alone)."""
        if not leases:
            return
        try:
            await self.services.core.admin_query(
                "release_leases", [run_id for run_id, _ in leases], [token for _, token in leases]
            )
        except Exception as exc:  # noqa: BLE001 - the leases then expire as after a crash
            log.warning("iterflow could not release %d leases (%r); they expire in %.0fs",
                        len(leases), exc, self.lease_ms / 1000)

    # -- claiming ------------------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        names = self.names
        wait: float | None = None  # how long the next claim first waits for a wake-up; None: not at all
        while not self._stopping:
            free = self.concurrency - len(self.active)
            if free <= 0 or self.paused:
                await self._wait_for_slot()
                wait = None
                continue
            try:
                runs = await self.services.core.claim(names, free, self.owner, self.lease_ms, wait)
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not kill the loop
                log.warning("iterflow claim failed: %r", exc)
                await asyncio.sleep(min(self.poll_interval, 1.0))
                wait = None
                continue
            if runs:  # read before the batch's executions start: the tightest reading (clock.py)
                self.services.clock.observe(runs[0].db_now)
            for run in runs:
                self._spawn(run)
            wait = None if len(runs) == free else await self._wait_budget(names)

    async def _wait_for_slot(self) -> None:
        """Every slot is busy (or claiming is paused): until one frees up, or a poll interval."""
        self._may_claim.clear()
        self._full = True
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._may_claim.wait(), self.poll_interval)
        finally:
            self._full = False

    async def _wait_budget(self, names: list[str]) -> float:
        """How long the next claim may wait for a wake-up: the poll interval, or less when a
        timer of these flows (another process's; ours are woken locally) comes due sooner."""
        due_at = await self._next_due(names)
        if due_at is None:
            return self.poll_interval
        return min(self.poll_interval, max(due_at - asyncio.get_running_loop().time(), 0.001))

    async def _next_due(self, names: list[str]) -> float | None:
        """Loop time of the earliest timer of these flows, re-read when the last look is older
        than ``DUE_RECHECK`` or its timer has come (and was just claimed, most likely)."""
        now = asyncio.get_running_loop().time()
        stale = now - self._due_checked >= DUE_RECHECK
        if stale or (self._due_at is not None and self._due_at <= now):
            with contextlib.suppress(Exception):
                due = await self.services.core.next_due(names)
                self._due_checked = now
                self._due_at = None if due is None else now + due
        return self._due_at

    def _spawn(self, run: Any) -> None:
        held = self.sticky.take(run.run_id) if self.sticky is not None else None
        if held is not None:
            assert self.sticky is not None and isinstance(held, Execution)
            if run.held_token == held.run.lease_token and held.held:
                # its wake-up reached a claim of this worker first (a signal sent from another
                # process, a timer raced): the history came along, but the body goes on held
                self.sticky.count("adopted")
                self._start(held, held.resume(run))
                return
            held.drop()  # another worker advanced the run since: replay
            self.sticky.count("stale")
        execution = Execution(run, self.services, self.flows, self.holder)
        self._start(execution, execution.execute())

    def _start(self, execution: Execution, work: Coroutine[Any, Any, str]) -> None:
        run_id = execution.run.run_id
        task = asyncio.get_running_loop().create_task(self._execute(execution, work), name=f"iterflow-run-{run_id}")
        self.active[run_id] = (execution, task)

    # -- the sticky cache ---------------------------------------------------------------------------
    def wake_held(self, run_id: str, token: int | None = None, *, last_try: bool = False) -> None:
        """A wake-up of ``run_id`` reached this process (its timer, a signal delivered here, a
        child finished here, an announcement from another process): if this worker holds the
        run (suspended under ``token``, when given), claim it by id and go on with its body."""
        if self.sticky is None or self._stopping or run_id in self._resuming or run_id in self._due:
            return
        held = self.sticky.get(run_id)
        if not isinstance(held, Execution) or (token is not None and held.run.lease_token != token):
            if held is None and token is not None:
                # its own timer, but the run was evicted meanwhile: it is still marked as held
                # by this worker, whose claim takes it at once (every other claim would wait
                # out the window), so claim now instead of at the next poll
                self.nudge()
            return
        self._due[run_id] = last_try
        self._start_resumer()

    def _start_resumer(self) -> None:
        if self._due and (self._resumer is None or self._resumer.done()):
            self._resumer = asyncio.get_running_loop().create_task(self._resume_due(), name="iterflow-resume")

    async def _resume_due(self) -> None:
        """Claim the held runs woken so far by id, all in one statement (as many as there are
        free slots; a run finishing starts this again), while wake-ups go on arriving: under a
        burst of wake-ups every claim takes all that came during the one before."""
        while self._due and not self._stopping:
            free = self.concurrency - len(self.active)
            if free <= 0:
                return
            batch = list(self._due.items())[:free]
            for run_id, _ in batch:
                del self._due[run_id]
            await self._resume_batch(batch)

    async def _resume_batch(self, batch: list[tuple[str, bool]]) -> None:
        """Claim ``batch`` (run id, last try) by id; a held run the claim leased goes on with its
        body. The runs stay in the cache while the claim is in flight, so that a claim of this
        worker with the history that gets one first adopts the held body (``_spawn``). A run the
        claim by id left out is tried once more a moment later (another claim may hold its row
        right now); then its held body is dropped and the run takes the normal claim and replay
        (another worker advanced it, or it was canceled)."""
        assert self.sticky is not None
        held = {run_id: (ex, last) for run_id, last in batch if isinstance(ex := self.sticky.get(run_id), Execution)}
        if not held:
            return
        self._resuming.update(held)
        try:
            runs = await self.services.core.claim_runs(
                list(held), self.owner, self.lease_ms, [ex.run.lease_token for ex, _ in held.values()])
        except Exception as exc:  # noqa: BLE001 - the normal path takes over
            log.warning("iterflow could not resume %d held runs by id: %r", len(held), exc)
            runs = []
        finally:
            self._resuming.difference_update(held)
        await self._go_on(Woken(claimed=runs))
        left_out = False
        for run_id, (execution, last_try) in held.items():
            if run_id in self.active or self.sticky.get(run_id) is not execution:
                continue  # resumed, or adopted by a claim with the history, or dropped
            left_out = True
            if last_try or self._stopping:
                self.sticky.discard(run_id, "stale")
            else:
                asyncio.get_running_loop().call_later(RESUME_RETRY, self._last_try, run_id, execution.run.lease_token)
        if left_out:
            self.nudge()

    async def _go_on(self, woken: Woken) -> None:
        """Held runs claimed by id, or handed to this worker by the transaction that woke them:
        each goes on with its held body (a hit), unless that body was dropped meanwhile or the
        worker is stopping; then its lease is given back at once. Runs beyond the free slots
        (the wake-ups were taken when more were free), and a handoff that comes while its run
        is still suspending here, wait in ``_later`` until an execution ends."""
        assert self.sticky is not None
        nows = [r.db_now for r in woken.claimed] + [h.db_now for h in woken.handed]
        if nows:  # read before their executions go on (clock.py)
            self.services.clock.observe(max(nows))
        release: list[tuple[str, int]] = []
        room = self.concurrency - len(self.active)
        for run in woken.claimed:
            if room <= 0 and not self._stopping:
                self._later.claimed.append(run)
            elif self._resume_held(run):
                room -= 1
            else:
                release.append((run.run_id, run.lease_token))
        handed: list[tuple[str, int]] = []
        for h in woken.handed:
            suspending = h.run_id in self.active and h.run_id not in self.sticky
            if (suspending or room <= 0) and not self._stopping:
                self._later.handed.append(h)
                continue
            claim = await self._handed_run(h)
            if claim is not None and self._resume_held(claim):
                room -= 1
                self.sticky.count("handed")
                handed.append((claim.run_id, claim.lease_token))
            else:
                release.append((h.run_id, h.lease_token))
        if handed:
            self._confirm_soon(handed)
        if release:
            await self.release(release)
            self.nudge()

    def _resume_held(self, run: ClaimedRun) -> bool:
        """Go on with the held body of ``run`` if it is the one the run suspended with."""
        assert self.sticky is not None
        execution = self.sticky.get(run.run_id)
        if (not isinstance(execution, Execution) or run.held_token != execution.run.lease_token
                or self._stopping):
            return False
        self.sticky.take(run.run_id)
        self.sticky.count("hit")
        self._start(execution, execution.resume(run))
        return True

    async def _handed_run(self, h: Handoff) -> ClaimedRun | None:
        """The claim a handoff stands for: the held execution's run with the handoff's lease,
        attempt and records (read, when they were too large for the notice). None: the body
        is not held here under that token."""
        assert self.sticky is not None and self.holder is not None
        execution = self.sticky.get(h.run_id)
        if not isinstance(execution, Execution) or execution.run.lease_token != h.held_token:
            return None
        db_now = self.services.clock.now()
        if db_now is not None and (db_now - h.db_now).total_seconds() * 1000 > self.holder.hand_ms * STALE_HANDOFF:
            return None  # its short lease may be gone by now: let the fleet have the run
        history = h.history
        if history is None:
            assert execution.ctx is not None
            try:
                rows = await self.services.core.admin_query(
                    "handed_records", h.run_id, h.lease_token, execution.ctx.held_keys())
            except Exception as exc:  # noqa: BLE001 - released: the run replays elsewhere
                log.warning("iterflow could not read the records of handed run %s: %r", h.run_id, exc)
                return None
            if not rows:  # the lease is gone already
                return None
            history = held_history(rows[0]["steps"])
        return dataclasses.replace(
            execution.run, lease_token=h.lease_token, attempts=h.attempts, cancel_reason=None,
            parent_status=h.parent_status, db_now=h.db_now, held_token=h.held_token, history=history)

    def _confirm_soon(self, leases: list[tuple[str, int]]) -> None:
        """A handoff leases its run for the sticky window only, so that a holder that died
        leaves it to the fleet soon: the living holder extends it to a full lease while the
        body already goes on, for all the runs handed over within ``CONFIRM_DELAY`` at once
        (one statement, not one per wake-up)."""
        assert self.holder is not None
        if not self._to_confirm:
            asyncio.get_running_loop().call_later(
                min(CONFIRM_DELAY, self.holder.hand_ms / 4000), lambda: self._in_background(self._confirm()))
        self._to_confirm.extend(leases)

    async def _confirm(self) -> None:
        leases, self._to_confirm = self._to_confirm, []
        try:
            self._apply_lease_states(leases, await self.services.core.heartbeat(leases, self.lease_ms))
        except Exception as exc:  # noqa: BLE001 - the short lease may run out: at least once
            log.warning("iterflow could not extend the leases of %d handed runs: %r", len(leases), exc)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _held_wakeup_loop(self) -> None:
        """Held runs woken by other processes (a signal sent, a child finished there: ``h``
        and ``H`` notifications naming this worker), claimed by id by the core as the wake-ups
        arrive, or handed over already (``Core.claim_woken``), as many as there are free
        slots, then resumed like at a timer. While every slot is busy the wake-ups wait: an
        announced run for this worker's claim (or another worker's, after the window), a
        handed one until it is too old to resume (then it is given back)."""
        while True:
            try:
                free = self.concurrency - len(self.active)
                if free <= 0:
                    self._slot_freed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._slot_freed.wait(), self.poll_interval)
                    continue
                await self._go_on(await self.services.core.claim_woken(
                    self.owner, self.lease_ms, free, HELD_WAKEUP_WAIT))
            except Exception as exc:  # noqa: BLE001 - the runs then wait for this worker's claim
                log.warning("iterflow could not claim woken held runs: %r", exc)
                await asyncio.sleep(self.poll_interval)

    def _last_try(self, run_id: str, token: int) -> None:
        self.wake_held(run_id, token, last_try=True)

    def _hold(self, execution: Execution) -> None:
        """Keep a run that suspended with its body held, and resume it at its own timer."""
        assert self.sticky is not None and execution.ctx is not None
        ctx, run = execution.ctx, execution.run
        self.sticky.put(run.run_id, execution)
        times = [s.wake_at for s in ctx.suspensions if s.wake_at is not None]
        if times:
            self.timers.add(min(times), run.run_id, run.lease_token)

    async def _execute(self, execution: Execution, work: Coroutine[Any, Any, str]) -> None:
        run_id = execution.run.run_id
        abandoned = False
        try:
            status = await work
            abandoned = status == "abandoned"
            if execution.kept:
                self._hold(execution)
            elif status in ("sleeping", "retrying", "awaiting_signal"):
                self._nudge_at_timer(execution)
            elif status in TERMINAL and execution.run.parent_id is not None and not self.notify:
                # finishing woke the parent (with notifications its wake-up reaches its holder,
                # handed over or announced: claim_woken)
                self.wake_held(execution.run.parent_id)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("iterflow run %s crashed the worker's execution", run_id, extra={"run_id": run_id})
        finally:
            # a run woken while it suspended may already be claimed again (a new execution
            # under the same id): only remove our own entry
            entry = self.active.get(run_id)
            if entry is not None and entry[0] is execution:
                del self.active[run_id]
            if self._later:  # a slot is free now, and this run's suspension is recorded
                later, self._later = self._later, Woken()
                self._in_background(self._go_on(later))
            self._start_resumer()  # (held runs woken while every slot was busy)
            self._slot_freed.set()
            if self._full:
                self._may_claim.set()
            elif not self.notify:
                # no notification tells this worker that what the run just wrote made work
                # ready (a wake during its lease re-queued it, its last child woke a parent)
                self.services.core.nudge()
        if abandoned:
            await self._release_abandoned(execution)

    async def _release_abandoned(self, execution: Execution) -> None:
        """The database failed under the execution (after the core's retries): nothing was
        written for it, and the run runs again from its last record. Its lease is given back
        as soon as the database answers, so that need not wait for the lease to run out."""
        run_id, token = execution.run.run_id, execution.run.lease_token
        log.warning("iterflow run %s stopped by a database fault (%s); it is released and runs again",
                    run_id, execution.abandoned, extra={"run_id": run_id})
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.lease_ms / 1000  # by then the lease has run out anyway
        while True:
            try:
                await self.services.core.admin_query("release_leases", [run_id], [token])
                break
            except EngineStateError:  # the engine stopped meanwhile: the lease runs out
                return
            except DatabaseError as exc:  # (each try is retried for database_retry_timeout)
                if not isinstance(exc, DatabaseUnavailable) or loop.time() >= give_up:
                    log.warning("iterflow could not release run %s (%s); its lease runs out in %.0fs",
                                run_id, exc, max(give_up - loop.time(), 0.0), extra={"run_id": run_id})
                    return
                await asyncio.sleep(0.5)
        self.nudge()

    def _nudge_at_timer(self, execution: Execution) -> None:
        ctx = execution.ctx
        if ctx is None:
            return
        times = [s.wake_at for s in ctx.suspensions if s.wake_at is not None]
        if times:
            delay = (min(times) - ctx.clock()).total_seconds()
            if delay < self.poll_interval * 4:
                self.nudge_after(delay)

    def abort_local(self, run_id: str, reason: str) -> None:
        """engine.cancel in this process: fire the run's abort tokens at once."""
        entry = self.active.get(run_id)
        if entry is not None:
            entry[0].abort(reason, cancel=True)
        if self.sticky is not None:
            self.sticky.discard(run_id)

    # -- leases and maintenance -------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        interval = self.lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            leases = [(rid, ex.run.lease_token) for rid, (ex, _) in self.active.items()]
            try:
                states = await self.services.core.heartbeat(leases, self.lease_ms)
            except Exception as exc:  # noqa: BLE001
                log.warning("iterflow lease renewal failed: %r", exc)
                continue
            self._apply_lease_states(leases, states)

    def _apply_lease_states(self, leases: list[tuple[str, int]], states: list[LeaseState]) -> None:
        """Renewed ``leases``: abort the executions whose lease was lost or whose run was
        canceled. Only the execution under the very lease asked about: while the renewal was
        in flight the run may have suspended and been claimed again, by a new execution under
        a new lease that is not lost."""
        tokens = dict(leases)
        for state in states:
            entry = self.active.get(state.run_id)
            if entry is None or entry[0].run.lease_token != tokens.get(state.run_id):
                continue
            if not state.held:
                entry[0].abort("lease lost", cancel=False)
            elif state.cancel_reason is not None:
                entry[0].abort(state.cancel_reason, cancel=True)

    async def _registry_loop(self) -> None:
        """Refresh this worker's registry row at the heartbeat cadence (a third of a lease),
        on a task of its own: a slow or failing write delays no lease renewal."""
        interval = self.lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            await self.registration.announce(self.services.core)

    async def _maintenance_loop(self) -> None:
        """Expired leases are swept when the worker starts and then every ``sweep_interval``,
        so a run whose worker died is claimable again within lease + that interval, however
        often workers restart (a worker that crash-loops faster than the interval still sweeps
        at each start)."""
        interval = self.sweep_interval
        since_reconcile = 0.0
        since_prune = self.retention.schedule.total_seconds()  # prune soon after start, then on schedule
        while True:
            try:
                if await self.services.core.expire_leases(500):
                    self.nudge()
                if since_prune >= self.retention.schedule.total_seconds():
                    since_prune = 0.0
                    await self._prune()
                if self.reconcile_interval is not None and since_reconcile >= self.reconcile_interval:
                    since_reconcile = 0.0
                    counts = await self.services.core.reconcile(int(self.lease_ms * 2))
                    if counts is not None:
                        self.services.hooks.emit("reconciler_sweep", counts)
            except Exception as exc:  # noqa: BLE001
                log.warning("iterflow maintenance failed: %r", exc)
            await asyncio.sleep(interval)
            since_reconcile += interval
            since_prune += interval

    async def _cron_loop(self) -> None:
        assert self.cron_tick is not None
        while True:
            try:
                if await self.cron_tick():
                    self.nudge()
            except Exception as exc:  # noqa: BLE001 - a failed tick is retried at the next one
                log.warning("iterflow cron tick failed: %r", exc)
            await asyncio.sleep(CRON_TICK)

    async def _prune(self) -> None:
        r = self.retention
        if r.events_older_than is None and r.runs_older_than is None:
            return
        counts = await self.services.core.prune(_ms(r.events_older_than), _ms(r.runs_older_than), 1000)
        if counts:
            log.info("iterflow retention pruned %s", counts)


def _ms(value: timedelta | None) -> int | None:
    return None if value is None else int(value.total_seconds() * 1000)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
