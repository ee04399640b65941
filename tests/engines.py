"""Engines for a test: built on its schema and core, all stopped at teardown (shared by the
``make_engine`` fixture and the pgbouncer tests' ``pooled`` one)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from iterflow import Engine, Flow, create_engine

Build = Callable[..., Awaitable[Engine]]


@contextlib.asynccontextmanager
async def engine_builder(engine_dsn: str, schema: str, core: str, **defaults: Any) -> AsyncIterator[Build]:
    """``build(*flows, listen=True, **options)``: an engine with ``defaults`` under ``options``;
    ``listen=False`` gives a client-only engine."""
    engines: list[Engine] = []

    async def build(*flows: Flow, listen: bool = True, **options: Any) -> Engine:
        engine = create_engine(engine_dsn, schema=schema, core=core, **{**defaults, **options})
        for f in flows:
            engine.register(f)
        engines.append(engine)
        if listen:
            await engine.listen()
        return engine

    try:
        yield build
    finally:
        for engine in reversed(engines):
            await engine.stop()
