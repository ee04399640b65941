"""w8 fan-in: N three-step runs started with ``start_many``, then drained while N ``result()``
calls wait for them, all at once, the way an application gathers the runs it started.

    python -m benches.fanin [--n 5000,50000] [--concurrency 5,32,512] [--core python,rust]
                            [--shape inproc,subproc,none] [--cap SECONDS] [--quick] [--dsn DSN] [--json PATH]

Three shapes:

* ``inproc``: the waiters live in the worker's own process: the listening engine starts the runs
  and ``await asyncio.gather(*(handle.result(r.run_id) for r in runs))`` on the same engine,
  so the waiters share the worker's pool and event loop;
* ``subproc``: the waiters live in a second process (a client-only engine, as in a web server
  that never listens), the worker in this one;
* ``none``: the baseline. The same client process starts the runs and nobody calls
  ``result()``: the drain the others are held against.

The waiting process is a fresh subprocess in every shape (for ``inproc`` it is the worker too),
so its memory growth belongs to the cell and not to what earlier cells left allocated.

Why a workload of its own: every other workload reads its outcome from the database, so none
of them measures what the application's ``result()`` calls cost. A waiter that polls costs a
query per wait period, and N of them compete with the worker for the same connections; at
some N the drain the database sees and the drain the application sees part ways. Per cell:

* flows/s as the gather saw it: N / (last ``result()`` returned - first ``start_many`` called);
* flows/s as the database saw the same drain: N / (last ``runs.finished_at`` - first
  ``steps.created_at``; the first step record is the first moment a claim is visible in the
  database, a few ms after the claim itself);
* ratio: the database's drain time over the application's, both from that first step record
  to, respectively, the last ``finished_at`` and the last ``result()`` returned (1.0: the
  application hears of each result as the database records it; below: it hears late). The
  gather rate also counts the ``start_many`` calls before the first claim, which this leaves
  out. Load the waiters put on the drain itself slows both alike: compare drains across shapes
  and with w1;
* lag: per run, when its ``result()`` returned - its ``finished_at`` (p50/p99/max);
* the most server connections of this cell's engines seen at once (``pg_stat_activity``
  sampled every 100 ms from a connection of the harness), per process and LISTEN vs pool, and
  the most client backends on the whole server (how close the cell came to ``max_connections``);
* waiter memory: RSS of the waiting process when every waiter is registered, and its peak
  while waiting, minus its RSS before the first start (``inproc``: the worker's memory growth
  is included);
* errors: exceptions raised by ``result()``, counted by type (never raised), and correctness:
  every result must equal the flow's output for its input.

Each cell has a hard cap (``--cap``, from the first start): when it hits, the waiters are
cancelled and the cell reports "k of N done after T s" (k: ``result()`` calls returned; the
database's count of finished runs at that moment beside it) and the matrix moves on.

Every cell gets a fresh schema. Engines tag their connections through the DSN's
``application_name`` (``iterflow-bench-<schema>-<role>``) so each process is counted apart;
LISTEN connections are told apart by their last statement. Point ``--dsn`` at a server no one
else depends on: a cell whose engine opens connections without bound takes every free slot of
the server, and other clients then fail with "too many clients".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql

import iterflow
from iterflow import Context, create_engine, define_flow
from iterflow.embedded import database_url
from iterflow.handle import FlowHandle

from .stats import APP_PREFIX, MONITOR_APP, clean_json, percentile, redact, with_app_name
from .workloads import FULL, QUICK, Env, WorkloadError, run_child

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("inproc", "subproc", "none")
WAITING_SHAPES = ("inproc", "subproc")
CORES = ("python", "rust")
SAMPLE_S = 0.1  # connection and RSS sampling period
STOP_S = 20.0  # an engine that does not stop within this long after a capped cell is left behind


# -- the flow --------------------------------------------------------------------------------
@define_flow("bench_fanin")
async def fanin_flow(ctx: Context, i: int) -> list[int]:
    """Three steps whose results depend on the input, so a result handed to the wrong waiter
    (or a step memo read from the wrong run) shows up as a wrong output."""

    async def plus_one() -> int:
        return i + 1

    a = await ctx.step("s0", plus_one)

    async def double() -> int:
        return int(a) * 2

    b = await ctx.step("s1", double)

    async def add_input() -> int:
        return int(b) + i

    return [i, int(await ctx.step("s2", add_input))]


def expected_output(i: int) -> list[int]:
    return [i, (i + 1) * 2 + i]


# -- memory ----------------------------------------------------------------------------------
def rss_kib() -> int | None:
    """This process's resident set size now (``VmRSS``, Linux); None elsewhere."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class RssPeak:
    """The highest RSS seen while running (sampled every ``SAMPLE_S``): the waiters' memory
    is live only while they wait, so one reading after the gather would miss it."""

    def __init__(self) -> None:
        self.peak = rss_kib()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RssPeak:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            self.note()
            await asyncio.sleep(SAMPLE_S)

    def note(self) -> int | None:
        now = rss_kib()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now
        return now

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- the waiting side (a subprocess of its own in every shape) -----------------------------------
@dataclass
class Waits:
    """What the ``result()`` calls of one process saw."""

    returned_at: dict[int, float] = field(default_factory=dict)  # input i -> time.time() of return
    wrong: int = 0
    wrong_samples: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)


async def _await_one(handle: FlowHandle, run_id: str, i: int, waits: Waits) -> None:
    """One application waiter: an exception is counted and kept as a sample, never raised, so
    one failing wait cannot end the gather early and hide how the others fared."""
    try:
        out = await handle.result(run_id)
    except Exception as exc:  # noqa: BLE001 - counting every failure is the measurement
        name = type(exc).__name__
        waits.errors[name] += 1
        if len(waits.error_samples) < 5:
            waits.error_samples.append(f"{name}: {str(exc)[:300]}")
        return
    waits.returned_at[i] = time.time()
    if out != expected_output(i):
        waits.wrong += 1
        if len(waits.wrong_samples) < 5:
            waits.wrong_samples.append(f"run {i}: {out!r}"[:200])


async def start_and_await(handle: FlowHandle, n: int, chunk: int, tag: str, cap_s: float,
                          rss: RssPeak, drained: Callable[[], Awaitable[bool]] | None = None) -> dict[str, Any]:
    """Start ``n`` runs (``start_many`` in chunks), register one ``result()`` waiter per run as
    soon as its chunk is acknowledged, gather them all; stop at ``cap_s`` after the first start.
    A chunk that fails to start ends the starting (``start_error``); the runs already started
    are still awaited."""
    waits = Waits()
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    marks: dict[str, Any] = {"rss_before_kib": rss.note(), "start_many_s": 0.0}
    t0 = time.time()

    async def body() -> None:
        for lo in range(0, n, chunk):
            t = time.perf_counter()
            try:
                made = await handle.start_many([{"input": i, "tags": [tag]} for i in range(lo, min(n, lo + chunk))])
            except Exception as exc:  # noqa: BLE001 - waiters starving the starts is a finding: await those made
                marks["start_error"] = f"{type(exc).__name__} at run {lo:,}: {str(exc)[:300]}"
                break
            marks["start_many_s"] += time.perf_counter() - t
            tasks.extend(loop.create_task(_await_one(handle, m.run_id, lo + k, waits)) for k, m in enumerate(made))
        if drained is not None:  # the baseline: nobody waits, the database says when it is over
            while not await drained():  # (its end is read from finished_at: a slow look is fine)
                await asyncio.sleep(0.5)
            return
        await asyncio.sleep(0)  # every waiter has run up to its first await: registered
        marks["rss_registered_kib"] = rss.note()
        marks["registered_s"] = time.time() - t0
        await asyncio.gather(*tasks)

    capped = False
    try:
        await asyncio.wait_for(body(), cap_s)
    except TimeoutError:
        capped = True
    t_end = time.time()
    for task in tasks:  # after a cap: the waiters still pending (a no-op after a full gather)
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "t_first_start": t0, "t_end": t_end, "capped": capped, "started": len(tasks),
        "returned_at": sorted(waits.returned_at.items()), "wrong": waits.wrong,
        "wrong_samples": waits.wrong_samples, "errors": dict(waits.errors),
        "error_samples": waits.error_samples, "rss_peak_kib": rss.peak, **marks,
    }


async def _waiting_process(spec: dict[str, Any]) -> dict[str, Any]:
    """The process that starts the runs and awaits them. With ``concurrency`` it is the worker
    too (the inproc shape: it registers the flow and listens, and its waiters share the
    worker's engine); without, a client-only engine with the default options, as a web
    process that starts runs and awaits them would have (the subproc shape). A process of its
    own per cell, so its RSS growth is the cell's and not what an earlier cell left allocated."""
    engine = create_engine(with_app_name(spec["dsn"], spec["app"]), schema=spec["schema"], core=spec["core"],
                           **({"concurrency": spec["concurrency"]} if spec["concurrency"] else {}))
    if spec["concurrency"]:
        engine.register(fanin_flow)
    with EngineLog() as engine_log:
        try:
            if spec["concurrency"]:
                await engine.listen()  # claiming before the first start
            else:
                await engine.client()  # pool open and schema checked before the first start
            async with RssPeak() as rss:
                out = await start_and_await(engine.handle(fanin_flow.name, fanin_flow.version), spec["n"],
                                            spec["chunk"], spec["tag"], spec["cap_s"], rss,
                                            None if spec.get("wait", True) else _drained(spec))
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(engine.stop(), STOP_S)
    return {**out, "waiting_log": dict(engine_log.counts)}


def _drained(spec: dict[str, Any]) -> Callable[[], Awaitable[bool]]:
    """For the ``none`` shape: whether the cell's runs are all done, by the harness's own
    query (no ``result()`` involved): the queue is empty of them (an index-only look, so the
    baseline is not slowed by a scan of the runs it measures)."""
    async def check() -> bool:
        async with await psycopg.AsyncConnection.connect(spec["dsn"], autocommit=True) as conn:
            cur = await conn.execute(pgsql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {}.queue)")
                                     .format(pgsql.Identifier(spec["schema"])))
            row = await cur.fetchone()
            return bool(row and row[0])
    return check


def waiting_main() -> None:
    """Entry point of the waiting process: a JSON spec on stdin, a JSON result on stdout."""
    spec = json.loads(sys.stdin.read())
    logging.basicConfig(level=logging.ERROR)
    for name in QUIET:  # warnings counted (EngineLog), not printed
        logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(name).propagate = False
    result = asyncio.run(_waiting_process(spec))
    sys.stdout.write(json.dumps(result))


async def _run_waiting(spec: dict[str, Any]) -> dict[str, Any]:
    # the process stops itself at the cap; the margin covers its start-up and engine stop
    return await run_child("benches.fanin:waiting_main", spec, "fan-in waiting process",
                           spec["cap_s"] + STOP_S + 60)


# -- the measuring side ----------------------------------------------------------------------------
class Connections:
    """Samples ``pg_stat_activity`` every ``SAMPLE_S`` from a connection of its own (opened
    before the engines, so a cell that fills the server cannot lock the harness out) and keeps
    the most backends seen at once: of this cell's engines in total, per role (the part of
    ``application_name`` after the run's prefix, ``-listen`` appended for LISTEN connections),
    and of the whole server."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.prefix = env.app("")
        self.engine_peak = 0
        self.server_peak = 0
        self.by_role: dict[str, int] = {}
        self.samples = 0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Connections:
        self._conn = await psycopg.AsyncConnection.connect(with_app_name(self.env.dsn, self.env.app("monitor")),
                                                           autocommit=True)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(psycopg.Error):
                await self.sample()
            await asyncio.sleep(SAMPLE_S)

    async def sample(self) -> None:
        assert self._conn is not None
        cur = await self._conn.execute(
            "SELECT coalesce(application_name, ''),"
            "       application_name LIKE '%%-listen%%' OR query ILIKE 'LISTEN %%', count(*)"
            "  FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            " GROUP BY 1, 2"
        )
        rows = await cur.fetchall()
        engine = server = 0
        roles: Counter[str] = Counter()
        for app, listen, count in rows:
            server += int(count)
            if self.env.schema in app and app != self.env.app("monitor"):
                engine += int(count)
                role = app[len(self.prefix):] if app.startswith(self.prefix) else app
                roles[f"{role}-listen" if listen and not role.endswith("-listen") else role] += int(count)
        self.samples += 1
        self.engine_peak = max(self.engine_peak, engine)
        self.server_peak = max(self.server_peak, server + 1)  # + this connection
        for role, count in roles.items():
            self.by_role[role] = max(self.by_role.get(role, 0), count)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None:
            await self._conn.close()


QUIET = ("iterflow", "psycopg")  # loggers counted per cell instead of printed


class EngineLog(logging.Handler):
    """Counts the engines' and the driver's warnings and errors during a cell (by the first
    words of the message): a worker that cannot get a connection says so here before anything
    fails, and a capped cell's thousands of cancelled queries do not flood the terminal."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[f"{record.levelname} {record.getMessage()[:90]}"] += 1

    def __enter__(self) -> EngineLog:
        for name in QUIET:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in QUIET:
            logging.getLogger(name).removeHandler(self)


async def _db_view(env: Env, tag: str, t0: float, cap_end: float) -> dict[str, Any]:
    """The same drain as the database recorded it (server timestamps)."""
    s = pgsql.Identifier(env.schema)
    async with await psycopg.AsyncConnection.connect(with_app_name(env.dsn, env.app("monitor")),
                                                     autocommit=True) as conn:
        cur = await conn.execute(pgsql.SQL(
            "SELECT (r.input)::int, extract(epoch FROM r.finished_at)::float8"
            "  FROM {}.runs r WHERE %s = ANY (r.tags) AND r.status = 'done'").format(s), (tag,))
        finished = {int(i): float(f) for i, f in await cur.fetchall()}
        cur = await conn.execute(pgsql.SQL(
            "SELECT extract(epoch FROM min(st.created_at))::float8"
            "  FROM {}.steps st JOIN {}.runs r ON r.id = st.run_id WHERE %s = ANY (r.tags)").format(s, s), (tag,))
        row = await cur.fetchone()
        cur = await conn.execute(pgsql.SQL(
            "SELECT status, count(*) FROM {}.runs WHERE %s = ANY (tags) GROUP BY 1").format(s), (tag,))
        statuses = {str(k): int(v) for k, v in await cur.fetchall()}
    first_step = row[0] if row else None
    by_cap = [f for f in finished.values() if f <= cap_end]
    db_s = (max(by_cap) - first_step) if by_cap and first_step is not None else math.nan
    return {"finished": finished, "db_done": len(by_cap), "db_statuses": statuses, "db_first_step": first_step,
            "db_s": db_s, "db_flows_per_s": len(by_cap) / db_s if db_s and db_s > 0 else math.nan,
            "first_step_after_start_s": (first_step - t0) if first_step is not None else None}


def _ratio(db: dict[str, Any], last_returned: float) -> float:
    """The drain's rate as the application saw it over the rate the database saw, both from
    the first step record: the database's drain ends at the last ``finished_at``, the
    application's when the last ``result()`` returned. 1.0: the waiters learned each result
    the moment it was written and did not slow the drain. (Time spent in ``start_many``
    before the first claim is in the gather rate, not here: the runs were not claimable yet.)"""
    first, db_s = db["db_first_step"], db["db_s"]
    if first is None or not db_s or db_s != db_s:
        return math.nan
    return float(db_s / (last_returned - first))


async def run_shape(env: Env, shape: str, n: int, cap_s: float) -> dict[str, Any]:
    """One fan-in drain of ``n`` runs in ``shape`` on ``env``'s core and concurrency; the runs
    are tagged with the shape's name (so two shapes can share a schema). Never raises for a
    slow or failing engine: a cap or an error from ``result()`` is part of the result."""
    tag = shape
    load_before = os.getloadavg()
    chunk = env.sizes.start_chunk
    spec = {"dsn": env.dsn, "schema": env.schema, "core": env.core, "n": n, "chunk": chunk, "tag": tag,
            "cap_s": cap_s}
    with EngineLog() as engine_log:
        async with Connections(env) as conns:
            if shape == "inproc":
                waited = await _run_waiting({**spec, "app": env.app("worker"), "concurrency": env.concurrency})
            else:
                worker = env.engine("worker", fanin_flow, concurrency=env.concurrency)
                await worker.listen()  # pool open, schema checked and claiming before the first start
                waited = await _run_waiting({**spec, "app": env.app("client"), "concurrency": None,
                                             "wait": shape != "none"})
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(worker.stop(), STOP_S)
    t0 = float(waited["t_first_start"])
    returned = {int(i): float(t) for i, t in waited.pop("returned_at")}
    db = await _db_view(env, tag, t0, t0 + cap_s)
    finished = db.pop("finished")
    if shape == "none":  # the baseline: the drain's end is the database's, nobody returned
        returned = dict(finished)
    k = len(returned)
    last = max(returned.values(), default=math.nan)
    complete = not waited["capped"] and k == n
    gather_s = (last - t0) if complete else min(cap_s, float(waited["t_end"]) - t0)
    lag = [returned[i] - finished[i] for i in returned if i in finished]
    before = waited.get("rss_before_kib")
    reg, peak = waited.get("rss_registered_kib"), waited.get("rss_peak_kib")
    correct = complete and waited["wrong"] == 0 and not waited["errors"] and db["db_statuses"] == {"done": n}
    gather_rate = k / gather_s if gather_s > 0 else math.nan
    return {
        "shape": shape, "core": env.core, "concurrency": env.concurrency, "n": n, "cap_s": cap_s,
        "complete": complete, "correct": correct, "returned": k, "gather_s": gather_s,
        "done_line": f"{n:,} of {n:,} in {gather_s:.1f}s" if complete else
        f"{k:,} of {n:,} done after {gather_s:.0f}s" + (", start_many failed" if "start_error" in waited else ""),
        "gather_flows_per_s": gather_rate, **db,
        "ratio": _ratio(db, last) if complete else math.nan,
        "lag_p50_ms": percentile(lag, 50) * 1000, "lag_p99_ms": percentile(lag, 99) * 1000,
        "lag_max_ms": max(lag) * 1000 if lag else math.nan,
        "peak_connections": conns.engine_peak, "connections_by_role": dict(conns.by_role),
        "server_backends_peak": conns.server_peak, "connection_samples": conns.samples,
        "rss_before_mib": before / 1024 if before else None,
        "rss_registered_growth_mib": (reg - before) / 1024 if reg and before else None,
        "rss_peak_growth_mib": (peak - before) / 1024 if peak and before else None,
        "bytes_per_waiter": (reg - before) * 1024 / waited["started"] if reg and before and waited["started"] else None,
        "engine_log": dict((engine_log.counts + Counter(waited.pop("waiting_log"))).most_common(10)),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), **waited,
    }


# -- w8 in the suite (python -m benches --only w8) ----------------------------------------------------
async def w8_fan_in(env: Env) -> dict[str, Any]:
    """Both shapes at the suite's size and concurrency, one after the other in the run's schema
    (each shape's runs tagged with its name). A cap or a wrong result fails the workload."""
    out: dict[str, Any] = {"flows": env.sizes.w8_flows}
    for shape in WAITING_SHAPES:
        cell = await run_shape(env, shape, env.sizes.w8_flows, env.sizes.w8_cap_s)
        if not cell["correct"]:
            raise WorkloadError(f"fan-in {shape}: {cell['done_line']}; errors {cell['errors']} "
                                f"{cell['error_samples'][:2]}; wrong {cell['wrong']}; runs {cell['db_statuses']}")
        out[shape] = cell
        out[f"flows_per_s_{shape}"] = cell["gather_flows_per_s"]
        out[f"ratio_{shape}"] = cell["ratio"]
        out[f"connections_{shape}"] = cell["peak_connections"]
    return out


# -- the matrix (python -m benches.fanin) --------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    n: int
    concurrency: int
    core: str
    shape: str


async def _drop_schema(dsn: str, schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(with_app_name(dsn, MONITOR_APP), autocommit=True) as conn:
        await conn.execute(pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(pgsql.Identifier(schema)))


async def run_cell(dsn: str, cell: Cell, index: int, cap_s: float, quick: bool) -> dict[str, Any]:
    """One cell in a fresh schema, dropped afterwards; an exception is recorded, not raised."""
    schema = f"bench_w8_{cell.core[:2]}_{os.getpid():x}_{index}"
    env = Env(dsn=dsn, core=cell.core, schema=schema, sizes=QUICK if quick else FULL, seed=index,
              concurrency=cell.concurrency)
    try:
        await _drop_schema(dsn, schema)
        await iterflow.migrate(dsn, schema)
        async with env.stack:
            return await run_shape(env, cell.shape, cell.n, cap_s)
    except Exception as exc:  # noqa: BLE001 - one broken cell must not lose the matrix
        return {**cell.__dict__, "cap_s": cap_s, "error": f"{type(exc).__name__}: {str(exc)[:2000]}",
                "loadavg_after": os.getloadavg()}
    finally:
        with contextlib.suppress(Exception):
            await _drop_schema(dsn, schema)


def _num(v: Any, digits: int = 0) -> str:
    """``digits`` decimals, two for a value below 10 (a collapsed cell's 0.29 flows/s is not 0)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:,.{max(digits, 2) if abs(v) < 10 and v != int(v) else digits}f}"


COLUMNS = ("core", "shape", "N", "conc", "done", "flows/s gather", "flows/s db", "ratio", "vs none", "lag p50/p99 ms",
           "peak conns (pool+listen)", "server peak", "RSS MiB reg/peak", "B/waiter", "errors", "correct", "load1")


def row(c: dict[str, Any]) -> tuple[str, ...]:
    head = (c["core"], c["shape"], f"{c['n']:,}", str(c["concurrency"]))
    if "error" in c:
        return (*head, f"ERROR {c['error'][:100]}", *[""] * (len(COLUMNS) - 5))
    by_role = c["connections_by_role"]
    roles = ", ".join(f"{r} {by_role.get(r, 0)}+{by_role.get(f'{r}-listen', 0)}" for r in ("worker", "client")
                      if r in by_role or f"{r}-listen" in by_role)
    errors = sum(c["errors"].values())
    return (*head, c["done_line"], _num(c["gather_flows_per_s"]), _num(c["db_flows_per_s"]), _num(c["ratio"], 2),
            _num(c.get("vs_none"), 2),
            f"{_num(c['lag_p50_ms'])}/{_num(c['lag_p99_ms'])}", f"{c['peak_connections']} ({roles})",
            str(c["server_backends_peak"]),
            f"{_num(c['rss_registered_growth_mib'], 1)}/{_num(c['rss_peak_growth_mib'], 1)}",
            _num(c["bytes_per_waiter"]),
            f"{errors}" + (f" {dict(c['errors'])}" if errors else ""),
            "yes" if c["correct"] else "no", f"{c['loadavg_after'][0]:.1f}")


def table(cells: Sequence[dict[str, Any]]) -> str:
    rows = [COLUMNS, *(row(c) for c in cells)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [" | ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _ints(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag}: expected a comma list of integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        p.error(f"{flag}: expected positive integers, got {text!r}")
    return values


def _names(p: argparse.ArgumentParser, flag: str, text: str, known: Sequence[str]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in known]
    if bad or not values:
        p.error(f"{flag}: unknown {bad}; choose from {', '.join(known)}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benches.fanin", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default=None, help="comma list of N, runs per cell (default 5000; 200 with --quick)")
    p.add_argument("--concurrency", default=None, help="comma list of worker concurrencies (default 5,32,512; "
                                                       "5,32 with --quick)")
    p.add_argument("--core", default="python,rust", help="comma list of cores (default python,rust)")
    p.add_argument("--shape", default=",".join(SHAPES), help="comma list of shapes (default inproc,subproc,none)")
    p.add_argument("--cap", type=float, default=None, help="seconds per cell from the first start (default 120; "
                                                           "30 with --quick)")
    p.add_argument("--quick", action="store_true", help="small cells (the CI smoke run)")
    p.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: $DATABASE_URL, else the embedded server)")
    p.add_argument("--json", dest="json_path", default=None,
                   help="where the JSON report goes (default benches/results/fanin-<date>.json)")
    args = p.parse_args(argv)
    args.n = _ints(p, "--n", args.n or ("200" if args.quick else "5000"))
    args.concurrency = _ints(p, "--concurrency", args.concurrency or ("5,32" if args.quick else "5,32,512"))
    args.core = _names(p, "--core", args.core, CORES)
    args.shape = _names(p, "--shape", args.shape, SHAPES)
    args.cap = args.cap or (30.0 if args.quick else 120.0)
    if args.cap <= 0:
        p.error("--cap must be positive")
    return args


async def run_matrix(args: argparse.Namespace, dsn: str) -> list[dict[str, Any]]:
    """Cores side by side within each (N, concurrency, shape), so the two cores of a
    comparison run minutes apart at most."""
    cells: list[dict[str, Any]] = []
    matrix = [Cell(n, c, core, shape) for n in args.n for c in args.concurrency for shape in args.shape
              for core in args.core]
    for index, cell in enumerate(matrix):
        print(f"... w8 {cell.core} {cell.shape} N={cell.n:,} concurrency={cell.concurrency}", file=sys.stderr,
              flush=True)
        cells.append(await run_cell(dsn, cell, index, args.cap, args.quick))
        print(table(cells[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    _against_baseline(cells)
    return cells


def _against_baseline(cells: list[dict[str, Any]]) -> None:
    """``vs_none``: each waiting cell's gather rate over the drain rate, in the database, of
    the same N, concurrency and core with nobody waiting (the ``none`` shape), when the
    matrix has it: what awaiting every result costs the application, all told."""
    base = {(c["n"], c["concurrency"], c["core"]): c.get("db_flows_per_s") for c in cells
            if c.get("shape") == "none" and c.get("complete")}
    for c in cells:
        rate = base.get((c.get("n"), c.get("concurrency"), c.get("core")))
        if c.get("shape") in WAITING_SHAPES and rate and c.get("complete"):
            c["vs_none"] = c["gather_flows_per_s"] / rate


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the matrix, prints the table, writes the JSON; exit 1 when a cell errored or
    returned a wrong result (a capped cell is a finding, not a failure)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet = [logging.getLogger(name) for name in QUIET]
    propagate = [lg.propagate for lg in quiet]
    for lg in quiet:
        lg.propagate = False  # counted per cell (EngineLog) and kept in the JSON
    try:
        dsn = database_url(args.dsn)
        started = datetime.now(UTC)
        cells = asyncio.run(run_matrix(args, dsn))
    finally:
        for lg, was in zip(quiet, propagate, strict=True):
            lg.propagate = was
    text = table(cells)
    print(text)
    print(f"\ncap {args.cap:g}s per cell; {os.cpu_count()} CPUs; load average now "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    path = Path(args.json_path or ROOT / "benches" / "results" / f"fanin-{started:%Y%m%d-%H%M%S}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "started_at": started.isoformat(), "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
        "config": {"n": args.n, "concurrency": args.concurrency, "core": args.core, "shape": args.shape,
                   "cap_s": args.cap, "quick": args.quick, "dsn": redact(dsn), "app_prefix": APP_PREFIX,
                   "iterflow_from": str(Path(iterflow.__file__).parent)},
        "nproc": os.cpu_count(), "table": text, "cells": cells,
    }
    path.write_text(json.dumps(clean_json(report), indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    bad = [c for c in cells if "error" in c or (c["complete"] and not c["correct"]) or c.get("wrong")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
