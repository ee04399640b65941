"""A worker process that holds suspended runs in its sticky cache, for the kill -9 test of
tests/test_sticky.py.

    python sticky_worker.py --dsn DSN --schema S --core python --label A

Flow ``napper`` runs step ``a``, sleeps ``input["for"]``, then step ``b``, which answers the
label of the worker that ran it; flow ``asker`` does the same around a wait for signal
``go``. The process prints ``listening`` once it claims, then serves
until it is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import iterflow
from iterflow import define_flow


def napper(label: str) -> iterflow.Flow:
    @define_flow("napper")
    async def body(ctx: iterflow.Context, inp: Any) -> Any:
        await ctx.step("a", lambda: label)
        await ctx.sleep(inp["for"])
        return await ctx.step("b", lambda: label)

    return body


def asker(label: str) -> iterflow.Flow:
    @define_flow("asker")
    async def body(ctx: iterflow.Context, _: Any) -> Any:
        await ctx.step("a", lambda: label)
        await ctx.signal("go")
        return await ctx.step("b", lambda: label)

    return body


async def serve(args: argparse.Namespace) -> None:
    engine = iterflow.create_engine(args.dsn, schema=args.schema, core=args.core, poll_interval=0.1,
                                    sticky_window=args.window)
    engine.register(napper(args.label))
    engine.register(asker(args.label))
    await engine.listen()
    print("listening", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--core", default="python")
    parser.add_argument("--label", required=True)
    parser.add_argument("--window", default="1s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
