"""A worker process for the chaos suite (``benches/chaos.py``): registers the chaos flows and
serves them with ``engine.listen()`` until it is killed (SIGKILL) or stopped (SIGTERM).

    python -m benches.chaos_worker --dsn DSN --schema S --core rust --label A [--concurrency 8] [--lease 30s]
                                   [--step-ms 50]

Every step body appends one row to ``public.chaos_effects(run_id, step, at, exec_id, worker)``
on a plain psycopg connection of its own, so the suite can count how many times each step body
really ran, whatever happened to the processes and the server. The write is retried (on a fresh
connection) for up to ``EFFECT_RETRY_S``: a step body of this harness must not fail because the
fault under test also hit the harness's own side-effect connection. ``exec_id`` makes the retry
idempotent (an INSERT whose commit was acknowledged to nobody is not counted twice).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
import uuid
from typing import Any

import psycopg

import iterflow
from iterflow import Context, define_flow

EFFECT_RETRY_S = 90.0
EFFECTS_APP = "chaos-effects"


class Effects:
    """One async connection per worker process for the side-effect rows, reconnected on failure."""

    def __init__(self, dsn: str, label: str) -> None:
        self.dsn, self.label = dsn, label
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.lock = asyncio.Lock()

    async def record(self, run_id: str, step: str) -> None:
        exec_id = uuid.uuid4()
        deadline = time.monotonic() + EFFECT_RETRY_S
        delay = 0.05
        while True:
            try:
                async with self.lock:
                    conn = await self._connection()
                    await conn.execute(
                        "INSERT INTO public.chaos_effects (run_id, step, exec_id, worker)"
                        " VALUES (%s, %s, %s, %s) ON CONFLICT (exec_id) DO NOTHING",
                        (run_id, step, exec_id, self.label),
                    )
                return
            except psycopg.Error as exc:
                await self._drop()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"chaos harness: side-effect write gave up: {exc!r}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None or self.conn.closed:
            self.conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, application_name=f"{EFFECTS_APP}-{self.label}", connect_timeout=5
            )
        return self.conn

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                await conn.close()
            except psycopg.Error:
                pass


def step_value(step: str, i: int) -> str:
    """What step ``step`` of run ``i`` returns (the suite checks the outputs against it)."""
    return f"{step}:{i}"


def flows(effects: Effects, step_s: float) -> list[iterflow.Flow]:
    def body(ctx: Context, step: str, i: int) -> Any:
        async def run() -> str:
            await effects.record(ctx.run_id, step)
            await asyncio.sleep(step_s)  # the step's "work": a fault can land inside it
            return step_value(step, i)

        return run

    @define_flow("chaos_three")
    async def three(ctx: Context, inp: dict[str, Any]) -> dict[str, Any]:
        i, sleepy = inp["i"], inp["sleep"]
        out = []
        for n, step in enumerate(("s0", "s1", "s2")):
            if sleepy and n:
                await ctx.sleep("200ms")
            out.append(await ctx.step(step, body(ctx, step, i)))
        return {"i": i, "steps": out}

    @define_flow("chaos_signal")
    async def waiter(ctx: Context, inp: dict[str, Any]) -> dict[str, Any]:
        i = inp["i"]
        out = [await ctx.step("s0", body(ctx, "s0", i))]
        got = await ctx.signal("go")
        for step in ("s1", "s2"):
            out.append(await ctx.step(step, body(ctx, step, i)))
        return {"i": i, "steps": out, "signal": got}

    @define_flow("chaos_long")
    async def long(ctx: Context, inp: dict[str, Any]) -> dict[str, Any]:
        """A long-lived run: ``n`` iterations of a step and a durable 1 ms sleep (each sleep
        suspends the run; the next execution replays a history that grows by two records)."""
        i, n = inp["i"], inp["n"]
        out = []
        for k in range(n):
            out.append(await ctx.step(f"s{k}", body(ctx, f"s{k}", i)))
            await ctx.sleep("1ms")
        return {"i": i, "steps": out}

    return [three, waiter, long]


async def serve(args: argparse.Namespace) -> None:
    effects = Effects(args.dsn, args.label)
    engine = iterflow.create_engine(
        args.dsn, schema=args.schema, core=args.core, concurrency=args.concurrency, lease=args.lease,
        shutdown_timeout="3s",
    )
    for f in flows(effects, args.step_ms / 1000):
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--core", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--lease", default="30s")
    parser.add_argument("--step-ms", type=int, default=50, help="how long each step body works after its effect")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
