"""Applying the schema and checking the database is not behind the engine."""

from __future__ import annotations

from typing import Any

import psycopg

from . import sql
from .errors import SchemaMismatch


async def migrate(dsn: str, schema: str = "workflow") -> int:
    """Apply every migration (idempotent); returns the schema version now in the database.

    Runs under an advisory lock so a fleet starting at once applies each migration once.
    """
    sql.validate_schema_name(schema)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=False) as conn:
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"iterflow.migrate.{schema}",))
        for _version, text in sql.migrations():
            await conn.execute(sql.render_migration(text, schema).encode())
        await conn.commit()
    return sql.latest_version()


def schema_mismatch_message(schema: str, found: int) -> str:
    need = sql.latest_version()
    state = "does not exist" if found == 0 else f"is at version {found}"
    return (
        f"iterflow schema {schema!r} {state}; this engine needs version {need}. "
        f"Run `iterflow migrate --schema {schema}` (or `await iterflow.migrate(dsn, schema={schema!r})`)."
    )


async def check_schema(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    """Raise SCHEMA_MISMATCH, with the command that fixes it, if the schema is missing or old."""
    exists = await (
        await conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}".schema_version',))
    ).fetchone()
    found = 0
    if exists and exists[0]:
        row = await (await conn.execute(sql.queries(schema)["schema_version"].encode())).fetchone()
        found = int(row[0]) if row else 0
    if found < sql.latest_version():
        raise SchemaMismatch(schema_mismatch_message(schema, found))
