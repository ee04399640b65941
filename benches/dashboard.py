"""The dashboard's reads at scale: 1,000,000 runs, the runs list (first page, with each
filter), the counts per status, and the pages over HTTP.

    python -m benches.dashboard [--rows 1000000] [--cores python,rust] [--reps 7] [--dsn DSN]
                                [--json PATH] [--keep]

A fresh schema is migrated and filled by one ``INSERT ... SELECT generate_series`` (20 flows,
three versions, 90% done, 4% failed, 2% canceled, 4% live in five live statuses, one run in a
hundred tagged ``vip``, every run tagged with one of ten ``shard:<n>``, a month of creation
times); the running ones get leased queue rows. ``VACUUM ANALYZE`` then sets the visibility map
and the planner's statistics, as autovacuum would on a live table. Each case is timed ``--reps``
times after one warm-up: the dashboard's statements through each core's ``admin_query``
(``reads.runs_page``, ``reads.status_counts``), and whole pages over HTTP (httpx's
ASGITransport, no network) on an engine of that core. The table shows the median and the
slowest repetition in ms; the JSON holds every repetition. The target (docs/operations.md,
"Dashboard"): the runs list and the counts under 200 ms at 1,000,000 runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
from psycopg import sql as pgsql

import iterflow
from iterflow.dashboard import create_app, reads
from iterflow.embedded import database_url

TARGET_MS = 200.0

FILL = """
INSERT INTO {schema}.runs (id, name, version, status, input, output, error, tags, attempts, created_at,
                           updated_at, finished_at)
SELECT gen_random_uuid(), 'flow-' || (i %% 20), 1 + (i / 7) %% 3, st,
       jsonb_build_object('n', i), CASE WHEN st = 'done' THEN jsonb_build_object('ok', true) END,
       CASE WHEN st = 'failed' THEN jsonb_build_object('code', 'STEP_FAILED', 'message', 'boom') END,
       CASE WHEN i %% 100 = 0 THEN ARRAY['vip', 'shard:' || (i %% 10)] ELSE ARRAY['shard:' || (i %% 10)] END,
       1, created, created + interval '2 seconds',
       CASE WHEN st IN ('done', 'failed', 'canceled') THEN created + interval '2 seconds' END
  FROM (SELECT i, now() - (%(rows)s - i) * interval '2.6 seconds' AS created,
               CASE WHEN i %% 100 < 90 THEN 'done' WHEN i %% 100 < 94 THEN 'failed'
                    WHEN i %% 100 < 96 THEN 'canceled'
                    ELSE (ARRAY['pending', 'running', 'sleeping', 'awaiting_signal', 'retrying'])[i %% 5 + 1]
               END AS st
          FROM generate_series(1, %(rows)s) AS i) AS g
"""

LEASES = """
INSERT INTO {schema}.queue (run_id, flow_name, ready_at, lease_owner, lease_token, lease_until)
SELECT id, name, now(), 'worker-' || (abs(hashtext(id::text)) % 4), 1, now() + interval '30 seconds'
  FROM {schema}.runs WHERE finished_at IS NULL AND status = 'running'
"""


async def fill(dsn: str, schema: str, rows: int) -> dict[str, float]:
    """Migrate a fresh schema and fill it; seconds each phase took."""
    took = {}
    start = time.perf_counter()
    await iterflow.migrate(dsn, schema)
    ident = pgsql.Identifier(schema)
    with psycopg.connect(dsn, autocommit=True) as conn:
        begin = time.perf_counter()
        conn.execute(pgsql.SQL(FILL).format(schema=ident), {"rows": rows})
        conn.execute(pgsql.SQL(LEASES).format(schema=ident))
        took["insert_s"] = time.perf_counter() - begin
        begin = time.perf_counter()
        conn.execute(pgsql.SQL("VACUUM (ANALYZE) {}.runs").format(ident))
        conn.execute(pgsql.SQL("VACUUM (ANALYZE) {}.queue").format(ident))
        took["vacuum_analyze_s"] = time.perf_counter() - begin
        row = conn.execute("SELECT pg_size_pretty(pg_total_relation_size(%s::regclass))",
                           (f'"{schema}".runs',)).fetchone()
        took["runs_size"] = row[0] if row else "?"
    took["total_s"] = time.perf_counter() - start
    return took


async def timed(reps: int, call: Callable[[], Awaitable[Any]]) -> list[float]:
    await call()  # warm-up: connections, prepared statements, caches
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        await call()
        out.append((time.perf_counter() - start) * 1000)
    return out


def list_cases(sample_id: str, middle: datetime) -> dict[str, reads.RunsQuery]:
    day = timedelta(days=1)
    return {
        "list: no filter": reads.RunsQuery(),
        "list: status=failed": reads.RunsQuery(status="failed"),
        "list: status=canceled": reads.RunsQuery(status="canceled"),
        "list: status=awaiting_signal": reads.RunsQuery(status="awaiting_signal"),
        "list: flow": reads.RunsQuery(flow="flow-7"),
        "list: flow+version": reads.RunsQuery(flow="flow-7", version=2),
        "list: flow+status=failed": reads.RunsQuery(flow="flow-11", status="failed"),
        "list: flow+status, none match": reads.RunsQuery(flow="flow-7", status="failed"),
        "list: tag=vip (1%)": reads.RunsQuery(tag="vip"),
        "list: tag=shard:3 (10%)": reads.RunsQuery(tag="shard:3"),
        "list: created, one day": reads.RunsQuery(since=middle, until=middle + day),
        "list: id prefix": reads.RunsQuery(q=sample_id[:6]),
        "list: whole id": reads.RunsQuery(q=sample_id),
    }


async def bench_core(dsn: str, schema: str, core_name: str, reps: int) -> list[dict[str, Any]]:
    engine = iterflow.create_engine(dsn, schema=schema, core=core_name)
    results: list[dict[str, Any]] = []
    try:
        core = await engine.client()
        first = await reads.runs_page(core, reads.RunsQuery())
        sample_id = first.runs[17]["id"]
        middle = first.runs[0]["created_at"] - timedelta(days=15)
        for label, query in list_cases(sample_id, middle).items():
            results.append({"case": label, "ms": await timed(reps, lambda q=query: reads.runs_page(core, q))})
        second = reads.RunsQuery(cursor=first.next_cursor)
        results.append({"case": "list: second page (keyset)",
                        "ms": await timed(reps, lambda: reads.runs_page(core, second))})
        for label, query in {"counts: no filter": reads.RunsQuery(), "counts: flow": reads.RunsQuery(flow="flow-7"),
                             "counts: flow+version": reads.RunsQuery(flow="flow-7", version=2),
                             "counts: tag=vip": reads.RunsQuery(tag="vip")}.items():
            results.append({"case": label, "ms": await timed(reps, lambda q=query: reads.status_counts(core, q))})
        app = create_app(engine)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            for path in ("/", "/?flow=flow-7", "/?status=failed", "/?tag=vip", "/?flow=flow-7&version=2",
                         "/runs/rows", f"/runs/{sample_id}", "/flows", "/workers"):
                async def get(p: str = path) -> None:
                    answer = await client.get(p)
                    if answer.status_code != 200:
                        raise SystemExit(f"GET {p}: HTTP {answer.status_code}")
                results.append({"case": f"http: GET {path}", "ms": await timed(reps, get)})
    finally:
        await engine.stop()
    for r in results:
        r["core"] = core_name
        r["median_ms"] = statistics.median(r["ms"])
        r["max_ms"] = max(r["ms"])
    return results


def table(results: list[dict[str, Any]], cores: list[str]) -> str:
    cases = list(dict.fromkeys(r["case"] for r in results))
    by = {(r["case"], r["core"]): r for r in results}
    width = max(len(c) for c in cases)
    lines = [f"{'case':<{width}}  " + "  ".join(f"{c + ' median / max ms':>26}" for c in cores)]
    for case in cases:
        cells = []
        for c in cores:
            r = by.get((case, c))
            mark = "" if r is None or r["median_ms"] < TARGET_MS or case.startswith("http") else " !"
            cells.append(f"{r['median_ms']:>12.1f} / {r['max_ms']:>8.1f}{mark:>2}" if r else f"{'-':>26}")
        lines.append(f"{case:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.dashboard", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--cores", default="python,rust")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--dsn", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--keep", action="store_true", help="keep the schema (its name is printed)")
    args = p.parse_args(argv)
    dsn = args.dsn or database_url()
    cores = [c.strip() for c in args.cores.split(",") if c.strip()]
    schema = f"bench_dash_{uuid.uuid4().hex[:8]}"
    try:
        setup = await fill(dsn, schema, args.rows)
        print(f"{args.rows:,} runs in {schema}: insert {setup['insert_s']:.1f} s, vacuum analyze "
              f"{setup['vacuum_analyze_s']:.1f} s, table with indexes {setup['runs_size']}", flush=True)
        results = []
        for core_name in cores:
            results += await bench_core(dsn, schema, core_name, args.reps)
    finally:
        if not args.keep:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(pgsql.Identifier(schema)))
    print(table(results, cores))
    slow = [r for r in results if not r["case"].startswith("http") and r["median_ms"] >= TARGET_MS]
    print(f"target: the list and the counts under {TARGET_MS:.0f} ms (median): "
          + ("met" if not slow else f"missed by {len(slow)} case(s), marked !"))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"rows": args.rows, "reps": args.reps, "setup": setup, "at": datetime.now(UTC).isoformat(),
                       "results": results}, out, indent=2, default=str)
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
