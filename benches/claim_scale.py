"""The claim at 1,000,000 queued runs (issue 17): does it stay on its indexes?

    python -m benches.claim_scale [--dsn DSN] [--runs 1000000] [--keys 1000] [--json PATH]

Fills a fresh schema with ``--runs`` ready runs of a keyed, limited flow (``--keys`` keys, at
most 8 executing per key) and as many of a flow without limits, then times claims of 32 and of
512 runs of each through the engine's own statement (``claim_with_history``, both branches:
``claim_limited`` and the plain one), each in a transaction rolled back so every claim sees the
full queue. "Seq scans" is what ``pg_stat_user_tables`` counted on ``runs`` and ``queue``
during the claims: zero means every claim was answered from the indexes. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import psycopg
from psycopg import RawCursor

import iterflow
from iterflow import sql
from iterflow.embedded import database_url

LIMITED = "bench_claim_keyed"
PLAIN = "bench_claim_plain"
REPS = 15


def fill(conn: psycopg.Connection[Any], schema: str, runs: int, keys: int) -> float:
    t0 = time.perf_counter()
    for flow, keyed in ((LIMITED, True), (PLAIN, False)):
        conn.execute(
            f'INSERT INTO "{schema}".runs (id, name, version, status, input, concurrency_key)'
            " SELECT gen_random_uuid(), %s, 1, 'pending', 'null', CASE WHEN %s THEN 'k' || (i %% %s) END"
            " FROM generate_series(1, %s) AS i", (flow, keyed, keys, runs))
    conn.execute(
        f'INSERT INTO "{schema}".queue (run_id, flow_name, ready_at, concurrency_key)'
        f" SELECT id, name, created_at, coalesce(concurrency_key, '') FROM \"{schema}\".runs")
    conn.execute(
        f'INSERT INTO "{schema}".flow_limits (flow_name, key_concurrency, limited) VALUES (%s, 8, true)', (LIMITED,))
    conn.execute(f'ANALYZE "{schema}".runs, "{schema}".queue')
    return time.perf_counter() - t0


def seq_scans(conn: psycopg.Connection[Any], schema: str) -> int:
    row = conn.execute(
        "SELECT coalesce(sum(seq_scan), 0) FROM pg_stat_user_tables WHERE schemaname = %s"
        " AND relname IN ('runs', 'queue')", (schema,)).fetchone()
    return int(row[0]) if row else 0


def time_claims(conn: psycopg.Connection[Any], schema: str, flow: str, n: int) -> dict[str, Any]:
    statement = sql.queries(schema)["claim_with_history"]
    conn.execute("SELECT pg_stat_clear_snapshot()")
    before = seq_scans(conn, schema)
    times, claimed = [], []
    for _ in range(REPS):
        conn.execute("BEGIN")
        t0 = time.perf_counter()
        rows = RawCursor(conn).execute(statement, ([flow], n, "bench", 30_000), prepare=True).fetchall()
        times.append((time.perf_counter() - t0) * 1000)
        conn.execute("ROLLBACK")
        claimed.append(sum(1 for r in rows if r[0] == "run"))
    time.sleep(0.6)  # the statistics collector publishes the backend's counters
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return {"flow": flow, "n": n, "p50_ms": statistics.median(times), "max_ms": max(times),
            "claimed": statistics.median(claimed), "seq_scans": seq_scans(conn, schema) - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", default=None)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    dsn = database_url(args.dsn)
    schema = f"bench_claim_{int(time.time())}"
    asyncio.run(iterflow.migrate(dsn, schema))
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            fill_s = fill(conn, schema, args.runs, args.keys)
            results = [time_claims(conn, schema, flow, n) for flow in (LIMITED, PLAIN) for n in (32, 512)]
        finally:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    print(f"{args.runs:,} queued runs per flow ({args.keys:,} keys on {LIMITED}), filled in {fill_s:.0f}s;"
          f" {REPS} claims each, rolled back")
    print(f"{'flow':<20} {'n':>4} {'claimed':>8} {'p50 ms':>8} {'max ms':>8} {'seq scans':>10}")
    for r in results:
        print(f"{r['flow']:<20} {r['n']:>4} {r['claimed']:>8.0f} {r['p50_ms']:>8.1f} {r['max_ms']:>8.1f}"
              f" {r['seq_scans']:>10}")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as out:
            json.dump({"runs": args.runs, "keys": args.keys, "fill_s": fill_s, "results": results}, out, indent=2)
        print(f"wrote {args.json_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
