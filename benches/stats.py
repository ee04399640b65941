"""Measurement helpers: percentiles, ``pg_stat_database`` / WAL snapshots, backend counts and
machine facts.

Caveats (also in docs/benchmarks.md):

* ``pg_stat_database.xact_commit`` is per database and ``pg_current_wal_lsn()`` is per
  cluster: anything else running on the same server during a measurement is counted too.
  :class:`Monitor` samples other active backends so a polluted number is flagged, not hidden.
* Backends publish their transaction counters lazily (at most about once a second, and when
  they exit), so the "after" snapshot is taken once the measured engine has been stopped,
  i.e. after its backends have exited and flushed their counters.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg.conninfo import make_conninfo

TERMINAL = ("done", "failed", "canceled")
APP_PREFIX = "iterflow-bench"
MONITOR_APP = f"{APP_PREFIX}-monitor"


# -- numbers ---------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo))


def median(values: Iterable[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return percentile(finite, 50) if finite else math.nan


def summarize_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max / mean of durations given in seconds, reported in milliseconds."""
    if not seconds:
        return {"p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan, "mean_ms": math.nan, "n": 0}
    return {
        "p50_ms": percentile(seconds, 50) * 1000,
        "p99_ms": percentile(seconds, 99) * 1000,
        "max_ms": max(seconds) * 1000,
        "mean_ms": sum(seconds) / len(seconds) * 1000,
        "n": len(seconds),
    }


# -- DSNs ----------------------------------------------------------------------------------------
def with_app_name(dsn: str, app: str) -> str:
    """``dsn`` with ``application_name`` set, in the DSN's own form (URL or key=value), so both
    psycopg and tokio-postgres accept it and every backend of an engine can be counted."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "application_name"]
        query.append(("application_name", app))
        return urlunsplit(parts._replace(query=urlencode(query)))
    return make_conninfo(dsn, application_name=app)


def redact(dsn: str) -> str:
    """The DSN without a password, for the JSON report."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
            return urlunsplit(parts._replace(netloc=netloc))
        return dsn
    return " ".join("password=***" if p.startswith("password=") else p for p in dsn.split())


# -- database counters ----------------------------------------------------------------------
@dataclass(frozen=True)
class DbSnapshot:
    xact_commit: int
    xact_rollback: int
    wal_lsn: int
    at: float

    def delta(self, later: DbSnapshot) -> dict[str, float]:
        return {
            "xact_commit": later.xact_commit - self.xact_commit,
            "xact_rollback": later.xact_rollback - self.xact_rollback,
            "wal_bytes": later.wal_lsn - self.wal_lsn,
            "seconds": later.at - self.at,
        }


def parse_lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


async def db_snapshot(dsn: str) -> DbSnapshot:
    """Transaction counters of the current database and the WAL position, from a fresh
    connection (closed again, so this snapshot's own transaction is published at once)."""
    async with await psycopg.AsyncConnection.connect(with_app_name(dsn, MONITOR_APP), autocommit=True) as conn:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        cur = await conn.execute(
            "SELECT xact_commit, xact_rollback, pg_current_wal_lsn()::text"
            "  FROM pg_stat_database WHERE datname = current_database()"
        )
        row = await cur.fetchone()
    assert row is not None
    return DbSnapshot(int(row[0]), int(row[1]), parse_lsn(row[2]), time.time())


ROW_COUNTERS = ("n_tup_ins", "n_tup_upd", "n_tup_hot_upd", "n_tup_del")


async def row_counters(dsn: str, schema: str) -> dict[str, int]:
    """Rows inserted, updated (``n_tup_hot_upd`` of them HOT) and deleted so far in the tables of
    ``schema`` (``pg_stat_user_tables``: per schema, so other clients of the server are not
    counted; published lazily, like the transaction counters)."""
    async with await psycopg.AsyncConnection.connect(with_app_name(dsn, MONITOR_APP), autocommit=True) as conn:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        cur = await conn.execute(
            "SELECT " + ", ".join(f"coalesce(sum({c}), 0)::int8" for c in ROW_COUNTERS)
            + " FROM pg_stat_user_tables WHERE schemaname = %s", (schema,))
        row = await cur.fetchone()
    assert row is not None
    return {c.removeprefix("n_tup_"): int(v) for c, v in zip(ROW_COUNTERS, row, strict=True)}


def rows_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Per counter, plus ``written``: rows inserted + updated + deleted (each one a heap tuple
    written, before index entries and WAL)."""
    out = {k: after[k] - before[k] for k in before}
    out["written"] = out["ins"] + out["upd"] + out["del"]
    return out


async def checkpoint(dsn: str) -> bool:
    """CHECKPOINT before a measurement so runs start from the same WAL state (needs a
    superuser or pg_checkpoint; skipped quietly otherwise)."""
    try:
        async with await psycopg.AsyncConnection.connect(with_app_name(dsn, MONITOR_APP), autocommit=True) as conn:
            await conn.execute("CHECKPOINT")
        return True
    except psycopg.Error:
        return False


class Monitor:
    """One connection that watches a schema's runs and the server's backends.

    ``poll`` returns the run status counts and samples ``pg_stat_activity``. A backend belongs
    to this run when its ``application_name`` contains the run's (unique) schema name: the
    Python core keeps the DSN's name (``iterflow-bench-<schema>-<role>``), the Rust core names
    its connections ``iterflow:<schema>`` / ``iterflow-listen:<schema>``. The harness's own
    connections (``<own_prefix>monitor``, ``<own_prefix>listen``) are not engine backends.
    Kept: the most engine backends seen at once (``max_engine_backends``), the most per
    application name, and the most *foreign* active backends (anything else on the server,
    other benchmark runs included) so that polluted counters and timings can be flagged.
    """

    def __init__(self, dsn: str, schema: str, own_prefix: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.own_prefix = own_prefix
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.max_backends: dict[str, int] = {}
        self.max_engine_backends = 0
        self.max_foreign_active = 0
        self.queries = 0

    async def __aenter__(self) -> Monitor:
        self.conn = await psycopg.AsyncConnection.connect(with_app_name(self.dsn, f"{self.own_prefix}monitor"),
                                                          autocommit=True)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.conn is not None:
            await self.conn.close()
            self.conn = None

    async def fetch(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        assert self.conn is not None
        self.queries += 1
        cur = await self.conn.execute(query, params or None)
        return await cur.fetchall() if cur.description else []

    async def statuses(self) -> dict[str, int]:
        rows = await self.fetch(f'SELECT status, count(*) FROM "{self.schema}".runs GROUP BY status')
        return {str(s): int(n) for s, n in rows}

    async def sample_backends(self) -> None:
        rows = await self.fetch(
            "SELECT coalesce(application_name, ''), count(*),"
            "       count(*) FILTER (WHERE state IS DISTINCT FROM 'idle')"
            "  FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            " GROUP BY 1"
        )
        foreign = engine = 0
        harness = (f"{self.own_prefix}monitor", f"{self.own_prefix}listen")
        for app, total, active in rows:
            if self.schema in app:
                self.max_backends[app] = max(self.max_backends.get(app, 0), int(total))
                if app not in harness:
                    engine += int(total)
            else:
                foreign += int(active)
        self.max_engine_backends = max(self.max_engine_backends, engine)
        self.max_foreign_active = max(self.max_foreign_active, foreign)

    async def poll(self) -> dict[str, int]:
        await self.sample_backends()
        return await self.statuses()

    def reset_backends(self) -> None:
        self.max_backends.clear()
        self.max_engine_backends = 0
        self.max_foreign_active = 0


# -- CPU accounting -------------------------------------------------------------------------
def process_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def postgres_cpu_s() -> float | None:
    """CPU seconds used so far by a PostgreSQL server on this machine: every live ``postgres``
    process plus the postmaster's reaped children (exited backends). Best effort, Linux only;
    None when no server process is visible (a remote or containerized server)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[str, int, float, float]] = {}
    try:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as fh:
                    raw = fh.read()
            except OSError:
                continue
            comm = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2:].split()
            # fields[1] = ppid, [11] utime, [12] stime, [13] cutime, [14] cstime (stat(5), from field 3)
            procs[int(entry)] = (comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / tick,
                                 (int(fields[13]) + int(fields[14])) / tick)
    except OSError:
        return None
    pg = {pid: p for pid, p in procs.items() if p[0] == "postgres" or p[0].startswith("postgres:")}
    if not pg:
        return None
    roots = [pid for pid, p in pg.items() if p[1] not in pg]
    return sum(p[2] for p in pg.values()) + sum(pg[r][3] for r in roots)


# -- machine ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    nproc: int | None
    cpu_model: str | None
    memory_gib: float | None
    platform: str
    python: str
    python_implementation: str
    postgres: str | None
    postgres_settings: dict[str, str]
    loadavg_at_start: tuple[float, float, float] | None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


SETTINGS = ("synchronous_commit", "fsync", "wal_sync_method", "shared_buffers", "max_connections",
            "commit_delay", "wal_level", "max_wal_size")


async def machine_info(dsn: str) -> dict[str, Any]:
    version: str | None = None
    settings: dict[str, str] = {}
    try:
        async with await psycopg.AsyncConnection.connect(with_app_name(dsn, MONITOR_APP), autocommit=True) as conn:
            cur = await conn.execute("SELECT version()")
            row = await cur.fetchone()
            version = str(row[0]) if row else None
            cur = await conn.execute("SELECT name, current_setting(name) FROM pg_settings"
                                     " WHERE name = ANY (%s)", (list(SETTINGS),))
            settings = {str(n): str(v) for n, v in await cur.fetchall()}
    except psycopg.Error as exc:
        version = f"unavailable: {exc}"
    return asdict(Machine(
        nproc=os.cpu_count(), cpu_model=_cpu_model(), memory_gib=_memory_gib(),
        platform=platform.platform(), python=sys.version.split()[0],
        python_implementation=platform.python_implementation(), postgres=version, postgres_settings=settings,
        loadavg_at_start=os.getloadavg() if hasattr(os, "getloadavg") else None,
    ))


def clean_json(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, tuples become lists, recursively (the reports' writer)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value
