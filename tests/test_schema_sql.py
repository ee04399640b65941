"""sql/schema.sql is the schema the migrations build: both applied to fresh schemas, their
catalogs must be identical (docs/architecture.md, "Database")."""

from __future__ import annotations

import re
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql as pgsql

import iterflow
from iterflow import sql

# One query per kind of catalog object, each returning comparable rows for schema %(s)s. Text
# that names the schema (defaults, index and function definitions) is normalised afterwards.
CATALOG: dict[str, str] = {
    "relations": """
        SELECT c.relname, c.relkind, c.reloptions, c.relpersistence
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %(s)s ORDER BY c.relname""",
    "columns": """
        SELECT table_name, ordinal_position, column_name, data_type, udt_name, is_nullable,
               column_default, is_identity, is_generated
          FROM information_schema.columns
         WHERE table_schema = %(s)s ORDER BY table_name, ordinal_position""",
    "constraints": """
        SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid)
          FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
         WHERE n.nspname = %(s)s ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
         WHERE schemaname = %(s)s ORDER BY tablename, indexname""",
    "sequences": """
        SELECT sequencename, data_type, start_value, min_value, max_value, increment_by,
               cycle, cache_size
          FROM pg_sequences WHERE schemaname = %(s)s ORDER BY sequencename""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = %(s)s ORDER BY 1, 2""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = %(s)s AND NOT t.tgisinternal ORDER BY 1, 2""",
}


def catalog(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every table, column, constraint, index, sequence, function and trigger of ``schema``, with the
    schema's own name replaced by ``{schema}`` so two schemas compare."""

    def norm(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(f'"{schema}"', "{schema}").replace(schema, "{schema}")
        return value

    return {
        kind: [tuple(norm(v) for v in row) for row in conn.execute(query, {"s": schema}).fetchall()]
        for kind, query in CATALOG.items()
    }


def apply_schema_sql(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(sql.render_migration(sql.schema_sql(), schema).encode())


def differences(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> list[str]:
    """What differs, one line per catalog row found on one side only."""
    out = []
    for kind in CATALOG:
        out += [f"{kind}: only after the migrations: {row}" for row in a[kind] if row not in b[kind]]
        out += [f"{kind}: only in schema.sql: {row}" for row in b[kind] if row not in a[kind]]
    return out


@pytest.fixture
def other_schema(dsn: str) -> Any:
    """A second fresh schema name, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(pgsql.Identifier(name)))


async def test_schema_sql_is_what_the_migrations_build(dsn, schema_name, other_schema):
    await iterflow.migrate(dsn, schema_name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_schema_sql(conn, other_schema)
        migrated, pictured = catalog(conn, schema_name), catalog(conn, other_schema)
    assert all(migrated[kind] for kind in ("relations", "columns", "indexes", "functions"))
    assert differences(migrated, pictured) == []


def test_schema_sql_states_the_latest_version():
    stated = re.search(r"^-- The iterflow schema as it is now \(version (\d+)\)", sql.schema_sql())
    assert stated is not None
    assert int(stated.group(1)) == sql.latest_version()


# Small drifts of one side; the comparison must see each.
DRIFTS = {
    "extra index": "CREATE INDEX extra ON {schema}.runs (name)",
    "column default": "ALTER TABLE {schema}.crons ALTER COLUMN overlap SET DEFAULT 'allow'",
    "nullability": "ALTER TABLE {schema}.events ALTER COLUMN data SET NOT NULL",
    "storage option": "ALTER TABLE {schema}.queue SET (fillfactor = 60)",
    "constraint": "ALTER TABLE {schema}.watches ADD CHECK (expires_at > '2000-01-01')",
    "function body": """CREATE OR REPLACE FUNCTION {schema}.wakeup(p_payload text) RETURNS void
                        LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_notify('x', p_payload); END $$""",
    "extra function": "CREATE FUNCTION {schema}.extra() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
    "trigger condition": """CREATE OR REPLACE TRIGGER limited_lease_deleted AFTER DELETE ON {schema}.queue
                            FOR EACH ROW WHEN (OLD.limited)
                            EXECUTE FUNCTION {schema}.limited_lease_ended()""",
}


@pytest.mark.parametrize("drift", DRIFTS)
def test_the_comparison_sees_drift(dsn, schema_name, other_schema, drift):
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_schema_sql(conn, schema_name)
        apply_schema_sql(conn, other_schema)
        assert differences(catalog(conn, schema_name), catalog(conn, other_schema)) == []
        conn.execute(sql.render_migration(DRIFTS[drift], other_schema).encode())
        assert differences(catalog(conn, schema_name), catalog(conn, other_schema)) != []


def test_an_entry_sends_its_statement_without_its_leading_comments():
    queries = sql.queries("wf")
    assert queries["batch_begin"] == (
        "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off"
    )
    assert queries["listen"] == 'LISTEN "iterflow.wf"'
    assert not any(text.lstrip().startswith("--") for text in queries.values())
