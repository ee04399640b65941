"""The benchmark workloads, one async function each (see docs/benchmarks.md for the method).

Every workload gets an :class:`Env`: a fresh, migrated schema, the core under test and the
sizes (full or ``--quick``). It builds its own engines through ``env.engine`` (so they are
stopped even when the workload fails or times out) and returns a flat dict: the metrics named
in ``registry.WORKLOADS`` plus raw detail for the JSON report. A wrong result (a run not ``done``,
a wrong output) or a hang (no progress for ``stall_s``) raises :class:`WorkloadError`: the
benchmark doubles as an end-to-end check of the engine.

Clocks: the runner, the engine and PostgreSQL share one machine, hence one wall clock, so
``time.time()`` taken in Python and ``timestamptz`` values written by the server are compared
directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql

from iterflow import Context, Engine, Flow, create_engine, define_flow

from .stats import (
    APP_PREFIX,
    TERMINAL,
    Monitor,
    checkpoint,
    db_snapshot,
    postgres_cpu_s,
    process_cpu_s,
    row_counters,
    rows_delta,
    summarize_ms,
    with_app_name,
)


class WorkloadError(Exception):
    """The engine produced a wrong result or stopped making progress."""


# -- sizes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    w1_flows: int = 10_000       # 3-step flows, started up front
    w2_flows: int = 20_000       # 1-step flows, started up front
    w3_rate: float = 200.0       # one-step flows started per second...
    w3_seconds: float = 20.0     # ...for this long (measured)...
    w3_warmup_s: float = 1.0     # ...after this long at the same rate (not measured)
    w4_flows: int = 2_000        # flows sleeping until a deadline spread uniformly over
    w4_min_s: float = 1.0        # [arm + w4_min_s, arm + w4_max_s], arm = start + w4_lead_s
    w4_max_s: float = 5.0
    w4_lead_s: float = 15.0
    w5_flows: int = 1_000        # flows waiting for a signal...
    w5_rate: float = 500.0       # ...sent at this rate...
    w5_warmup: int = 100         # ...after this many signals to more flows (not measured)
    w6_parents: int = 20         # parents x children, fanned out with ctx.invoke_all
    w6_children: int = 100
    w8_flows: int = 5_000        # 3-step flows drained while as many result() calls wait (per shape)
    w8_cap_s: float = 120.0      # a fan-in shape still waiting this long after its first start fails
    w9_iterations: int = 10_000  # one run: this many iterations of step + 1 ms sleep (--w9-iterations)
    w10_runs: int = 200          # runs talked to at once by a client process... (--w10-runs)
    w10_turns: int = 100         # ...each for this many turns of signal + step (--w10-turns)
    w12_parents: int = 300       # parents started at w12_rate, each invoking one child that
    w12_rate: float = 50.0       # another worker engine serves
    concurrency: int = 32        # the worker engine's concurrency (default; --concurrency overrides per core)
    start_chunk: int = 5_000     # runs per start_many call in the burn-downs
    stall_s: float = 60.0        # no run finished for this long: the workload has hung
    poll_s: float = 0.2          # how often the monitor looks at the runs table


FULL = Sizes()
QUICK = Sizes(
    w1_flows=300, w2_flows=600, w3_seconds=3.0, w4_flows=150, w4_min_s=1.0, w4_max_s=1.5, w4_lead_s=1.5,
    w3_warmup_s=0.5, w5_flows=100, w5_warmup=25, w6_parents=3, w6_children=10, w8_flows=200, w8_cap_s=30.0,
    w9_iterations=100, w10_runs=5, w10_turns=5, w12_parents=10,
    stall_s=15.0, poll_s=0.05,
    concurrency=8,  # a smaller pool: the smoke run shares the server with the rest of the test suite
)


# -- flows -----------------------------------------------------------------------------------
async def _noop() -> None:
    return None


async def _wall_clock() -> float:
    """A step that reports when it started executing (its result is memoized, so replays agree)."""
    return time.time()


@define_flow("bench_three_steps")
async def three_steps(ctx: Context, inp: Any) -> None:
    await ctx.step("s0", _noop)
    await ctx.step("s1", _noop)
    await ctx.step("s2", _noop)


# w11: w1's flow with flow control: each run keyed by one of W11_KEYS keys, at most
# W11_KEY_CONCURRENCY executing per key (docs/guide.md, "Flow control"); the places (100 x 8)
# exceed either core's concurrency, so what it measures is the claim's cost, not the limit.
W11_KEYS = 100
W11_KEY_CONCURRENCY = 8


@define_flow("bench_three_steps_keyed", key=lambda inp: inp["k"], key_concurrency=W11_KEY_CONCURRENCY)
async def three_steps_keyed(ctx: Context, inp: Any) -> None:
    await ctx.step("s0", _noop)
    await ctx.step("s1", _noop)
    await ctx.step("s2", _noop)


@define_flow("bench_one_step")
async def one_step(ctx: Context, inp: Any) -> None:
    await ctx.step("s0", _noop)


@define_flow("bench_sleeper")
async def sleeper(ctx: Context, deadline: float) -> float:
    await ctx.sleep_until(datetime.fromtimestamp(deadline, UTC))
    return float(await ctx.step("after", _wall_clock))


@define_flow("bench_waiter")
async def waiter(ctx: Context, inp: Any) -> dict[str, float]:
    payload = await ctx.signal("go")
    resumed = await ctx.step("after", _wall_clock)
    return {"sent": payload["sent"], "resumed": resumed}


@define_flow("bench_remote_child")
async def remote_child(ctx: Context, inp: Any) -> None:
    await ctx.step("work", _noop)


@define_flow("bench_remote_parent")
async def remote_parent(ctx: Context, inp: Any) -> float:
    await ctx.invoke(remote_child, None)
    return float(await ctx.step("after", _wall_clock))


@define_flow("bench_child")
async def child(ctx: Context, inp: int) -> int:
    await ctx.step("work", _noop)
    return inp


@define_flow("bench_parent")
async def parent(ctx: Context, n: int) -> dict[str, Any]:
    outs = await ctx.invoke_all([(child, i) for i in range(n)])
    return {"n": len(outs), "ordered": outs == list(range(n))}


# -- environment -----------------------------------------------------------------------------
@dataclass
class Env:
    """What one run of one workload on one core gets."""

    dsn: str
    core: str
    schema: str
    sizes: Sizes
    seed: int
    concurrency: int
    worker_options: dict[str, Any] = field(default_factory=dict)  # more options of the worker engines
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    monitors: list[Monitor] = field(default_factory=list)

    def engine(self, role: str, *flows: Flow, **options: Any) -> Engine:
        """An engine on this run's schema whose connections carry ``application_name``
        ``iterflow-bench-<schema>-<role>`` (the Python core keeps it; the Rust core names its
        own ``iterflow:<schema>``); stopped by the runner after the workload, whatever happens."""
        eng = create_engine(with_app_name(self.dsn, self.app(role)), schema=self.schema, core=self.core,
                            **options)
        for f in flows:
            eng.register(f)
        self.stack.push_async_callback(_quiet_stop, eng)
        return eng

    def app(self, role: str) -> str:
        """The application_name of this run's connections in ``role`` (unique per run, so
        concurrent benchmark runs never count each other's backends)."""
        return f"{APP_PREFIX}-{self.schema}-{role}"

    def worker(self, *flows: Flow) -> Engine:
        return self.engine("worker", *flows, concurrency=self.concurrency, **self.worker_options)

    def monitor(self) -> Monitor:
        mon = Monitor(self.dsn, self.schema, self.app(""))
        self.monitors.append(mon)
        return mon

    def foreign_activity(self) -> int:
        """The most backends of other clients seen active at once while this run was watched."""
        return max((m.max_foreign_active for m in self.monitors), default=0)


async def _quiet_stop(engine: Engine) -> None:
    with contextlib.suppress(Exception):
        await engine.stop()


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


async def _start_up_front(env: Env, flow: Flow, inputs: Sequence[Any]) -> float:
    """start_many the inputs through a client-only engine (then stopped); returns seconds. The
    flow is registered there (not only named) so that its key function keys the runs (w11)."""
    client = env.engine("client")
    handle = client.register(flow)
    t0 = time.perf_counter()
    pos = 0
    for size in _chunks(len(inputs), env.sizes.start_chunk):
        await handle.start_many([{"input": x} for x in inputs[pos:pos + size]])
        pos += size
    elapsed = time.perf_counter() - t0
    await client.stop()
    return elapsed


async def wait_until(mon: Monitor, env: Env, what: str, progress: Callable[[dict[str, int]], int],
                     target: int, watch: asyncio.Task[Any] | None = None) -> dict[str, int]:
    """Poll the runs table until ``progress(statuses) >= target``. A stall (no progress for
    ``stall_s``) raises WorkloadError, and so does ``watch`` (the load generator) failing."""
    last, since = -1, time.monotonic()
    while True:
        statuses = await mon.poll()
        value = progress(statuses)
        if value >= target:
            return statuses
        if watch is not None and watch.done() and watch.exception() is not None:
            await watch  # raises the load generator's error
        now = time.monotonic()
        if value != last:
            last, since = value, now
        elif now - since > env.sizes.stall_s:
            gen = "" if watch is None else (
                "; the load generator is still running" if not watch.done() else "; the load generator has returned")
            raise WorkloadError(
                f"{what}: no progress for {env.sizes.stall_s:g}s at {value}/{target}; run statuses {statuses}"
                f"{gen}; {await _diagnose(mon, env)}"
            )
        await asyncio.sleep(env.sizes.poll_s)


async def _diagnose(mon: Monitor, env: Env) -> str:
    """The queue and signal inbox at a stall, for the error message."""
    try:
        (q,) = await mon.fetch(
            f"SELECT count(*), count(*) FILTER (WHERE lease_until IS NOT NULL),"
            f" count(*) FILTER (WHERE lease_until IS NULL AND ready_at <= now()),"
            f" count(*) FILTER (WHERE woken), min(ready_at) - now()"
            f' FROM "{env.schema}".queue'
        )
        (sig,) = await mon.fetch(
            f'SELECT count(*), count(*) FILTER (WHERE consumed_at IS NULL) FROM "{env.schema}".signals'
        )
        return (f"queue rows {q[0]} (leased {q[1]}, ready {q[2]}, woken {q[3]}, earliest ready_at in {q[4]}); "
                f"signals {sig[0]} (unconsumed {sig[1]})")
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"(diagnosis failed: {exc!r})"


def _terminal(statuses: dict[str, int]) -> int:
    return sum(statuses.get(s, 0) for s in TERMINAL)


async def wait_all_done(mon: Monitor, env: Env, what: str, expected: int,
                        watch: asyncio.Task[Any] | None = None) -> dict[str, int]:
    """Wait until ``expected`` runs are terminal, then insist that every one of them is done."""
    statuses = await wait_until(mon, env, what, _terminal, expected, watch)
    if statuses.get("done", 0) != expected or sum(statuses.values()) != expected:
        sample = await mon.fetch(
            f'SELECT id, name, status, error->>\'code\', left(error->>\'message\', 300) FROM "{env.schema}".runs'
            " WHERE status <> 'done' LIMIT 3"
        )
        raise WorkloadError(f"{what}: expected {expected} runs done, got statuses {statuses}; e.g. {sample}")
    return statuses


async def _run_times(mon: Monitor, env: Env, name: str | None = None) -> list[tuple[float, float]]:
    rows = await mon.fetch(
        f'SELECT extract(epoch FROM created_at)::float8, extract(epoch FROM finished_at)::float8'
        f' FROM "{env.schema}".runs WHERE %s::text IS NULL OR name = %s', name, name,
    )
    return [(float(a), float(b)) for a, b in rows]


# -- workloads 1, 2 and 7: burn-down ----------------------------------------------------------
async def burn_down(env: Env, flow: Flow, n: int, steps_per_flow: int,
                    inputs: Sequence[Any] | None = None) -> dict[str, Any]:
    """N flows started up front, then drained by one worker engine.

    Throughput = N / (latest runs.finished_at - the moment the worker started listening).
    Cost: pg_stat_database.xact_commit and WAL bytes over the drain, read before the worker
    starts and after it has stopped (its backends exited, so their counters are published);
    the monitor's own queries are subtracted. Connections: the most backends seen at once with
    the worker engine's application_name.
    """
    start_before = await db_snapshot(env.dsn)
    start_rows = await row_counters(env.dsn, env.schema)
    start_s = await _start_up_front(env, flow, [None] * n if inputs is None else inputs)
    t = time.perf_counter()
    checkpointed = await checkpoint(env.dsn)
    checkpoint_s = time.perf_counter() - t
    worker = env.worker(flow)
    mon = env.monitor()
    async with mon:
        await worker.client()  # pool open and schema check happen before the clock starts
        before = await db_snapshot(env.dsn)
        rows_before = await row_counters(env.dsn, env.schema)
        mon.reset_backends()
        cpu0, pg0 = process_cpu_s(), postgres_cpu_s()
        t0 = time.time()
        await worker.listen()
        await wait_all_done(mon, env, f"burn-down of {n} {flow.name}", n)
        cpu1, pg1 = process_cpu_s(), postgres_cpu_s()
        await mon.sample_backends()
        times = await _run_times(mon, env)
        core_stats = _core_stats(worker)
        await worker.stop()
        monitor_xacts = mon.queries
    after = await db_snapshot(env.dsn)
    drain_rows = rows_delta(rows_before, await row_counters(env.dsn, env.schema))
    drain = before.delta(after)
    start_cost = start_before.delta(before)
    end = max(f for _, f in times)
    seconds = end - t0
    steps = n * steps_per_flow
    commits = max(drain["xact_commit"] - monitor_xacts - 2, 0)  # 2: the "before" snapshot's own
    return {
        "flows_per_s": n / seconds,
        "steps_per_s": steps / seconds,
        "xacts_per_step": commits / steps,
        "wal_bytes_per_step": drain["wal_bytes"] / steps,
        "connections": mon.max_engine_backends,  # only the worker engine is open while draining
        "flows": n, "steps": steps, "drain_s": seconds, "start_many_s": start_s,
        "checkpoint": checkpointed, "checkpoint_s": checkpoint_s,
        "drain_xact_commit": commits, "drain_xact_rollback": drain["xact_rollback"],
        "drain_wal_bytes": drain["wal_bytes"], "monitor_queries": monitor_xacts,
        "start_xact_commit": start_cost["xact_commit"], "start_wal_bytes": start_cost["wal_bytes"],
        "start_wal_bytes_per_flow": start_cost["wal_bytes"] / n,
        # rows of the schema's tables written by the drain and by the start (pg_stat_user_tables)
        "drain_rows": drain_rows, "drain_rows_per_flow": drain_rows["written"] / n,
        "start_rows": rows_delta(start_rows, rows_before),
        "backends_max": dict(mon.max_backends), "foreign_active_backends_max": mon.max_foreign_active,
        # CPU while draining (until the monitor saw the last run finish): this process (the
        # worker engine, plus the monitor's light polling) and the local PostgreSQL, if visible
        "engine_cpu_s": cpu1 - cpu0, "engine_cpu_us_per_step": (cpu1 - cpu0) / steps * 1e6,
        "postgres_cpu_s": (pg1 - pg0) if pg0 is not None and pg1 is not None else None,
        "postgres_cpu_us_per_step": (pg1 - pg0) / steps * 1e6 if pg0 is not None and pg1 is not None else None,
        "core_stats": core_stats,
    }


def _core_stats(engine: Engine) -> Any:
    """The core's own counters when it has them (the Rust core: writer batching, listener, pool)."""
    stats = getattr(engine.core, "stats", None)
    if stats is None:
        return None
    try:
        return json.loads(json.dumps(stats(), default=str))
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return {"error": repr(exc)}


async def w1_burn_down(env: Env) -> dict[str, Any]:
    return await burn_down(env, three_steps, env.sizes.w1_flows, 3)


async def w11_burn_down_keyed(env: Env) -> dict[str, Any]:
    """w1 with a per-key limit over 100 keys (issue 17's bar: at least 70% of w1's flows/s)."""
    n = env.sizes.w1_flows
    keys = [{"k": f"tenant-{i % W11_KEYS}"} for i in range(n)]
    return await burn_down(env, three_steps_keyed, n, 3, keys)


async def w2_burn_down(env: Env) -> dict[str, Any]:
    return await burn_down(env, one_step, env.sizes.w2_flows, 1)


# -- the load generator: a separate client process ----------------------------------------
# Latency workloads drive the engine from another process, as an application would: the
# arrivals and their timestamps must not queue behind the worker on one event loop (with the
# pure-Python core that alone adds hundreds of milliseconds at these rates).
class NotifyRecorder:
    """LISTENs on the schema's channel like a client would and timestamps every
    ``d <run_id>`` (run finished) notification when it arrives."""

    def __init__(self, dsn: str, schema: str, app: str) -> None:
        self.dsn = dsn
        self.app = app
        self.channel = f"iterflow.{schema}"
        self.done_at: dict[str, float] = {}
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> NotifyRecorder:
        self._conn = await psycopg.AsyncConnection.connect(with_app_name(self.dsn, self.app), autocommit=True)
        await self._conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(self.channel)))
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        assert self._conn is not None
        async for note in self._conn.notifies():
            now = time.time()
            kind, _, arg = note.payload.partition(" ")
            if kind == "d":
                self.done_at.setdefault(arg, now)

    async def __aexit__(self, *exc: Any) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._conn is not None:
            await self._conn.close()


async def open_loop(rate: float, count: int, fire: Callable[[int], Coroutine[Any, Any, None]]) -> dict[str, float]:
    """Call ``fire(i)`` as its own task at ``t0 + i / rate``, whether or not earlier calls have
    returned (an open loop: a slow system cannot slow the arrivals down). Waits for all."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    lag = 0.0
    tasks: list[asyncio.Task[None]] = []
    for i in range(count):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag = max(lag, -delay)
        tasks.append(loop.create_task(fire(i)))
    sent_s = loop.time() - t0
    await asyncio.gather(*tasks)
    return {"arrival_s": sent_s, "achieved_rate": (count - 1) / sent_s if count > 1 and sent_s > 0 else math.nan,
            "max_schedule_lag_ms": lag * 1000, "all_returned_s": loop.time() - t0}


async def _loadgen(spec: dict[str, Any]) -> dict[str, Any]:
    """The client process: ``start`` one-step flows or ``signal`` waiting runs at a fixed rate."""
    engine = create_engine(with_app_name(spec["dsn"], spec["app_prefix"] + "client"), schema=spec["schema"],
                           core=spec["core"])
    try:
        await engine.client()
        call_s: list[float] = []
        if spec["kind"] == "start":
            handle = engine.handle(spec["flow"], 1)
            warm = spec["warmup"]
            called: dict[str, float] = {}

            async def start(i: int) -> None:
                t = time.time()
                res = await handle.start(None, tags=["warmup"] if i < warm else ())
                call_s.append(time.time() - t)
                if i >= warm:
                    called[res.run_id] = t

            async with NotifyRecorder(spec["dsn"], spec["schema"], spec["app_prefix"] + "listen") as notes:
                arrivals = await open_loop(spec["rate"], spec["count"], start)
                deadline = time.monotonic() + spec["wait_s"]
                while time.monotonic() < deadline and any(r not in notes.done_at for r in called):
                    await asyncio.sleep(0.05)
            seen = [notes.done_at[r] - t for r, t in called.items() if r in notes.done_at]
            return {**arrivals, "client_latency_s": seen, "notifications_missing": len(called) - len(seen),
                    "call": summarize_ms(call_s)}
        ids: list[str] = spec["ids"]
        kinds: dict[str, int] = {}

        async def send(i: int) -> None:
            t = time.time()
            res = await engine.signal(ids[i], "go", {"sent": t})
            call_s.append(time.time() - t)
            kinds[res.kind] = kinds.get(res.kind, 0) + 1

        arrivals = await open_loop(spec["rate"], len(ids), send)
        return {**arrivals, "kinds": kinds, "call": summarize_ms(call_s)}
    finally:
        await engine.stop()


def loadgen_main() -> None:
    """Entry point of the load-generator process: a JSON spec on stdin, a JSON result on stdout."""
    spec = json.loads(sys.stdin.read())
    logging.basicConfig(level=logging.ERROR)
    result = asyncio.run(_loadgen(spec))
    sys.stdout.write(json.dumps(result))


async def run_child(entry: str, spec: dict[str, Any], what: str, timeout: float | None = None) -> dict[str, Any]:
    """Run ``entry`` (``"module:function"`` of this package) in a fresh Python process with
    ``spec`` as JSON on stdin; its JSON stdout is the result. A benchmark's other process (a
    load generator, a waiting client) is a real process, so its CPU and memory are its own."""
    module, function = entry.split(":")
    root = str(Path(__file__).resolve().parents[1])
    proc_env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", f"import {module} as m; m.{function}()",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=proc_env, cwd=root,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(spec).encode()), timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise WorkloadError(f"{what} exited {proc.returncode}: {err.decode(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


async def run_loadgen(env: Env, spec: dict[str, Any]) -> dict[str, Any]:
    spec = {"dsn": env.dsn, "schema": env.schema, "core": env.core, "app_prefix": env.app(""), **spec}
    return await run_child("benches.workloads:loadgen_main", spec, "load generator")


# -- workload 3: latency at a fixed arrival rate -------------------------------------------
async def w3_latency(env: Env) -> dict[str, Any]:
    """One-step flows started one by one at a fixed rate by a client process while one worker
    engine (this process) listens. The first ``w3_warmup_s`` of arrivals warm both sides up
    (pools grow, statements get prepared) and are left out of the percentiles.

    Headline (db): runs.finished_at - runs.created_at, both written by the server
    (``now()`` of the inserting and of the finishing transaction). Client view: from the moment
    the client calls ``start()`` to the moment the run's completion NOTIFY reaches the client's
    own LISTEN connection, which is what an awaiting ``result()`` waits for.
    """
    sz = env.sizes
    warm = int(sz.w3_rate * sz.w3_warmup_s)
    n = max(int(sz.w3_rate * sz.w3_seconds), 1)
    worker = env.worker(one_step)
    await worker.listen()
    async with env.monitor() as mon:
        gen = asyncio.get_running_loop().create_task(run_loadgen(env, {
            "kind": "start", "flow": one_step.name, "rate": sz.w3_rate, "count": warm + n, "warmup": warm,
            "wait_s": sz.stall_s,
        }))
        await wait_all_done(mon, env, f"latency run of {warm}+{n} flows", warm + n, watch=gen)
        client = await gen
        rows = await mon.fetch(
            f'SELECT extract(epoch FROM created_at)::float8, extract(epoch FROM finished_at)::float8'
            f' FROM "{env.schema}".runs WHERE NOT (%s = ANY (tags))', "warmup",
        )
    db = summarize_ms([f - c for c, f in rows])
    seen = summarize_ms(client.pop("client_latency_s"))
    return {
        "p50_ms": db["p50_ms"], "p99_ms": db["p99_ms"], "max_ms": db["max_ms"],
        "client_p50_ms": seen["p50_ms"], "client_p99_ms": seen["p99_ms"], "client_max_ms": seen["max_ms"],
        "flows": n, "warmup_flows": warm, "start_call": client.pop("call"), **client,
    }


# -- workload 4: sleep accuracy ----------------------------------------------------------------
async def w4_sleep(env: Env) -> dict[str, Any]:
    """Flows sleep until a deadline, then run a step that returns ``time.time()`` when it starts.

    lateness = that start time - the sleep's pinned deadline (``steps.deadline`` of the sleep
    record). Both are wall-clock times on this machine: it measures how long after its deadline
    a sleeping run gets going again.

    The deadlines are spread uniformly over [arm + w4_min_s, arm + w4_max_s], where ``arm`` lies
    ``w4_lead_s`` after the flows are started: long enough for every flow to have executed once
    and pinned its sleep before the first deadline, so the number measures the timer (and
    the wake-up load of N deadlines in a few seconds), not the backlog of first executions.
    ``pinned_after_arm`` reports how many flows missed that lead (0 on a healthy run).
    """
    sz = env.sizes
    rng = random.Random(env.seed)
    worker = env.worker(sleeper)
    client = env.engine("client")
    handle = client.handle(sleeper.name, sleeper.version)
    await client.client()
    arm = time.time() + sz.w4_lead_s
    deadlines = [round(arm + rng.uniform(sz.w4_min_s, sz.w4_max_s), 3) for _ in range(sz.w4_flows)]
    await handle.start_many([{"input": d} for d in deadlines])
    await client.stop()
    async with env.monitor() as mon:
        await worker.listen()
        await wait_all_done(mon, env, f"{sz.w4_flows} sleeping flows", sz.w4_flows)
        rows = await mon.fetch(
            f'SELECT extract(epoch FROM s.deadline)::float8, a.result, extract(epoch FROM s.created_at)::float8'
            f'  FROM "{env.schema}".steps s JOIN "{env.schema}".steps a ON a.run_id = s.run_id AND a.key = %s'
            f' WHERE s.kind = %s', "after", "sleep",
        )
    lateness = [float(after) - float(deadline) for deadline, after, _ in rows]
    if lateness and min(lateness) < -0.005:
        raise WorkloadError(f"sleep: a step after a sleep started {-min(lateness) * 1000:.1f} ms before its deadline")
    missing = sz.w4_flows - len(rows)  # a flow first executed after its deadline never slept
    pinned = [float(r[2]) for r in rows]
    s = summarize_ms(lateness)
    return {"p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "max_ms": s["max_ms"], "mean_ms": s["mean_ms"],
            "flows": sz.w4_flows, "measured": len(rows), "never_slept": missing,
            "pinned_after_arm": sum(1 for p in pinned if p > arm) + missing,
            "pinning_s": (max(pinned) - min(pinned)) if pinned else math.nan, "lead_s": sz.w4_lead_s}


# -- workload 5: signal -> resume ----------------------------------------------------------------
async def w5_signals(env: Env) -> dict[str, Any]:
    """Flows wait on ``ctx.signal("go")``; once all wait, a client process sends the signals at a
    fixed rate (the first ``w5_warmup`` go to extra flows and are not measured).

    latency = when the step after the signal started (``time.time()`` in the step) - when the
    client called ``engine.signal`` (``time.time()`` carried in the payload).
    """
    sz = env.sizes
    n, warm = sz.w5_flows, sz.w5_warmup
    worker = env.worker(waiter)
    client = env.engine("client")
    handle = client.handle(waiter.name, waiter.version)
    ids = [r.run_id for r in await handle.start_many([{"input": None}] * (warm + n))]
    await client.stop()
    async with env.monitor() as mon:
        await worker.listen()
        await wait_until(mon, env, f"{warm + n} flows reaching ctx.signal",
                         lambda st: st.get("awaiting_signal", 0), warm + n)
        gen = asyncio.get_running_loop().create_task(run_loadgen(env, {
            "kind": "signal", "rate": sz.w5_rate, "ids": ids,
        }))
        await wait_all_done(mon, env, f"{warm + n} signaled flows", warm + n, watch=gen)
        sender = await gen
        rows = await mon.fetch(
            f'SELECT r.id::text, r.output, extract(epoch FROM s.received_at)::float8,'
            f'       extract(epoch FROM t.finished_at)::float8'
            f'  FROM "{env.schema}".runs r JOIN "{env.schema}".signals s ON s.run_id = r.id'
            f'  JOIN "{env.schema}".steps t ON t.run_id = r.id AND t.kind = %s', "signal",
        )
    if sender["kinds"] != {"delivered": warm + n}:
        raise WorkloadError(f"signals: expected {warm + n} 'delivered', got {sender['kinds']}")
    wanted = set(ids[warm:])
    measured = [(o, float(at), float(took)) for rid, o, at, took in rows if rid in wanted]
    s = summarize_ms([float(o["resumed"]) - float(o["sent"]) for o, _, _ in measured])
    # where the time goes: client call -> delivery transaction (signals.received_at, the
    # server's now() of the delivering transaction) -> the transaction that took the signal
    # for the run (the signal record's finished_at: the claim's now()) -> the step after the
    # signal starting
    to_db = summarize_ms([at - float(o["sent"]) for o, at, _ in measured])
    db_to_resume = summarize_ms([float(o["resumed"]) - at for o, at, _ in measured])
    to_take = summarize_ms([took - at for _, at, took in measured])
    take_to_resume = summarize_ms([float(o["resumed"]) - took for o, _, took in measured])
    return {"p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "max_ms": s["max_ms"], "flows": n,
            "warmup_flows": warm, "signal_call": sender.pop("call"),
            "send_to_delivery_tx": to_db, "delivery_tx_to_resume": db_to_resume,
            "delivery_tx_to_take": to_take, "take_to_resume": take_to_resume, **sender}


# -- workload 6: fan-out / fan-in --------------------------------------------------------------
async def w6_fan_out(env: Env) -> dict[str, Any]:
    """P parents each ``ctx.invoke_all`` C one-step children and join them; seconds from the
    first start_many call until the last parent finished (runs.finished_at)."""
    sz = env.sizes
    total = sz.w6_parents * (sz.w6_children + 1)
    worker = env.worker(parent, child)
    client = env.engine("client")
    await client.client()
    handle = client.handle(parent.name, parent.version)
    await worker.listen()
    async with env.monitor() as mon:
        t0 = time.time()
        await handle.start_many([{"input": sz.w6_children}] * sz.w6_parents)
        await wait_all_done(mon, env, f"fan-out {sz.w6_parents}x{sz.w6_children}", total)
        rows = await mon.fetch(
            f'SELECT output, extract(epoch FROM finished_at)::float8 FROM "{env.schema}".runs WHERE name = %s',
            parent.name,
        )
    bad = [o for o, _ in rows if o != {"n": sz.w6_children, "ordered": True}]
    if len(rows) != sz.w6_parents or bad:
        raise WorkloadError(f"fan-out: {len(rows)} parents, wrong outputs e.g. {bad[:2]}")
    seconds = max(f for _, f in rows) - t0
    return {"seconds": seconds, "children_per_s": sz.w6_parents * sz.w6_children / seconds,
            "parents": sz.w6_parents, "children": sz.w6_children}


# -- workload 12: a child finished by another worker wakes its parent ------------------------
async def w12_remote_child(env: Env) -> dict[str, Any]:
    """Parents, started at ``w12_rate``, each ``ctx.invoke`` one child flow that only another
    worker engine serves (its own connections and LISTEN, as another process would have): the
    child's finish must wake the parent in the first engine.

    latency = when the parent's step after the invoke started (``time.time()`` in the step) -
    the child's ``finished_at`` (the server's clock of the finishing transaction; same host).
    Without an announcement of the parent's wake-up it waits for its worker's next poll.
    """
    sz = env.sizes
    parents = env.worker(remote_parent)
    children = env.engine("children", remote_child, concurrency=env.concurrency, **env.worker_options)
    client = env.engine("client")
    handle = client.handle(remote_parent.name, remote_parent.version)
    await client.client()
    await parents.listen()
    await children.listen()
    async with env.monitor() as mon:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(sz.w12_parents):
            await asyncio.sleep(max(t0 + i / sz.w12_rate - loop.time(), 0.0))
            await handle.start(None)
        await wait_all_done(mon, env, f"{sz.w12_parents} parents and their children", 2 * sz.w12_parents)
        rows = await mon.fetch(
            f'SELECT p.output, extract(epoch FROM c.finished_at)::float8 FROM "{env.schema}".runs p'
            f'  JOIN "{env.schema}".runs c ON c.parent_id = p.id WHERE p.name = %s', remote_parent.name,
        )
    if len(rows) != sz.w12_parents:
        raise WorkloadError(f"remote child: {len(rows)} parents with a child, expected {sz.w12_parents}")
    s = summarize_ms([float(out) - float(child_done) for out, child_done in rows])
    return {"p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "max_ms": s["max_ms"], "parents": sz.w12_parents}
