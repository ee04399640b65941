"""Applying the schema and checking the database is not behind the engine."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import AsyncRawCursor
from psycopg.conninfo import conninfo_to_dict

from . import sql
from .durations import DurationLike, parse_duration
from .errors import InvalidArgument, SchemaMismatch
from .faults import RetryPolicy, retrying


async def migrate(dsn: str, schema: str = "workflow", *, database_retry_timeout: DurationLike = "30s") -> int:
    """Apply every migration (idempotent); returns the schema version now in the database.

    Runs under an advisory lock so a fleet starting at once applies each migration once. It is
    one transaction, so a database fault (a server still starting, a dropped connection) is
    retried like any engine call, for up to ``database_retry_timeout``, then raised as
    ``DatabaseUnavailable``; a refused statement is a ``DatabaseError``.
    """
    sql.validate_schema_name(schema)
    try:  # a malformed DSN is the caller's mistake, not a fault to retry
        conninfo_to_dict(dsn)
    except (psycopg.ProgrammingError, TypeError) as exc:
        raise InvalidArgument("dsn", f"not a valid PostgreSQL DSN: {exc}") from None
    timeout = parse_duration(database_retry_timeout, field="database_retry_timeout").total_seconds()
    await retrying(lambda: _apply(dsn, schema), RetryPolicy(timeout=timeout), "migrate")
    return sql.latest_version()


async def _apply(dsn: str, schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=False) as conn:
        await AsyncRawCursor(conn).execute(sql.queries(schema)["migrate_lock"], (f"iterflow.migrate.{schema}",))
        for _version, text in sql.migrations():
            await conn.execute(sql.render_migration(text, schema).encode())
        await conn.commit()


def schema_mismatch_message(schema: str, found: int) -> str:
    need = sql.latest_version()
    state = "does not exist" if found == 0 else f"is at version {found}"
    return (
        f"iterflow schema {schema!r} {state}; this engine needs version {need}. "
        f"Run `iterflow migrate --schema {schema}` (or `await iterflow.migrate(dsn, schema={schema!r})`)."
    )


async def check_schema(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    """Raise SCHEMA_MISMATCH, with the command that fixes it, if the schema is missing or old."""
    queries = sql.queries(schema)
    cur = AsyncRawCursor(conn)
    exists = await (await cur.execute(queries["schema_exists"], (f'"{schema}".schema_version',))).fetchone()
    found = 0
    if exists and exists[0]:
        row = await (await cur.execute(queries["schema_version"])).fetchone()
        found = int(row[0]) if row else 0
    if found < sql.latest_version():
        raise SchemaMismatch(schema_mismatch_message(schema, found))
