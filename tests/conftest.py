"""Shared fixtures: a real PostgreSQL (``$DATABASE_URL`` or the embedded one) and a fresh
schema per test, dropped afterwards.

With ``ITERFLOW_VIA_PGBOUNCER=1`` every engine ``make_engine`` builds goes through a real
PgBouncer in transaction mode (``dsn`` the pooler, ``listen_dsn`` the server itself,
``prepared_statements=False``), as docs/operations.md ("Behind PgBouncer") prescribes;
migrations and the tests' own checks still connect directly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from tests import pgbouncer as bouncer_helper
from tests.engines import engine_builder

import iterflow
from iterflow import Engine
from iterflow.embedded import database_url

VIA_PGBOUNCER = os.environ.get("ITERFLOW_VIA_PGBOUNCER", "") == "1"
# ITERFLOW_STICKY=0 or 1: every engine make_engine builds has the sticky cache off or on
# (docs/replay.md, "Sticky execution"); unset: the engine default (on).
STICKY = os.environ.get("ITERFLOW_STICKY")


@pytest.fixture(scope="session")
def dsn() -> str:
    """The DSN of the test database: ``$DATABASE_URL``, else the embedded server."""
    return database_url()


@pytest.fixture(scope="session")
def pgbouncer(dsn: str) -> Iterator[bouncer_helper.Bouncer]:
    """A pgbouncer (transaction mode) in front of the test database, for the whole session;
    skips the test where pgbouncer cannot run (see ``unusable``)."""
    reason = bouncer_helper.unusable(dsn)
    if reason is not None:
        pytest.skip(reason)
    bouncer = bouncer_helper.start(dsn)
    yield bouncer
    bouncer.stop()


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
    dsn: str, schema_name: str, core: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Awaitable[Engine]]]:
    """Build engines on the test's schema (migrated once) and the parametrized core; all are
    stopped at teardown. ``listen=False`` gives a client-only engine. Through pgbouncer when
    ``ITERFLOW_VIA_PGBOUNCER=1`` (see the module docstring)."""
    await iterflow.migrate(dsn, schema_name)
    engine_dsn, defaults = dsn, {"poll_interval": 0.2}
    if STICKY is not None:  # the whole suite runs with the sticky cache off (0) or on (1)
        defaults["sticky_cache"] = 0 if STICKY == "0" else 1000
    if VIA_PGBOUNCER:
        engine_dsn = request.getfixturevalue("pgbouncer").dsn
        defaults.update(listen_dsn=dsn, prepared_statements=False)
    async with engine_builder(engine_dsn, schema_name, core, **defaults) as build:
        yield build
