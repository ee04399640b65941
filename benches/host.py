"""The host's floor right now: what one durable commit and one NOTIFY hop cost on this machine,
measured with bare psycopg just before each workload run.

Every latency number of the suite stands on these two: a signal's resume waits for the
delivery's commit and for its notification to reach the worker. On a shared VM they move by
several times from minute to minute (CPU steal, the neighbours' disk), so a latency run is only
comparable with another taken at a similar floor. The runner stores the probe with each run and
prints its range under the table.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
from psycopg import sql as pgsql

from .stats import MONITOR_APP, summarize_ms, with_app_name

SAMPLES = 100
GAP_S = 0.004  # between samples: an idle-ish arrival pattern, like a latency workload's


async def floor(dsn: str, schema: str) -> dict[str, Any]:
    """p50/p99 ms of (a) a one-row INSERT committed with ``synchronous_commit=on`` plus NOTIFY
    in one round trip, as seen by the committing client, and (b) from sending it to the
    notification arriving on a second connection (another backend's LISTEN)."""
    table = pgsql.Identifier(schema, "host_probe")
    channel = f"iterflow_bench_probe_{schema}"
    dsn = with_app_name(dsn, MONITOR_APP)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as writer, \
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
        await writer.execute(pgsql.SQL("CREATE TABLE IF NOT EXISTS {} (id bigserial PRIMARY KEY)").format(table))
        await listener.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(channel)))
        arrived: dict[str, float] = {}

        async def hear() -> None:
            async for note in listener.notifies():
                arrived[note.payload] = time.perf_counter()

        hearing = asyncio.ensure_future(hear())
        commit_s: list[float] = []
        sent: dict[str, float] = {}
        statement = pgsql.SQL("INSERT INTO {} DEFAULT VALUES; SELECT pg_notify({}, {})")
        try:
            for i in range(SAMPLES):
                t = time.perf_counter()
                await writer.execute(statement.format(table, pgsql.Literal(channel), pgsql.Literal(str(i))))
                commit_s.append(time.perf_counter() - t)
                sent[str(i)] = t
                await asyncio.sleep(GAP_S)
            deadline = time.perf_counter() + 2.0
            while len(arrived) < SAMPLES and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
        finally:
            hearing.cancel()
            await asyncio.gather(hearing, return_exceptions=True)
        await writer.execute(pgsql.SQL("DROP TABLE {}").format(table))
    commit = summarize_ms(commit_s)
    hop = summarize_ms([arrived[k] - t for k, t in sent.items() if k in arrived])
    return {"commit_p50_ms": commit["p50_ms"], "commit_p99_ms": commit["p99_ms"],
            "notify_p50_ms": hop["p50_ms"], "notify_p99_ms": hop["p99_ms"], "samples": SAMPLES}
