"""The benchmark runner: every workload on every requested core, one table, one JSON file.

    python -m benches [--quick] [--cores python,rust] [--reps N] [--json PATH] [--only w1,w3]
                      [--w9-iterations N] [--w10-runs N] [--w10-turns N]
                      [--dsn DSN] [--concurrency N | python=N,rust=M] [--timeout SECONDS]

Repetitions are interleaved (rep 1: w1 python, w1 rust, w2 python, ...) so the two cores of a
ratio are measured side by side. The table shows the median of the repetitions; the JSON holds
every repetition's raw result, the medians and the machine. Exit status: 0 when every
requested run on an available core succeeded, 1 when any failed (wrong result, hang, error),
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql as pgsql

import iterflow
from iterflow.embedded import database_url

from . import host
from .registry import WORKLOADS, Workload
from .stats import MONITOR_APP, clean_json, machine_info, median, redact, with_app_name
from .workloads import FULL, QUICK, Env, Sizes, WorkloadError

CORES = ("python", "rust")
log = logging.getLogger("benches")


class _DropNoise(logging.Filter):
    """Drop the engine's configuration advice that is deliberate here: no default_step_timeout
    (a timeout wraps every step in wait_for + shield, overhead this benchmark does not want)
    and no retention (each schema is dropped after its run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "no default_step_timeout" not in message and "no retention configured" not in message


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benches", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="scaled-down sizes: runs in seconds (the CI smoke run)")
    p.add_argument("--cores", default="python,rust", help="comma list of cores (default: python,rust)")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the table shows medians (default: 3)")
    p.add_argument("--json", dest="json_path", default=None, help="write the full report here")
    p.add_argument("--only", default=None, help="comma list of workloads, e.g. w1,w3 (default: all)")
    p.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: $DATABASE_URL, else the embedded server)")
    p.add_argument("--concurrency", default=None,
                   help="the worker engine's concurrency: N for every core, or per core as python=N,rust=M "
                        "(default: 32; 8 with --quick)")
    p.add_argument("--w9-iterations", type=int, default=None,
                   help="w9's iterations (default: 10,000; 100 with --quick)")
    p.add_argument("--w10-runs", type=int, default=None, help="w10's runs (default: 200; 5 with --quick)")
    p.add_argument("--w10-turns", type=int, default=None, help="w10's turns per run (default: 100; 5 with --quick)")
    p.add_argument("--sticky-cache", type=int, default=None,
                   help="the worker engines' sticky_cache (held runs; 0 turns it off; default: the engine's)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds one workload run may take (default: 900, or 60 with --quick)")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    args.cores = [c.strip() for c in args.cores.split(",") if c.strip()]
    unknown = [c for c in args.cores if c not in CORES]
    if unknown or not args.cores:
        p.error(f"--cores: unknown {unknown}; choose from {', '.join(CORES)}")
    args.concurrency = _parse_concurrency(p, args.concurrency)
    if args.sticky_cache is not None and args.sticky_cache < 0:
        p.error("--sticky-cache must be at least 0")
    for knob in ("w9_iterations", "w10_runs", "w10_turns"):
        if getattr(args, knob) is not None and getattr(args, knob) < 1:
            p.error(f"--{knob.replace('_', '-')} must be at least 1")
    ids = [w.id for w in WORKLOADS]
    args.only = [w.strip() for w in args.only.split(",") if w.strip()] if args.only else ids
    bad = [w for w in args.only if w not in ids]
    if bad or not args.only:
        p.error(f"--only: unknown {bad}; choose from {', '.join(ids)}")
    return args


def _parse_concurrency(p: argparse.ArgumentParser, text: str | None) -> dict[str, int]:
    """``"64"`` -> every core; ``"python=32,rust=128"`` -> per core (others keep the default)."""
    if not text:
        return {}
    try:
        if "=" not in text:
            return dict.fromkeys(CORES, int(text))
        out = {}
        for part in text.split(","):
            core, _, n = part.partition("=")
            if core.strip() not in CORES:
                raise ValueError(core)
            out[core.strip()] = int(n)
    except ValueError:
        p.error(f"--concurrency: expected N or python=N,rust=M, got {text!r}")
    if any(n < 1 for n in out.values()):
        p.error("--concurrency must be positive")
    return out


def core_status(core: str) -> tuple[bool, str | None]:
    if core == "python":
        return True, None
    try:
        import iterflow.cores.rust  # noqa: F401
    except ImportError as exc:
        return False, f"iterflow.cores.rust is not importable ({exc})"
    return True, None


async def _drop_schema(dsn: str, schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(with_app_name(dsn, MONITOR_APP), autocommit=True) as conn:
        await conn.execute(pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(pgsql.Identifier(schema)))


async def _checkpoints(dsn: str) -> int | None:
    """Checkpoints the server has started so far (a checkpoint during a run is noise: the
    full-page images after it make every first write of a page costlier)."""
    try:
        async with await psycopg.AsyncConnection.connect(with_app_name(dsn, MONITOR_APP), autocommit=True) as conn:
            cur = await conn.execute("SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter")
            row = await cur.fetchone()
            return int(row[0]) if row else None
    except psycopg.Error:  # e.g. a server where the view is not readable: the field is left out
        return None


async def run_one(w: Workload, core: str, rep: int, dsn: str, sizes: Sizes, timeout: float,
                  concurrency: dict[str, int], sticky_cache: int | None = None) -> dict[str, Any]:
    assert w.run is not None
    schema = f"bench_{w.id}_{core[:2]}_{os.getpid():x}_{rep}"
    env = Env(dsn=dsn, core=core, schema=schema, sizes=sizes, seed=1000 + rep,
              concurrency=concurrency.get(core, sizes.concurrency),
              worker_options={} if sticky_cache is None else {"sticky_cache": sticky_cache})
    t0 = time.perf_counter()
    phases: dict[str, float] = {}
    floor: dict[str, Any] | None = None
    checkpoints_before = await _checkpoints(dsn)
    try:
        await _drop_schema(dsn, schema)
        await iterflow.migrate(dsn, schema)
        floor = await _host_floor(dsn, schema)
        phases["setup_s"] = time.perf_counter() - t0
        async with env.stack:
            result = await asyncio.wait_for(w.run(env), timeout)
            phases["workload_s"] = time.perf_counter() - t0 - phases["setup_s"]
        phases["engines_stopped_s"] = time.perf_counter() - t0 - sum(phases.values())
    except WorkloadError as exc:
        result = {"error": f"WorkloadError: {exc}"}
    except TimeoutError:
        result = {"error": f"timed out after {timeout:g}s"}
    except Exception as exc:  # noqa: BLE001 - one failing run must not lose the others
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": "".join(tb)[-4000:]}
    finally:
        try:
            await _drop_schema(dsn, schema)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not drop schema %s: %r", schema, exc)
    result["wall_s"] = time.perf_counter() - t0
    result["phases_s"] = phases
    result["concurrency"] = env.concurrency
    result["schema"] = schema
    if floor is not None:
        result["host_floor"] = floor
    result.setdefault("foreign_active_backends_max", env.foreign_activity())
    result["loadavg_1m_after"] = os.getloadavg()[0]
    checkpoints_after = await _checkpoints(dsn)
    if checkpoints_before is not None and checkpoints_after is not None:
        result["checkpoints_during"] = checkpoints_after - checkpoints_before
    return result


async def _host_floor(dsn: str, schema: str) -> dict[str, Any] | None:
    """The host probe (benches/host.py); a server where it cannot run leaves the field out."""
    try:
        return await host.floor(dsn, schema)
    except psycopg.Error as exc:
        log.warning("host probe failed: %r", exc)
        return None


def floor_lines(report: dict[str, Any]) -> list[str]:
    """One line per workload: the range of the host probe's p50s over its runs."""
    out = []
    for wid, entry in report["workloads"].items():
        floors = [r["host_floor"] for reps in entry["reps"].values() for r in reps if r.get("host_floor")]
        if entry["source"] is None and floors:
            hop = [f["notify_p50_ms"] for f in floors]
            commit = [f["commit_p50_ms"] for f in floors]
            out.append(f"host floor before {wid}: durable commit + NOTIFY p50 "
                       f"{_fmt(min(commit))}-{_fmt(max(commit))} ms, "
                       f"to another backend's LISTEN {_fmt(min(hop))}-{_fmt(max(hop))} ms")
    return out


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, str):
        return v
    a = abs(v)
    if float(v).is_integer() and a < 1e9:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _progress(w: Workload, core: str, rep: int, reps: int, result: dict[str, Any]) -> str:
    head = f"[rep {rep + 1}/{reps}] {w.id} {core:6}"
    if "error" in result:
        return f"{head}: ERROR {result['error']}"
    parts = []
    for wl in WORKLOADS:
        if wl is w or wl.source == w.id:
            parts += [f"{m.key}={_fmt(result.get(m.key))}" for m in wl.metrics]
    return f"{head}: {' '.join(parts)} ({result['wall_s']:.1f}s)"


async def run_all(args: argparse.Namespace, dsn: str, sizes: Sizes, timeout: float) -> dict[str, Any]:
    cores = {c: core_status(c) for c in args.cores}
    available = [c for c, (ok, _) in cores.items() if ok]
    selected = [w for w in WORKLOADS if w.id in args.only]
    sources = {w.source for w in selected if w.source}
    to_run = [w for w in WORKLOADS if w.run is not None and (w.id in args.only or w.id in sources)]
    machine = await machine_info(dsn)
    head_at_start = _git_describe()
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {w.id: {c: [] for c in available} for w in to_run}
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    for rep in range(args.reps):
        for w in to_run:
            for core in available:
                result = await run_one(w, core, rep, dsn, sizes, timeout, args.concurrency, args.sticky_cache)
                runs[w.id][core].append(result)
                print(_progress(w, core, rep, args.reps, result), file=sys.stderr, flush=True)

    workloads: dict[str, Any] = {}
    for w in selected:
        src = w.source or w.id
        entry: dict[str, Any] = {
            "title": w.title(sizes), "source": w.source,
            "metrics": [{"key": m.key, "label": m.label, "better": m.better, "optional": m.optional}
                        for m in w.metrics],
            "reps": {}, "medians": {}, "errors": {},
        }
        for core in args.cores:
            reps = runs[src].get(core) if core in available else None
            if reps is None:
                entry["medians"][core] = {m.key: None for m in w.metrics}
                entry["reps"][core] = []
                continue
            entry["reps"][core] = reps if w.source is None else [
                {m.key: r.get(m.key) for m in w.metrics} | ({"error": r["error"]} if "error" in r else {})
                for r in reps
            ]
            ok = [r for r in reps if "error" not in r]
            entry["errors"][core] = [r["error"] for r in reps if "error" in r]
            entry["medians"][core] = {m.key: median([r[m.key] for r in ok if m.key in r]) if ok else None
                                      for m in w.metrics}
        workloads[w.id] = entry
    return {
        "started_at": started.isoformat(), "duration_s": time.perf_counter() - t0,
        "machine": machine,
        "config": {"quick": args.quick, "reps": args.reps, "cores": args.cores, "only": args.only,
                   "dsn": redact(dsn), "timeout_s": timeout, "sizes": sizes.__dict__, "iterflow": head_at_start,
                   "iterflow_at_end": _git_describe(),
                   "concurrency": {c: args.concurrency.get(c, sizes.concurrency) for c in args.cores},
                   "sticky_cache": args.sticky_cache},
        "cores": {c: {"available": ok, "reason": why} for c, (ok, why) in cores.items()},
        "workloads": workloads,
    }


def _git_describe() -> str | None:
    head = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".git", "HEAD")
    try:
        with open(head, encoding="utf-8") as fh:
            ref = fh.read().strip()
        if ref.startswith("ref: "):
            with open(os.path.join(os.path.dirname(head), ref[5:]), encoding="utf-8") as fh:
                return fh.read().strip()[:12] + " (+ uncommitted changes, if any)"
        return ref[:12]
    except OSError:
        return None


def table(report: dict[str, Any]) -> str:
    cores = [c for c in CORES]
    rows = [("workload", "metric", *cores, "rust/python")]
    for wid, entry in report["workloads"].items():
        first = True
        for m in entry["metrics"]:
            cells = []
            values = {}
            for core in cores:
                med = entry["medians"].get(core, {}).get(m["key"]) if core in entry["medians"] else None
                errs = entry["errors"].get(core) or []
                if med is None and errs:
                    cells.append("err")
                else:
                    cells.append(_fmt(med))
                values[core] = med
            py, rs = values.get("python"), values.get("rust")
            ratio = f"{rs / py:.2f}x" if isinstance(py, (int, float)) and isinstance(rs, (int, float)) and py \
                and math.isfinite(py) and math.isfinite(rs) else "n/a"
            arrow = "(higher is better)" if m["better"] == "higher" else "(lower is better)"
            rows.append((f"{wid} {entry['title']}" if first else "", f"{m['label']} {arrow}", *cells, ratio))
            first = False
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, r in enumerate(rows):
        line = " | ".join(c.ljust(widths[j]) if j < 2 else c.rjust(widths[j]) for j, c in enumerate(r))
        out.append(line.rstrip())
        if i == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    iterflow_log = logging.getLogger("iterflow")
    noise = _DropNoise()
    iterflow_log.addFilter(noise)
    try:
        return _run(args)
    finally:  # the runner is also called in-process (tests, `iterflow bench`): leave logging as found
        iterflow_log.removeFilter(noise)


def _run(args: argparse.Namespace) -> int:
    dsn = database_url(args.dsn)
    sizes = QUICK if args.quick else FULL
    knobs = {k: getattr(args, k) for k in ("w9_iterations", "w10_runs", "w10_turns") if getattr(args, k) is not None}
    sizes = replace(sizes, **knobs)
    timeout = args.timeout or (60.0 if args.quick else 900.0)
    report = asyncio.run(run_all(args, dsn, sizes, timeout))

    text = table(report)
    print(text)
    m = report["machine"]
    conc = report["config"]["concurrency"]
    print(f"\nmedians of {args.reps} rep(s){' (--quick sizes)' if args.quick else ''}; worker concurrency "
          + ", ".join(f"{c}={n}" for c, n in conc.items()) + "; "
          f"{m['nproc']} CPUs, Python {m['python']}, {(m['postgres'] or '').split(' on ')[0]}, "
          f"synchronous_commit={m['postgres_settings'].get('synchronous_commit', '?')}")
    for line in floor_lines(report):
        print(line)
    for core, st in report["cores"].items():
        if not st["available"]:
            print(f"{core} core: n/a ({st['reason']})")
    foreign = {wid: max((r.get("foreign_active_backends_max") or 0) for reps in e["reps"].values() for r in reps)
               for wid, e in report["workloads"].items() if e["source"] is None and any(e["reps"].values())}
    busy = {wid: n for wid, n in foreign.items() if n}
    if busy:
        print("note: other clients were active on the server during "
              + ", ".join(f"{wid} (up to {n} backends)" for wid, n in busy.items())
              + ": their work shares the CPUs and is counted in the xact/WAL totals; absolute numbers are unreliable")
    if report["config"]["iterflow"] != report["config"]["iterflow_at_end"]:
        print(f"note: the checkout moved from {report['config']['iterflow']} to {report['config']['iterflow_at_end']} "
              "during the run: this process kept the code it imported, subprocesses and migrations did not")
    failed = []
    for wid, entry in report["workloads"].items():
        for core, errs in entry["errors"].items():
            failed += [f"{wid} {core}: {e}" for e in errs if entry["source"] is None]
    for line in failed:
        print(f"FAILED {line}")
    if args.json_path:
        report["table_text"] = text
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(clean_json(report), fh, indent=2, default=str)
            fh.write("\n")
        print(f"wrote {args.json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
