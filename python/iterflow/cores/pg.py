"""psycopg plumbing both cores use: already-encoded JSON as a parameter, rows read by column
name, and starts written on the caller's own psycopg connection.

A start with ``conn=`` (docs/guide.md §3, "FlowHandle") belongs to the
caller's transaction, so it is written through the caller's psycopg connection whichever core
the engine runs: the Rust core cannot use a Python connection. Both cores call
``insert_on_connection``, so neither imports the other.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import AsyncRawCursor, Column, RawCursor
from psycopg.types.json import Jsonb

from ..errors import SchemaMismatch
from .base import INSERT_CHUNK, Created, RunSpec, rows_json


class JsonText(Jsonb):
    """Already-encoded JSON: sent as jsonb without a second encode."""

    def __init__(self, text: str) -> None:
        super().__init__(text, dumps=lambda s: s)


class Columns:
    """Where the columns of one statement's result sit, from its ``cursor.description``: looked
    up once per result, so its rows are then read by index, with no name lookup per row and no
    reader depending on the column order of queries.sql (docs/architecture.md §5). A column the
    result lacks is SCHEMA_MISMATCH naming it and the statement."""

    def __init__(self, statement: str, description: Sequence[Column] | None) -> None:
        self._statement = statement
        self._at = {column.name: i for i, column in enumerate(description or ())}

    def _lacking(self, what: str) -> SchemaMismatch:
        return SchemaMismatch(
            f"statement `{self._statement}` returned {what} (its columns: {', '.join(self._at)})"
        )

    def at(self, name: str) -> int:
        """The position of column ``name``."""
        try:
            return self._at[name]
        except KeyError:
            raise self._lacking(f"no column `{name}`") from None

    def getter(self, *names: str) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
        """Reads the values of ``names`` from a row, in that order: one C call per row."""
        positions = [self.at(name) for name in names]
        if len(positions) == 1:  # itemgetter of one item returns the value, not a 1-tuple
            only = positions[0]
            return lambda row: (row[only],)
        return itemgetter(*positions)

    def single(self) -> None:
        """Checks that the result has exactly one column (a statement read as one value)."""
        if len(self._at) != 1:
            raise self._lacking(f"{len(self._at)} columns where one value was expected")


async def insert_async(queries: dict[str, str], cur: AsyncRawCursor[Any], specs: Sequence[RunSpec]) -> list[Created]:
    """Create runs on a caller's async cursor (chunked statements, no transaction of its own)."""
    if len(specs) > INSERT_CHUNK:
        out: list[Created] = []
        for i in range(0, len(specs), INSERT_CHUNK):
            out += await insert_async(queries, cur, specs[i:i + INSERT_CHUNK])
        return out
    await cur.execute(queries["insert_runs"], (JsonText(rows_json(specs)),))
    inserted = _inserted(cur.description, await cur.fetchall())
    missing = [i for i in range(len(specs)) if i not in inserted]
    existing: dict[int, tuple[str, str]] = {}
    if missing:
        await cur.execute(queries["find_existing_runs"], (_find_args(specs, missing),))
        existing = _existing(cur.description, await cur.fetchall())
    return _merge_created(specs, inserted, existing)


def insert_sync(queries: dict[str, str], cur: RawCursor[Any], specs: Sequence[RunSpec]) -> list[Created]:
    """``insert_async`` on a caller's blocking cursor."""
    if len(specs) > INSERT_CHUNK:
        return [c for i in range(0, len(specs), INSERT_CHUNK)
                for c in insert_sync(queries, cur, specs[i:i + INSERT_CHUNK])]
    cur.execute(queries["insert_runs"], (JsonText(rows_json(specs)),))
    inserted = _inserted(cur.description, cur.fetchall())
    missing = [i for i in range(len(specs)) if i not in inserted]
    existing: dict[int, tuple[str, str]] = {}
    if missing:
        cur.execute(queries["find_existing_runs"], (_find_args(specs, missing),))
        existing = _existing(cur.description, cur.fetchall())
    return _merge_created(specs, inserted, existing)


def _inserted(description: Sequence[Column] | None, rows: list[tuple[Any, ...]]) -> dict[int, str]:
    """``insert_runs`` rows: the id of each run it created, by its position in the batch."""
    pick = Columns("insert_runs", description).getter("ord", "id")
    return {ord_: str(id_) for ord_, id_ in map(pick, rows)}


def _existing(description: Sequence[Column] | None, rows: list[tuple[Any, ...]]) -> dict[int, tuple[str, str]]:
    """``find_existing_runs`` rows: the id and status of each run found, by its position."""
    pick = Columns("find_existing_runs", description).getter("ord", "id", "status")
    return {ord_: (str(id_), status) for ord_, id_, status in map(pick, rows)}


def _find_args(specs: Sequence[RunSpec], missing: Sequence[int]) -> JsonText:
    return JsonText(json.dumps([
        {"ord": i, "id": specs[i].id, "name": specs[i].name, "version": specs[i].version,
         "idempotency_key": specs[i].idempotency_key, "parent_id": specs[i].parent_id,
         "parent_key": specs[i].parent_key}
        for i in missing
    ]))


def _merge_created(
    specs: Sequence[RunSpec], inserted: dict[int, str], existing: dict[int, tuple[str, str]]
) -> list[Created]:
    out = []
    for i in range(len(specs)):
        if i in inserted:
            out.append(Created(inserted[i], "pending", True))
        else:
            run_id, status = existing[i]
            # found by its own id: a start repeated after its commit landed unacknowledged
            out.append(Created(run_id, status, run_id == specs[i].id))
    return out


async def insert_on_connection(queries: dict[str, str], conn: Any, specs: Sequence[RunSpec]) -> list[Created]:
    """Create runs inside the caller's open transaction on ``conn`` (a psycopg ``Connection`` or
    ``AsyncConnection``): nothing is committed or notified here, the caller's commit decides."""
    if isinstance(conn, psycopg.Connection):
        return await asyncio.to_thread(insert_sync, queries, RawCursor(conn), specs)
    return await insert_async(queries, AsyncRawCursor(conn), specs)
