"""Shared fixtures: a real PostgreSQL (``$DATABASE_URL`` or the embedded one) and a fresh
schema per test, dropped afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

import iterflow
from iterflow import Engine, Flow, create_engine
from iterflow.embedded import database_url


@pytest.fixture(scope="session")
def dsn() -> str:
    """The DSN of the test database: ``$DATABASE_URL``, else the embedded server."""
    return database_url()


@pytest.fixture
def schema_name(dsn: str) -> Iterator[str]:
    """A unique schema name (``t_<8 hex>``) for one test; dropped with CASCADE afterwards."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _cores() -> list[str]:
    """Cores under test: ``$ITERFLOW_CORES`` (comma list), default every core that imports."""
    configured = os.environ.get("ITERFLOW_CORES")
    if configured:
        return [c.strip() for c in configured.split(",") if c.strip()]
    try:
        import iterflow.cores.rust  # noqa: F401
    except ImportError:
        return ["python"]
    return ["python", "rust"]


@pytest.fixture(params=_cores())
def core(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_engine(
    dsn: str, schema_name: str, core: str
) -> AsyncIterator[Callable[..., Awaitable[Engine]]]:
    """Build engines on the test's schema (migrated once) and the parametrized core; all are
    stopped at teardown. ``listen=False`` gives a client-only engine."""
    await iterflow.migrate(dsn, schema_name)
    engines: list[Engine] = []

    async def build(*flows: Flow, listen: bool = True, **options: Any) -> Engine:
        options.setdefault("poll_interval", 0.2)
        engine = create_engine(dsn, schema=schema_name, core=core, **options)
        for f in flows:
            engine.register(f)
        engines.append(engine)
        if listen:
            await engine.listen()
        return engine

    yield build
    for engine in reversed(engines):
        await engine.stop()
