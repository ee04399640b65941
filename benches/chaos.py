"""The chaos suite: what the engine's guarantees are worth when the infrastructure misbehaves.

    python -m benches.chaos [--core rust|python|both] [--runs N] [--faults kill9,restart_fast,...]
                            [--quick] [--json PATH] [--await-results] [--long-steps N]

For every (core, fault) cell it starts a private PostgreSQL cluster (``initdb`` into a temp
dir, ``pg_ctl start`` on a free port, ``fsync=off``), migrates schema ``chaos``, starts two
worker processes (``benches/chaos_worker.py``: ``engine.listen()`` until killed) and, in this
process, a client that starts N runs at a steady rate (open loop, idempotency keys, retried
until acknowledged) and sends each signal-waiting run one signal (retried with one idempotency
key). Nine runs in ten are a three-step flow (half of them ``ctx.sleep("200ms")`` between the
steps), one in ten waits for a signal between its first and second step. Each step body appends
a row to ``public.chaos_effects``. Mid-load it injects one fault:

* ``kill9``: ``kill -9`` a worker every 2 s (alternating, restarted at once);
* ``restart_fast`` / ``restart_immediate``: ``pg_ctl restart -m fast|immediate`` once;
* ``terminate_all``: ``pg_terminate_backend`` on every client backend every 5 s;
* ``terminate_listen``: the same on the LISTEN connections only;
* ``max_connections``: another client takes every free connection slot for 10 s.

Then it waits for the drain (at most ``drain_s`` after the fault's end) and reads the outcome
from the database, which is the only witness that survives every fault:

* runs ``done`` with the right output, ``failed`` (by error code: an infrastructure fault
  must never fail a run), ``stranded`` (not terminal at the end), ``lost`` (acknowledged to the
  client, absent from ``runs``) and ``unstarted`` (the client never got an acknowledgement);
* step bodies executed more than once (allowed: at-least-once; this is the price of a fault),
  duplicate step records (never allowed: exactly one record per step);
* signals lost (acknowledged, but the run never consumed it) or doubled (more than one inbox
  row or output mismatch);
* throughput before the fault (completions per second from ``runs.finished_at``, in 250 ms
  buckets) and the seconds from the fault's end (for restarts: the first moment the server
  accepts connections again) until a 1 s window of completions is back to >= 50 % of it, plus
  the longest stretch with no completion at all.

With ``--await-results`` the suite takes the shape of an application that runs workers in its
web process: the client engine registers the flows and ``listen()``s too (a third worker, beside
the two processes), and awaits every run it started with ``handle.result(run_id)``, all at once
(one task per run, gathered), instead of only reading outcomes from the database. Each cell then
also reports the results returned with the right output, the exceptions raised (typed
``IterflowError``s by code, anything else as *escaped*; ``DatabaseUnavailable`` is retried as an
application would, and counted), the slowest ``result()`` (from the start's acknowledgement to
its return) and when the last one returned. With ``--long-steps N`` every run is instead a
long-lived ``chaos_long`` flow: N iterations of a step and a durable 1 ms sleep (no signals).

Why: unit tests prove each mechanism (fencing, leases, reconnects) in isolation; this suite
measures the whole system under load, where a lost wake-up, a pool that never heals or a
database error classified as a step failure shows up as stranded runs, failed runs or a stall.
See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

import iterflow
from iterflow import Engine, create_engine
from iterflow.errors import DatabaseUnavailable, IterflowError

from .chaos_worker import Effects, flows, step_value

log = logging.getLogger("benches.chaos")

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "chaos"
CORES = ("rust", "python")
MONITOR_APP = "chaos-monitor"          # the suite's own connections: never terminated, never hogged
FAULT_APP = "chaos-fault"
HOG_APP = "chaos-hog"
BUCKET_S = 0.25
WINDOW_S = 1.0                          # recovery: a sliding window of this many seconds...
RECOVERED_SHARE = 0.5                   # ...whose completion rate is back to this share of before


# -- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    runs: int = 2000
    fault_at_s: float = 12.0            # the fault starts this long after the first start
    fault_len_s: float = 20.0           # periodic faults (kill9, terminate_*) last this long
    hog_s: float = 10.0                 # max_connections: how long the slots are held
    tail_s: float = 13.0                # starts go on this long after the longest fault
    warmup_s: float = 3.0               # left out of the pre-fault rate
    drain_s: float = 120.0              # at most this long after the fault's end
    signal_every: int = 10              # run i waits for a signal when i % signal_every == 0
    signal_delay_s: float = 1.0         # a signal is sent this long after its run's start
    concurrency: int = 8                # per worker process
    lease: str = "30s"                  # the engine's default
    step_ms: int = 50                   # each step body works this long after its side effect
    max_connections: int = 60
    await_results: bool = False         # the client listens too and awaits every run's result()
    long_steps: int = 0                 # > 0: every run is chaos_long with this many step+sleep rounds

    @property
    def load_s(self) -> float:
        return self.fault_at_s + self.fault_len_s + self.tail_s

    @property
    def rate(self) -> float:
        return self.runs / self.load_s


FULL = Plan()
QUICK = Plan(runs=300, fault_at_s=6.0, fault_len_s=8.0, hog_s=5.0, tail_s=8.0, warmup_s=2.0, drain_s=60.0)


# -- a private PostgreSQL cluster ---------------------------------------------------------------
def server_bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """A throwaway cluster; under root its commands run as ``postgres`` (``runuser``)."""

    def __init__(self, bindir: Path, max_connections: int) -> None:
        self.bindir = bindir
        self.as_user = "postgres" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="iterflow-chaos-"))
        if self.as_user is not None:
            shutil.chown(self.root, self.as_user)
        self.data = self.root / "data"
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.options = (f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off "
                        f"-c synchronous_commit=on -c full_page_writes=off -c max_connections={max_connections}")

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_user is not None:
            cmd = ["runuser", "-u", self.as_user, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args[:3])} failed: {done.stdout}{done.stderr}")

    def _ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "120", *args)

    def init_and_start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        self._ctl("-o", self.options, "start")

    def restart(self, mode: str) -> None:
        self._ctl("-m", mode, "-o", self.options, "restart")

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


async def connect(dsn: str, app: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, application_name=app, connect_timeout=5)


async def query(dsn: str, sql: str, *args: Any, patience_s: float = 60.0) -> list[tuple[Any, ...]]:
    """One statement on a fresh monitor connection, retried while the server is unreachable."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            async with await connect(dsn, MONITOR_APP) as conn:
                cur = await conn.execute(sql, args or None)
                return await cur.fetchall() if cur.description else []
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def wait_accepting(dsn: str, timeout: float = 120.0) -> float:
    """The first moment (epoch seconds) a new connection succeeds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with await connect(dsn, MONITOR_APP) as conn:
                await conn.execute("SELECT 1")
                return time.time()
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


STARTUP_ADVICE = ("no default_step_timeout", "no retention")  # logged by every listen(): not news


# -- worker processes ----------------------------------------------------------------------------
class Workers:
    """Two worker slots, each a ``benches.chaos_worker`` subprocess; a killed one is replaced."""

    def __init__(self, dsn: str, core: str, plan: Plan, logs: Path) -> None:
        self.dsn, self.core, self.plan, self.logs = dsn, core, plan, logs
        self.slots: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: Counter[str] = Counter()
        # workers import the same iterflow as this process (a snapshot on PYTHONPATH, say)
        pkg_root = Path(iterflow.__file__).resolve().parents[1]
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg_root), str(ROOT)]))

    def start(self, slot: str) -> Path:
        self.starts[slot] += 1
        logfile = self.logs / f"worker-{slot}{self.starts[slot]}.log"
        with open(logfile, "wb") as out:
            self.slots[slot] = subprocess.Popen(
                [sys.executable, "-m", "benches.chaos_worker", "--dsn", self.dsn, "--schema", SCHEMA,
                 "--core", self.core, "--label", f"{slot}{self.starts[slot]}",
                 "--concurrency", str(self.plan.concurrency), "--lease", self.plan.lease,
                 "--step-ms", str(self.plan.step_ms)],
                stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
            )
        return logfile

    async def start_ready(self, slots: Sequence[str], timeout: float = 60.0) -> None:
        files = [self.start(s) for s in slots]
        deadline = time.monotonic() + timeout
        while not all("ready" in f.read_text(errors="replace") for f in files):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.slots.values()):
                raise RuntimeError(f"workers did not become ready:\n{self.output()}")
            await asyncio.sleep(0.1)

    def kill9(self, slot: str) -> int:
        proc = self.slots[slot]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        return proc.pid

    def stop_all(self) -> None:
        for proc in self.slots.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.slots.values():
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def output(self, tail: int = 4000) -> str:
        parts = []
        for f in sorted(self.logs.glob("worker-*.log")):
            text = f.read_text(errors="replace")
            parts.append(f"--- {f.name} ---\n{text[-tail:]}")
        return "\n".join(parts)

    def log_summary(self) -> dict[str, Any]:
        """Counts of warning/error lines over every worker log and the first few distinct ones."""
        counts: Counter[str] = Counter()
        samples: list[str] = []
        for f in sorted(self.logs.glob("worker-*.log")):
            for line in f.read_text(errors="replace").splitlines():
                if any(advice in line for advice in STARTUP_ADVICE):
                    continue
                for level in ("WARNING", "ERROR", "Traceback"):
                    if level in line:
                        counts[level] += 1
                        short = line.split(": ", 1)[-1][:200]
                        if len(samples) < 12 and short not in samples:
                            samples.append(short)
        return {"counts": dict(counts), "samples": samples}


class AppLog(logging.Handler):
    """The warnings and errors this process's engine logged during a cell (``--await-results``:
    the app process is a worker, and its lines are as telling as the worker processes')."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{time.time():.3f} {record.levelname} {record.getMessage()}"
        if not any(advice in line for advice in STARTUP_ADVICE):
            self.lines.append(line[:400])

    def __enter__(self) -> AppLog:
        logging.getLogger("iterflow").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("iterflow").removeHandler(self)

    def summary(self) -> dict[str, Any]:
        counts = Counter(line.split(" ", 2)[1] for line in self.lines)
        return {"counts": dict(counts), "first": self.lines[:20]}


# -- the cell: one core under one fault -----------------------------------------------------------
@dataclass
class Cell:
    core: str
    fault: str
    plan: Plan
    cluster: Cluster
    workers: Workers
    client: Engine
    t0: float = 0.0
    events: list[tuple[float, str]] = field(default_factory=list)
    acked: dict[int, tuple[str, float]] = field(default_factory=dict)   # run i -> (run id, ack time)
    start_errors: Counter[str] = field(default_factory=Counter)
    signal_kinds: dict[int, str] = field(default_factory=dict)          # run i -> SignalResult.kind
    signal_errors: Counter[str] = field(default_factory=Counter)
    backends_max: Counter[str] = field(default_factory=Counter)
    fault_notes: dict[str, Any] = field(default_factory=dict)
    # --await-results: run i -> (outcome, seconds from ack to return, detail); and the tasks
    results: dict[int, tuple[str, float, str]] = field(default_factory=dict)
    result_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    result_retries: Counter[str] = field(default_factory=Counter)
    last_result_at: float = 0.0

    def event(self, what: str) -> None:
        self.events.append((round(time.time() - self.t0, 3), what))
        log.info("[%s %s] +%.1fs %s", self.fault, self.core, time.time() - self.t0, what)

    def is_signal_run(self, i: int) -> bool:
        return not self.plan.long_steps and i % self.plan.signal_every == 0

    def flow_name(self, i: int) -> str:
        if self.plan.long_steps:
            return "chaos_long"
        return "chaos_signal" if self.is_signal_run(i) else "chaos_three"

    def planned_at(self, i: int) -> float:
        return self.t0 + i / self.plan.rate

    def load_end(self) -> float:
        return self.t0 + self.plan.load_s


def run_input(cell: Cell, i: int) -> dict[str, Any]:
    if cell.plan.long_steps:
        return {"i": i, "n": cell.plan.long_steps}
    return {"i": i} if cell.is_signal_run(i) else {"i": i, "sleep": i % 2 == 1}


def expected_output(cell: Cell, i: int) -> dict[str, Any]:
    if cell.plan.long_steps:
        return {"i": i, "steps": [step_value(f"s{k}", i) for k in range(cell.plan.long_steps)]}
    out: dict[str, Any] = {"i": i, "steps": [step_value(s, i) for s in ("s0", "s1", "s2")]}
    if cell.is_signal_run(i):
        out["signal"] = {"n": i}
    return out


def _err(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__}:{code}" if code else type(exc).__name__


# -- load ----------------------------------------------------------------------------------------
async def start_load(cell: Cell, signals: asyncio.TaskGroup) -> None:
    """Start runs at ``plan.rate`` (open loop: a batch that failed is retried with everything
    that fell due meanwhile), each with idempotency key ``chaos:<i>``; schedule the signals."""
    pending: list[int] = []
    nxt, n = 0, cell.plan.runs
    give_up = cell.load_end() + cell.plan.drain_s
    while (nxt < n or pending) and time.time() < give_up:
        due = min(n, int((time.time() - cell.t0) * cell.plan.rate) + 1)
        pending.extend(range(nxt, due))
        nxt = max(nxt, due)
        batch = pending[:500]
        if batch:
            try:
                await asyncio.wait_for(_start_batch(cell, batch, signals), 20)
                del pending[:len(batch)]
            except Exception as exc:  # noqa: BLE001 - any client error: retry the batch
                cell.start_errors[_err(exc)] += 1
                await asyncio.sleep(0.25)
                continue
        await asyncio.sleep(0.1)


async def _start_batch(cell: Cell, batch: list[int], signals: asyncio.TaskGroup) -> None:
    for name in ("chaos_three", "chaos_signal", "chaos_long"):
        members = [i for i in batch if cell.flow_name(i) == name]
        if not members or all(i in cell.acked for i in members):
            continue
        made = await cell.client.handle(name).start_many(
            [{"input": run_input(cell, i), "idempotency_key": f"chaos:{i}"} for i in members])
        now = time.time()
        for i, m in zip(members, made, strict=True):
            if i not in cell.acked:
                cell.acked[i] = (m.run_id, now)
                if name == "chaos_signal":
                    signals.create_task(send_signal(cell, i, m.run_id, max(now, cell.planned_at(i))))
                if cell.plan.await_results:
                    cell.result_tasks.append(asyncio.create_task(await_result(cell, i, m.run_id, now)))


async def await_result(cell: Cell, i: int, run_id: str, acked: float) -> None:
    """``handle.result(run_id)`` as an application awaits it. ``DatabaseUnavailable`` (the
    documented "try again later") is retried and counted; any other exception ends the wait
    and is recorded: a typed ``IterflowError`` by code, anything else as escaped."""
    handle = cell.client.handle(cell.flow_name(i))
    while True:
        try:
            out = await handle.result(run_id)
        except DatabaseUnavailable as exc:
            cell.result_retries[_err(exc)] += 1
            await asyncio.sleep(0.25)
            continue
        except (IterflowError, TimeoutError) as exc:
            outcome, detail = "typed", f"{_err(exc)}: {str(exc)[:200]}"
        except Exception as exc:  # noqa: BLE001 - the finding: an exception the API does not document
            outcome, detail = "escaped", f"{type(exc).__module__}.{_err(exc)}: {str(exc)[:200]}"
        else:
            outcome = "ok" if out == expected_output(cell, i) else "wrong"
            detail = "" if outcome == "ok" else repr(out)[:200]
        now = time.time()
        cell.results[i] = (outcome, now - acked, detail)
        cell.last_result_at = max(cell.last_result_at, now)
        return


async def send_signal(cell: Cell, i: int, run_id: str, started: float) -> None:
    """Signal ``go`` to run ``i`` ``signal_delay_s`` after its start, retried with one
    idempotency key until acknowledged (so a retry can be a duplicate, never a second signal)."""
    await asyncio.sleep(max(0.0, started + cell.plan.signal_delay_s - time.time()))
    give_up = cell.load_end() + cell.plan.drain_s
    while time.time() < give_up:
        try:
            res = await asyncio.wait_for(
                cell.client.signal(run_id, "go", {"n": i}, idempotency_key=f"go:{i}"), 20)
        except Exception as exc:  # noqa: BLE001 - any client error: retry
            cell.signal_errors[_err(exc)] += 1
            await asyncio.sleep(0.25)
            continue
        # a retry of a delivery whose acknowledgement was lost reports "duplicate": keep the first word
        cell.signal_kinds.setdefault(i, res.kind)
        return


async def sample_backends(cell: Cell, until: Callable[[], bool]) -> None:
    """The most client backends seen at once, by kind of connection."""
    sql = ("SELECT CASE WHEN application_name LIKE 'chaos-effects%%' THEN 'effects'"
           " WHEN application_name LIKE 'chaos-%%' THEN 'suite'"
           " WHEN application_name LIKE '%%-listen%%' OR query ILIKE 'LISTEN %%' THEN 'engine-listen'"
           " ELSE 'engine' END, count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 1")
    while not until():
        with contextlib.suppress(psycopg.Error):
            for kind, count in await query(cell.cluster.dsn, sql, patience_s=0):
                cell.backends_max[kind] = max(cell.backends_max[kind], count)
        await asyncio.sleep(0.5)


# -- faults --------------------------------------------------------------------------------------
# Each fault returns the moment recovery is measured from: its end, or for a server restart the
# first moment the server accepts connections again.
async def fault_kill9(cell: Cell) -> float:
    end = time.time() + cell.plan.fault_len_s
    n, last = 0, time.time()
    while time.time() < end:
        slot = "AB"[n % 2]
        pid = cell.workers.kill9(slot)
        cell.workers.start(slot)
        last = time.time()
        cell.event(f"kill -9 worker {slot} (pid {pid}), restarted")
        n += 1
        await asyncio.sleep(2.0)
    cell.fault_notes["kills"] = n
    return last


async def _restart(cell: Cell, mode: str) -> float:
    cell.event(f"pg_ctl restart -m {mode}")
    await asyncio.to_thread(cell.cluster.restart, mode)
    back = await wait_accepting(cell.cluster.dsn)
    cell.events.append((round(back - cell.t0, 3), "server accepts connections again"))
    return back


async def fault_restart_fast(cell: Cell) -> float:
    return await _restart(cell, "fast")


async def fault_restart_immediate(cell: Cell) -> float:
    return await _restart(cell, "immediate")


TERMINATE_EVERY_S = 5.0
ALL_CLIENTS = (f"backend_type = 'client backend' AND pid <> pg_backend_pid()"
               f" AND application_name NOT IN ('{MONITOR_APP}', '{FAULT_APP}')")
# The Rust core names its LISTEN connection `<app>-listen:<schema>`; the Python core's carried
# no name of its own up to 833291b (the pool's, empty by default), so a listener is also
# recognised by the statement it last ran, which on that connection is always its LISTEN.
LISTENERS = f"{ALL_CLIENTS} AND (application_name LIKE '%%-listen%%' OR query ILIKE 'LISTEN %%')"


async def _terminate_rounds(cell: Cell, where: str, what: str) -> float:
    end = time.time() + cell.plan.fault_len_s
    rounds: list[int] = []
    last = time.time()
    while True:
        rows = await query(cell.cluster.dsn, f"SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))"
                           f" FROM pg_stat_activity WHERE {where}")
        rounds.append(int(rows[0][0]))
        last = time.time()
        cell.event(f"terminated {rounds[-1]} {what}")
        if time.time() + TERMINATE_EVERY_S > end:
            break
        await asyncio.sleep(TERMINATE_EVERY_S)
    cell.fault_notes["terminated_per_round"] = rounds
    return last


async def fault_terminate_all(cell: Cell) -> float:
    return await _terminate_rounds(cell, ALL_CLIENTS, "client backends")


async def fault_terminate_listen(cell: Cell) -> float:
    # how many backends each rule matches right now, for the report (the finding: can one tell?)
    rows = await query(cell.cluster.dsn, f"SELECT count(*) FILTER (WHERE application_name LIKE '%%-listen%%'),"
                       f" count(*) FILTER (WHERE query ILIKE 'LISTEN %%') FROM pg_stat_activity WHERE {ALL_CLIENTS}")
    cell.fault_notes["listen_by_app_name"], cell.fault_notes["listen_by_last_query"] = rows[0]
    return await _terminate_rounds(cell, LISTENERS, "LISTEN connections")


async def fault_max_connections(cell: Cell) -> float:
    """Open connections until the server refuses one, hold them ``hog_s``, close them."""
    held: list[psycopg.AsyncConnection[Any]] = []
    refusal = ""
    try:
        while len(held) < 1000:
            try:
                held.append(await connect(cell.cluster.dsn, HOG_APP))
            except psycopg.OperationalError as exc:
                refusal = str(exc).strip().splitlines()[-1][:200]
                break
        cell.event(f"holding {len(held)} connections (then refused: {refusal})")
        cell.fault_notes.update(held=len(held), refusal=refusal)
        await asyncio.sleep(cell.plan.hog_s)
    finally:
        for conn in held:
            with contextlib.suppress(psycopg.Error):
                await conn.close()
    cell.event(f"released {len(held)} connections")
    return time.time()


FAULTS: dict[str, Callable[[Cell], Awaitable[float]]] = {
    "kill9": fault_kill9,
    "restart_fast": fault_restart_fast,
    "restart_immediate": fault_restart_immediate,
    "terminate_all": fault_terminate_all,
    "terminate_listen": fault_terminate_listen,
    "max_connections": fault_max_connections,
}


# -- outcome -------------------------------------------------------------------------------------
async def outstanding(cell: Cell) -> int:
    rows = await query(cell.cluster.dsn, f"SELECT count(*) FROM {SCHEMA}.runs WHERE finished_at IS NULL")
    return int(rows[0][0])


async def drain(cell: Cell, fault_end: float) -> float:
    """Wait until every run is terminal, or ``drain_s`` after the fault's end; returns when."""
    deadline = max(fault_end + cell.plan.drain_s, cell.load_end() + 10)
    while time.time() < deadline:
        if len(cell.acked) == cell.plan.runs and await outstanding(cell) == 0:
            break
        await asyncio.sleep(1.0)
    return time.time()


async def wait_results(cell: Cell, fault_end: float) -> None:
    """Every ``result()`` task to return, or ``drain_s`` after the fault's end (the rest are
    reported missing)."""
    deadline = max(fault_end + cell.plan.drain_s, cell.load_end() + 10)
    if cell.result_tasks:
        await asyncio.wait(cell.result_tasks, timeout=max(0.0, deadline - time.time()))


def results_outcome(cell: Cell, fault_end: float) -> dict[str, Any]:
    kinds = Counter(o for o, _, _ in cell.results.values())
    errors = Counter(d.split(": ", 1)[0] for o, _, d in cell.results.values() if o in ("typed", "escaped"))
    samples = list(dict.fromkeys(d for o, _, d in cell.results.values() if o != "ok"))[:5]
    waits = sorted(w for o, w, _ in cell.results.values() if o == "ok")
    last_ack = max((t for _, t in cell.acked.values()), default=fault_end)
    return {
        "results_ok": kinds["ok"], "results_wrong": kinds["wrong"], "results_typed_errors": kinds["typed"],
        "results_escaped": kinds["escaped"], "results_missing": len(cell.acked) - len(cell.results),
        "result_errors": dict(errors), "result_samples": samples, "result_retries": dict(cell.result_retries),
        "result_p50_s": round(waits[len(waits) // 2], 2) if waits else None,
        "result_p99_s": round(waits[int(0.99 * (len(waits) - 1))], 2) if waits else None,
        "result_max_s": round(waits[-1], 2) if waits else None,
        "results_drain_s": round(cell.last_result_at - fault_end, 1) if cell.results else None,
        "results_after_last_start_s": round(cell.last_result_at - last_ack, 1) if cell.results else None,
    }


async def collect(cell: Cell, fault_start: float, fault_end: float, drained: float) -> dict[str, Any]:
    dsn = cell.cluster.dsn
    runs = await query(dsn, f"SELECT id::text, status, output, error->>'code', left(error->>'message', 300),"
                            f" extract(epoch FROM finished_at)::float8, extract(epoch FROM created_at)::float8"
                            f" FROM {SCHEMA}.runs")
    reexec = await query(dsn, "SELECT count(*), coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n"
                              " FROM public.chaos_effects GROUP BY run_id, step HAVING count(*) > 1) d")
    dup_records = await query(dsn, f"SELECT count(*) FROM (SELECT 1 FROM {SCHEMA}.steps WHERE kind IN"
                                   f" ('step', 'signal') GROUP BY run_id, kind, name HAVING count(*) > 1) d")
    inbox = await query(dsn, f"SELECT run_id::text, count(*), count(consumed_at) FROM {SCHEMA}.signals"
                             f" GROUP BY run_id")
    by_id = {r[0]: r for r in runs}
    outcome = _runs_outcome(cell, by_id)
    outcome.update(_signals_outcome(cell, by_id, {r[0]: (int(r[1]), int(r[2])) for r in inbox}))
    outcome.update(bodies_reexecuted=int(reexec[0][1]), steps_reexecuted=int(reexec[0][0]),
                   duplicate_step_records=int(dup_records[0][0]))
    done_at = sorted(r[5] for r in runs if r[1] == "done" and r[5] is not None)
    outcome.update(throughput(cell, done_at, fault_start, fault_end))
    outcome.update(latency([r[5] - r[6] for r in runs if r[1] == "done" and r[5] is not None]))
    outcome["drain_s"] = round(drained - fault_end, 1)
    return outcome


def _runs_outcome(cell: Cell, by_id: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    ok = wrong = failed = stranded = lost = 0
    codes: Counter[str] = Counter()
    samples: list[str] = []
    for i, (run_id, _) in cell.acked.items():
        row = by_id.get(run_id)
        if row is None:
            lost += 1
        elif row[1] == "done":
            if row[2] == expected_output(cell, i):
                ok += 1
            else:
                wrong += 1
        elif row[1] in ("failed", "canceled"):
            failed += 1
            codes[row[3] or row[1]] += 1
            if len(samples) < 5 and (row[4] or "") not in samples:
                samples.append(row[4] or "")
        else:
            stranded += 1
            codes[f"stranded:{row[1]}"] += 1
    return {"runs": cell.plan.runs, "done_ok": ok, "wrong_output": wrong, "failed": failed, "stranded": stranded,
            "lost": lost, "unstarted": cell.plan.runs - len(cell.acked), "codes": dict(codes),
            "failure_samples": samples, "start_errors": dict(cell.start_errors)}


def _signals_outcome(cell: Cell, by_id: dict[str, tuple[Any, ...]],
                     inbox: dict[str, tuple[int, int]]) -> dict[str, Any]:
    lost = doubled = 0
    for i in cell.signal_kinds:
        run_id = cell.acked[i][0]
        rows, consumed = inbox.get(run_id, (0, 0))
        row = by_id.get(run_id)
        got = row[2].get("signal") if row is not None and row[1] == "done" and isinstance(row[2], dict) else None
        if rows > 1 or consumed > 1:
            doubled += 1
        elif rows == 0 or consumed == 0 or got != {"n": i}:
            lost += 1
    wanted = sum(1 for i in cell.acked if cell.is_signal_run(i))
    return {"signals_acked": len(cell.signal_kinds), "signals_unsent": wanted - len(cell.signal_kinds),
            "signals_lost": lost, "signals_doubled": doubled,
            "signal_kinds": dict(Counter(cell.signal_kinds.values())), "signal_errors": dict(cell.signal_errors)}


def latency(seconds: Sequence[float]) -> dict[str, Any]:
    """Start (``created_at``) to done (``finished_at``) of the runs that finished: a run that
    sat behind a dead lease or a missed wake-up shows here even when overall throughput did not
    dip. (The signal runs include their 1 s wait for the signal, the sleepy ones 0.4 s.)"""
    ordered = sorted(seconds)
    if not ordered:
        return {"latency_p99_s": None, "latency_max_s": None, "runs_over_10s": 0}
    return {"latency_p99_s": round(ordered[int(0.99 * (len(ordered) - 1))], 2), "latency_max_s": round(ordered[-1], 2),
            "runs_over_10s": sum(1 for x in ordered if x > 10)}


def buckets(times: Sequence[float], start: float, end: float) -> list[int]:
    n = max(0, int((end - start) / BUCKET_S) + 1)
    out = [0] * n
    for t in times:
        k = int((t - start) / BUCKET_S)
        if 0 <= k < n:
            out[k] += 1
    return out


def throughput(cell: Cell, done_at: Sequence[float], fault_start: float, fault_end: float) -> dict[str, Any]:
    """Pre-fault completions/s, seconds from ``fault_end`` until a 1 s window is back to
    >= 50 % of it, and the longest stretch without a completion from the fault on."""
    pre_from = cell.t0 + cell.plan.warmup_s
    pre = sum(1 for t in done_at if pre_from <= t < fault_start) / max(fault_start - pre_from, 1e-9)
    after = buckets(done_at, fault_end, (done_at[-1] if done_at else fault_end) + WINDOW_S)
    width = int(WINDOW_S / BUCKET_S)
    recovery = next((k * BUCKET_S for k in range(len(after))
                     if sum(after[k:k + width]) / WINDOW_S >= RECOVERED_SHARE * pre), None)
    marks = [fault_start] + [t for t in done_at if t >= fault_start]
    gap = max((b - a for a, b in zip(marks, marks[1:], strict=False)), default=None)
    return {"pre_fault_per_s": round(pre, 1), "recovery_s": recovery,
            "longest_gap_s": None if gap is None else round(gap, 2),
            "fault_start_s": round(fault_start - cell.t0, 2), "fault_end_s": round(fault_end - cell.t0, 2),
            "done_per_bucket": buckets(done_at, cell.t0, done_at[-1] if done_at else cell.t0)}


# -- running a cell ----------------------------------------------------------------------------
async def prepare(dsn: str) -> None:
    await iterflow.migrate(dsn, SCHEMA)
    await query(dsn, "CREATE TABLE public.chaos_effects (run_id uuid NOT NULL, step text NOT NULL,"
                     " at timestamptz NOT NULL DEFAULT clock_timestamp(), exec_id uuid PRIMARY KEY, worker text)")


async def run_cell(core: str, fault: str, plan: Plan, bindir: Path) -> dict[str, Any]:
    cluster = Cluster(bindir, plan.max_connections)
    logs = Path(tempfile.mkdtemp(prefix="iterflow-chaos-logs-"))
    workers = Workers(cluster.dsn, core, plan, logs)
    client: Engine | None = None
    t_wall = time.perf_counter()
    try:
        await asyncio.to_thread(cluster.init_and_start)
        await prepare(cluster.dsn)
        await workers.start_ready("AB")
        if plan.await_results:
            # the application's shape: the client process is a worker too
            client = create_engine(cluster.dsn, schema=SCHEMA, core=core, concurrency=plan.concurrency,
                                   lease=plan.lease, shutdown_timeout="3s")
            for f in flows(Effects(cluster.dsn, "C"), plan.step_ms / 1000):
                client.register(f)
            await client.listen()
        else:
            client = create_engine(cluster.dsn, schema=SCHEMA, core=core, concurrency=4)
            await client.client()
        cell = Cell(core, fault, plan, cluster, workers, client, t0=time.time())
        with AppLog() as app_log:
            result = await _drive(cell)
        result["worker_logs"] = workers.log_summary()
        if plan.await_results:  # the app process is a worker too: its warnings are evidence
            result["app_logs"] = app_log.summary()
    except Exception as exc:  # one broken cell must not lose the others
        log.exception("cell %s/%s broke", fault, core)
        result = {"error": f"{type(exc).__name__}: {exc}", "worker_output": workers.output(1500)}
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.stop(), 15)
        await asyncio.to_thread(workers.stop_all)
        await asyncio.to_thread(cluster.destroy)
        shutil.rmtree(logs, ignore_errors=True)
    result.update(core=core, fault=fault, wall_s=round(time.perf_counter() - t_wall, 1))
    return result


async def _drive(cell: Cell) -> dict[str, Any]:
    finished = False
    sampler = asyncio.create_task(sample_backends(cell, lambda: finished))
    try:
        async with asyncio.TaskGroup() as signals:
            loader = asyncio.create_task(start_load(cell, signals))
            await asyncio.sleep(max(0.0, cell.t0 + cell.plan.fault_at_s - time.time()))
            fault_start = time.time()
            cell.event(f"fault {cell.fault} begins")
            fault_end = await FAULTS[cell.fault](cell)
            cell.event(f"fault {cell.fault} over")
            await loader
        if cell.plan.await_results:
            await wait_results(cell, fault_end)
        drained = await drain(cell, fault_end)
    finally:
        finished = True
        await sampler
        for task in cell.result_tasks:
            task.cancel()
    result = await collect(cell, fault_start, fault_end, drained)
    if cell.plan.await_results:
        result.update(results_outcome(cell, fault_end))
        # the app process (worker label C) must have run its share of the steps
        rows = await query(cell.cluster.dsn, "SELECT left(worker, 1), count(*) FROM public.chaos_effects GROUP BY 1")
        result["step_bodies_by_process"] = {str(k): int(v) for k, v in rows}
        if cell.results:  # where the slowest run spent its time: its step bodies, by process, in order
            i = max(cell.results, key=lambda k: cell.results[k][1])
            rows = await query(cell.cluster.dsn, "SELECT step, worker, extract(epoch FROM at)::float8"
                                                 " FROM public.chaos_effects WHERE run_id = %s ORDER BY at",
                               cell.acked[i][0])
            marks = [(str(step), str(worker), round(at - cell.t0, 2)) for step, worker, at in rows]
            gaps = sorted(zip(marks, marks[1:], strict=False), key=lambda ab: ab[1][2] - ab[0][2])[-3:]
            acked = cell.acked[i][1]
            result["slowest_result"] = {"i": i, "run_id": cell.acked[i][0], "acked_s": round(acked - cell.t0, 2),
                                        "returned_s": round(acked + cell.results[i][1] - cell.t0, 2),
                                        "bodies": len(marks), "first": marks[:1], "last": marks[-1:],
                                        "longest_gaps": gaps}
    result.update(events=cell.events, fault_notes=cell.fault_notes, backends_max=dict(cell.backends_max))
    return result


# -- report ----------------------------------------------------------------------------------------
COLUMNS = (
    ("fault", "fault"), ("core", "core"), ("done_ok", "ok"), ("failed", "failed"), ("stranded", "stranded"),
    ("lost", "lost"), ("unstarted", "unstarted"), ("bodies_reexecuted", "re-run bodies"),
    ("duplicate_step_records", "dup records"), ("signals_lost", "sig lost"), ("signals_doubled", "sig doubled"),
    ("pre_fault_per_s", "pre-fault/s"), ("recovery_s", "recovery s"), ("longest_gap_s", "max gap s"),
    ("latency_max_s", "slowest run s"), ("runs_over_10s", "runs > 10 s"),
)


# --await-results: what the application's result() calls saw
RESULT_COLUMNS = (
    ("fault", "fault"), ("core", "core"), ("results_ok", "results ok"), ("results_wrong", "wrong"),
    ("results_typed_errors", "typed errors"), ("results_escaped", "escaped"), ("results_missing", "missing"),
    ("result_p50_s", "result() p50 s"), ("result_p99_s", "p99 s"), ("result_max_s", "slowest result() s"),
    ("results_drain_s", "last result after fault s"), ("results_after_last_start_s", "last result after last start s"),
    ("drain_s", "db drain s"),
)


def table(cells: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    rows = [[label for _, label in columns]]
    for c in cells:
        if "error" in c:
            rows.append([c["fault"], c["core"], f"ERROR: {c['error'][:80]}"] + [""] * (len(columns) - 3))
            continue
        rows.append(["never" if k == "recovery_s" and c.get(k) is None else str(c.get(k, "")) for k, _ in columns])
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(len(columns))]
    lines = ["| " + " | ".join(v.ljust(widths[i]) for i, v in enumerate(r)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def failure_lines(cells: Sequence[dict[str, Any]]) -> list[str]:
    out = []
    for c in cells:
        if "error" in c:
            continue
        if c["codes"]:
            out.append(f"{c['fault']}/{c['core']}: {c['codes']}; e.g. {c['failure_samples'][:2]}")
    return out


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    return done.stdout.strip()


def provenance() -> dict[str, Any]:
    pkg = Path(iterflow.__file__).resolve().parent
    so = next(pkg.glob("_core*.so"), None)
    in_checkout = pkg == ROOT / "python" / "iterflow"
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_engine_changes": git("status", "--short", "--", "python/iterflow", "crates").splitlines()
        if in_checkout else "n/a: iterflow imported from outside this checkout (a snapshot on PYTHONPATH)",
        "iterflow_imported_from": str(Path(iterflow.__file__).parent),
        "extension_mtime": datetime.fromtimestamp(so.stat().st_mtime, UTC).isoformat() if so else None,
        "python": sys.version.split()[0], "nproc": os.cpu_count(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benches.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--core", choices=("rust", "python", "both"), default="both")
    p.add_argument("--runs", type=int, default=None, help="runs per cell (default 2000, 300 with --quick)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    p.add_argument("--quick", action="store_true", help="a short version for CI")
    p.add_argument("--json", dest="json_path", default=None,
                   help="where the JSON report goes (default benches/results/chaos-<date>.json)")
    p.add_argument("--concurrency", type=int, default=None, help="per worker process (default 8)")
    p.add_argument("--lease", default=None, help="the workers' lease (default 30s, the engine's default)")
    p.add_argument("--step-ms", type=int, default=None, help="each step body's work after its effect (default 50)")
    p.add_argument("--await-results", action="store_true",
                   help="the client listens too (a worker in the app's process) and awaits every run's result()")
    p.add_argument("--long-steps", type=int, default=None,
                   help="every run is a long-lived flow of N step + 1 ms durable sleep rounds (no signals)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every fault event")
    args = p.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        p.error(f"unknown fault(s) {unknown}; choose from {list(FAULTS)}")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.runs is not None:
        changes["runs"] = args.runs
    if args.concurrency is not None:
        changes["concurrency"] = args.concurrency
    if args.lease is not None:
        changes["lease"] = args.lease
    if args.step_ms is not None:
        changes["step_ms"] = args.step_ms
    if args.await_results:
        changes["await_results"] = True
    if args.long_steps:
        changes["long_steps"] = args.long_steps
    return Plan(**(asdict(plan) | changes))


async def run_matrix(cores: Sequence[str], faults: Sequence[str], plan: Plan, bindir: Path) -> list[dict[str, Any]]:
    cells = []
    for fault in faults:
        for core in cores:
            print(f"... {fault} on the {core} core", file=sys.stderr, flush=True)
            cells.append(await run_cell(core, fault, plan, bindir))
            print(table(cells[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            if plan.await_results:
                print(table(cells[-1:], RESULT_COLUMNS).splitlines()[-1], file=sys.stderr, flush=True)
    return cells


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("iterflow", "psycopg.pool"):  # the client's reconnect chatter
        logging.getLogger(chatty).setLevel(logging.ERROR)
    if args.await_results:  # the app process is a worker: keep its warnings (AppLog, in the JSON)
        logging.getLogger("iterflow").setLevel(logging.WARNING)
        logging.getLogger("iterflow").propagate = False
    bindir = server_bindir()
    if bindir is None:
        print("chaos: skipped: no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb) on this machine")
        return 0
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        print("chaos: skipped: running as root without runuser to start PostgreSQL as `postgres`")
        return 0
    plan = make_plan(args)
    cores = CORES if args.core == "both" else (args.core,)
    started = datetime.now(UTC)
    meta = provenance()
    cells = asyncio.run(run_matrix(cores, args.faults, plan, bindir))
    text = table(cells)
    if plan.await_results:
        text += "\n\n" + table(cells, RESULT_COLUMNS)
    print(text)
    for line in failure_lines(cells):
        print(f"  {line}")
    path = Path(args.json_path or ROOT / "benches" / "results" / f"chaos-{started:%Y%m%d-%H%M%S}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"started_at": started.isoformat(), "duration_s": round((datetime.now(UTC) - started).total_seconds()),
              "plan": asdict(plan) | {"rate_per_s": round(plan.rate, 1), "load_s": plan.load_s},
              "quick": args.quick, **meta, "table": text, "cells": cells}
    path.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return 1 if any(violations(c) for c in cells) else 0


def violations(cell: dict[str, Any]) -> list[str]:
    """The guarantees a cell broke (re-run step bodies are allowed: at-least-once)."""
    if "error" in cell:
        return ["error"]
    keys = ("wrong_output", "failed", "stranded", "lost", "duplicate_step_records", "signals_lost", "signals_doubled",
            "results_wrong", "results_escaped", "results_missing")
    return [k for k in keys if cell.get(k)]


if __name__ == "__main__":
    sys.exit(main())
