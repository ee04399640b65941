"""A worker process for the flow-control tests (tests/test_flow_control.py).

    python limits_worker.py --dsn DSN --schema S --core python --label A [--hold 0.2] [--block]

Every flow's one step notes when it began and ended in ``<schema>.intervals(run_id, flow, key,
worker, began, ended)`` (``clock_timestamp()`` of the database, so the processes share one
clock), holding its place for ``--hold`` seconds in between; with ``--block`` the step never
ends (the test kills the process).

Flows: ``capped`` (at most 2 at once, fleet-wide), ``per-key`` (at most 1 per key; the key is
``input["k"]``) and ``keyed`` (no limit, fair claims among keys).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
import time
from typing import Any

import psycopg

import iterflow
from iterflow import Context, define_flow


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--core", default="python")
    parser.add_argument("--label", required=True)
    parser.add_argument("--hold", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--block", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args))


def note(args: argparse.Namespace, run_id: str, flow: str, key: str | None) -> None:
    """The step: its interval, written by its own connection (no engine involvement)."""
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        row = conn.execute(
            f'INSERT INTO "{args.schema}".intervals (run_id, flow, key, worker, began)'
            " VALUES (%s, %s, %s, %s, clock_timestamp()) RETURNING id",
            (run_id, flow, key, args.label),
        ).fetchone()
        assert row is not None
        if args.block:
            threading.Event().wait()
        time.sleep(args.hold)
        conn.execute(f'UPDATE "{args.schema}".intervals SET ended = clock_timestamp() WHERE id = %s', (row[0],))


def flows(args: argparse.Namespace) -> list[iterflow.Flow]:
    def body_of(name: str) -> Any:
        async def body(ctx: Context, value: Any) -> str:
            key = value.get("k") if isinstance(value, dict) else None
            await ctx.step("hold", lambda: note(args, ctx.run_id, name, key))
            return ctx.run_id
        return body

    return [
        define_flow("capped", concurrency=2)(body_of("capped")),
        define_flow("per-key", key=lambda v: v["k"], key_concurrency=1)(body_of("per-key")),
        define_flow("keyed", key=lambda v: v["k"])(body_of("keyed")),
    ]


async def serve(args: argparse.Namespace) -> None:
    engine = iterflow.create_engine(args.dsn, schema=args.schema, core=args.core, concurrency=args.concurrency,
                                    lease="1s", poll_interval="200ms")
    for flow in flows(args):
        engine.register(flow)
    await engine.listen()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await engine.stop()


if __name__ == "__main__":
    main()
