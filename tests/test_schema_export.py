"""generate-schema: the SQLAlchemy module matches what the migrations create, column by column."""

from __future__ import annotations

import psycopg
import pytest

import iterflow
from iterflow import schema_export


async def test_sqlalchemy_module_matches_migrated_database(dsn, schema_name):
    pytest.importorskip("sqlalchemy")
    await iterflow.migrate(dsn, schema_name)
    namespace: dict[str, object] = {}
    exec(compile(schema_export.sqlalchemy_module(schema_name, "test"), "generated.py", "exec"), namespace)
    metadata = namespace["metadata"]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name, is_nullable = 'YES' FROM information_schema.columns "
            "WHERE table_schema = %s", (schema_name,),
        ).fetchall()
        keys = conn.execute(
            "SELECT tc.table_name, kcu.column_name FROM information_schema.table_constraints tc "
            "JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name) "
            "WHERE tc.table_schema = %s AND tc.constraint_type = 'PRIMARY KEY'", (schema_name,),
        ).fetchall()
    in_db = {(t, c): nullable for t, c, nullable in rows}
    in_module = {
        (table.name, column.name): column.nullable and not column.primary_key
        for table in metadata.tables.values() for column in table.columns
    }
    assert in_module == in_db
    assert {(t.name, c.name) for t in metadata.tables.values() for c in t.primary_key} == set(keys)
    assert all(t.schema == schema_name for t in metadata.tables.values())


async def test_sql_script_is_the_migrations(dsn, schema_name):
    script = schema_export.sql_script(schema_name)
    assert f'CREATE TABLE IF NOT EXISTS "{schema_name}".runs' in script
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(script.encode())
    with psycopg.connect(dsn) as conn:
        assert conn.execute(f'SELECT max(version) FROM "{schema_name}".schema_version').fetchone() == (
            iterflow.sql.latest_version(),
        )
