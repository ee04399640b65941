"""A worker process for the step-limit tests (tests/test_step_limits.py); several run at once on
one database, and the tests may kill one with SIGKILL.

    python limit_worker.py --dsn DSN --schema S --core python --label A [--mode block] [--slots 5]

Every limited step notes its interval in ``<schema>.intervals(run_id, key, worker, started,
ended)`` with the database's clock, so the test can count overlaps across processes. Limits:
``x`` (2 at a time, fleet-wide), ``k`` (1 at a time per key) and ``r`` (10 calls a second,
fleet-wide). Flow ``limited`` takes limit ``x``, flow ``keyed`` limit ``k`` keyed by its input's
``key``, flow ``rated`` limit ``r`` (its step only notes when it ran); in mode ``block`` a step sleeps
until the process is killed after noting its start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from typing import Any

import psycopg

import iterflow
from iterflow import StepLimit, define_flow

LIMITS = {"x": StepLimit(concurrency=2), "k": {"concurrency": 1, "per_key": True}, "r": StepLimit(rate="10/1s")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--core", default="python")
    parser.add_argument("--label", required=True)
    parser.add_argument("--mode", default="finish", choices=["finish", "block"])
    parser.add_argument("--slots", type=int, default=5)
    parser.add_argument("--lease", default="1s")
    parser.add_argument("--hold", type=float, default=0.3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args))


def hold(args: argparse.Namespace, run_id: str, key: str | None) -> str:
    """The limited work: note the start, hold the permit, note the end (database clock)."""
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        (row_id,) = conn.execute(
            f'INSERT INTO "{args.schema}".intervals (run_id, key, worker) VALUES (%s, %s, %s) RETURNING id',
            (run_id, key, args.label),
        ).fetchone() or (None,)
        time.sleep(600 if args.mode == "block" else args.hold)
        conn.execute(f'UPDATE "{args.schema}".intervals SET ended = clock_timestamp() WHERE id = %s', (row_id,))
    return args.label


def note(args: argparse.Namespace, run_id: str) -> str:
    """A rate-limited call: when it ran (database clock), no hold."""
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{args.schema}".intervals (run_id, key, worker, ended)'
            " VALUES (%s, NULL, %s, clock_timestamp())",
            (run_id, args.label),
        )
    return args.label


def flows(args: argparse.Namespace) -> list[iterflow.Flow]:
    @define_flow("limited")
    async def limited(ctx: iterflow.Context, _: Any) -> Any:
        run_id = ctx.run_id
        return await ctx.step("call", lambda: hold(args, run_id, None), limit="x")

    @define_flow("keyed")
    async def keyed(ctx: iterflow.Context, data: Any) -> Any:
        run_id, key = ctx.run_id, data["key"]
        return await ctx.step("call", lambda: hold(args, run_id, key), limit="k", limit_key=key)

    @define_flow("rated")
    async def rated(ctx: iterflow.Context, _: Any) -> Any:
        run_id = ctx.run_id
        return await ctx.step("call", lambda: note(args, run_id), limit="r")

    return [limited, keyed, rated]


async def serve(args: argparse.Namespace) -> None:
    engine = iterflow.create_engine(
        args.dsn, schema=args.schema, core=args.core, lease=args.lease, poll_interval=0.1,
        concurrency=args.slots, shutdown_timeout="2s", step_limits=LIMITS,
    )
    for f in flows(args):
        engine.register(f)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await engine.listen()
    print("ready", flush=True)
    await stop.wait()
    await engine.stop()


if __name__ == "__main__":
    main()
