"""A worker process for the crash tests (tests/test_crash.py); the tests kill it with SIGKILL,
freeze it, or let it crash itself.

    python crash_worker.py --dsn DSN --schema S --core python --mode MODE --label A [--lease 1s]

Side effects go to ``<schema>.effects(run_id, what, worker)`` so the test can count how often
each step body really ran, whatever happened to the process.

Modes (what step ``two`` of flow ``memo`` does after recording its side effect):
- ``block``: sleeps in its thread until the process is killed;
- ``finish``: returns ``{"by": label}``;
- ``stall``: blocks the event loop (so leases stop renewing) until the test inserts a
  ``release-<label>`` row into ``<schema>.flags``, records a ``late`` side effect, then returns;
- ``gate``: like ``stall`` but waits in its thread, so the worker keeps renewing its lease;
- ``die``: flow ``poison``'s only step records a side effect, then ``os._exit(3)``.

Flow ``relay`` (input n) records a ``relay-<n>`` side effect in its step, then continues as new
once (n = 0 -> 1); in ``gate`` mode the step of run 0 waits for ``release-<label>`` first.

Flow ``filed`` notes its two steps' side effects in ``--effects-file`` instead (``block`` makes
its step ``two`` sleep until the process is killed), for tests that crash the database server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

import psycopg

import iterflow
from iterflow import define_flow


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--core", default="python")
    parser.add_argument("--mode", required=True, choices=["block", "finish", "stall", "gate", "die"])
    parser.add_argument("--label", required=True)
    parser.add_argument("--lease", default="1s")
    parser.add_argument("--max-run-attempts", type=int, default=100)
    parser.add_argument("--effects-file", default=os.devnull, help="where flow `filed` notes its side effects")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args))


def effect(dsn: str, schema: str, run_id: str, what: str, worker: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f'INSERT INTO "{schema}".effects (run_id, what, worker) VALUES (%s, %s, %s)',
            (run_id, what, worker),
        )


def released(dsn: str, schema: str, label: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            f'SELECT count(*) FROM "{schema}".flags WHERE name = %s', (f"release-{label}",)
        ).fetchone()
        return bool(row and row[0])


def flows(args: argparse.Namespace) -> list[iterflow.Flow]:
    dsn, schema, label, mode = args.dsn, args.schema, args.label, args.mode

    @define_flow("memo")
    async def memo(ctx: iterflow.Context, _: Any) -> Any:
        run_id = ctx.run_id

        def one() -> str:
            effect(dsn, schema, run_id, "one", label)
            return f"one by {label}"

        def two_sync() -> dict[str, str]:
            effect(dsn, schema, run_id, "two", label)
            if mode == "block":
                time.sleep(600)
            if mode == "gate":
                while not released(dsn, schema, label):
                    time.sleep(0.05)
                effect(dsn, schema, run_id, "late", label)
            return {"by": label}

        async def two_stall() -> dict[str, str]:
            effect(dsn, schema, run_id, "two", label)
            while not released(dsn, schema, label):  # blocks the loop on purpose: no lease renewal
                time.sleep(0.05)
            effect(dsn, schema, run_id, "late", label)
            return {"by": label}

        first = await ctx.step("one", one)
        second = await ctx.step("two", two_stall if mode == "stall" else two_sync)
        return {"one": first, "two": second, "finisher": label}

    @define_flow("filed")
    async def filed(ctx: iterflow.Context, _: Any) -> Any:
        # side effects go to a file, not the database: a durable INSERT would flush the WAL and
        # with it every write before it, hiding a write that was acknowledged before its flush
        def note(what: str) -> str:
            with open(args.effects_file, "a", encoding="utf-8") as fh:
                fh.write(f"{what} {label}\n")
            return f"{what} by {label}"

        def two() -> str:
            done = note("two")
            if mode == "block":
                time.sleep(600)
            return done

        first = await ctx.step("one", lambda: note("one"))
        return {"one": first, "two": await ctx.step("two", two)}

    @define_flow("poison")
    async def poison(ctx: iterflow.Context, _: Any) -> Any:
        run_id = ctx.run_id

        def crash() -> None:
            effect(dsn, schema, run_id, "poison", label)
            if mode == "die":
                os._exit(3)

        await ctx.step("crash", crash)
        return "survived"

    @define_flow("relay")
    async def relay(ctx: iterflow.Context, n: int) -> Any:
        run_id = ctx.run_id

        def mark() -> int:
            effect(dsn, schema, run_id, f"relay-{n}", label)
            while mode == "gate" and n == 0 and not released(dsn, schema, label):
                time.sleep(0.05)
            return n

        await ctx.step("mark", mark)
        if n == 0:
            ctx.continue_as_new(1)
        return {"n": n, "by": label}

    return [memo, filed, poison, relay]


async def serve(args: argparse.Namespace) -> None:
    engine = iterflow.create_engine(
        args.dsn,
        schema=args.schema,
        core=args.core,
        lease=args.lease,
        poll_interval=0.1,
        max_run_attempts=args.max_run_attempts,
        shutdown_timeout="5s",
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
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
