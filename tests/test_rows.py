"""The pure-Python core reads statement results by column name (docs/architecture.md §5): the
positions come from the result's description, not from the column order of queries.sql."""

from __future__ import annotations

import psycopg
import pytest

from iterflow.cores.pg import Columns
from iterflow.errors import Code, SchemaMismatch


async def _description(dsn: str, select: str) -> list[psycopg.Column]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(select)
        assert cur.description is not None
        return list(cur.description)


async def test_columns_are_read_by_name_in_the_order_asked(dsn: str) -> None:
    columns = Columns("probe", await _description(dsn, "SELECT 1 AS b, 2 AS a, 3 AS c"))
    row = (1, 2, 3)
    assert columns.getter("a", "b")(row) == (2, 1)
    assert columns.getter("c")(row) == (3,)
    assert columns.at("c") == 2


async def test_a_missing_column_names_itself_and_the_statement(dsn: str) -> None:
    columns = Columns("probe", await _description(dsn, "SELECT 1 AS b, 2 AS a"))
    with pytest.raises(SchemaMismatch) as caught:
        columns.getter("a", "status")
    assert caught.value.code == Code.SCHEMA_MISMATCH
    assert "`probe`" in str(caught.value) and "`status`" in str(caught.value)
    with pytest.raises(SchemaMismatch, match="2 columns where one value was expected"):
        columns.single()
