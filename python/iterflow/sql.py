"""The SQL both cores send, loaded once from ``sql/queries.sql`` and the migrations.

Keeping the text in ``.sql`` files (not Python strings) lets the Rust core embed the very same
statements; the schema name is the only thing formatted in, and only after validation. The
migrations are how a database gets the schema; ``sql/schema.sql`` is the same schema as one
file to read, kept equal to them by ``tests/test_schema_sql.py`` (docs/architecture.md).
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

from .errors import InvalidArgument

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_LEADING_COMMENTS = re.compile(r"\A(?:[ \t]*--[^\n]*(?:\n|\Z))*")


def validate_schema_name(schema: str) -> str:
    """Accept only plain lower-case identifiers so the name is safe in SQL, channels and locks."""
    if not isinstance(schema, str) or not _IDENT.fullmatch(schema):
        raise InvalidArgument(
            "schema", f"{schema!r} is not a valid schema name (lower-case letters, digits, _; max 63)"
        )
    return schema


def _render(text: str, schema: str) -> str:
    return text.replace("{schema_raw}", schema).replace("{schema}", f'"{schema}"')


def _statement(body: str) -> str:
    """An entry's text without its leading comment lines: they document the entry for readers
    of queries.sql; the server gets the statement alone (as ``queries.rs`` does)."""
    return _LEADING_COMMENTS.sub("", body.strip()).strip()


@lru_cache(maxsize=1)
def _raw_queries() -> dict[str, str]:
    text = (resources.files("iterflow") / "sql" / "queries.sql").read_text(encoding="utf-8")
    parts = _HEADER.split(text)
    return {name: _statement(body) for name, body in zip(parts[1::2], parts[2::2], strict=True)}


@lru_cache(maxsize=16)
def queries(schema: str) -> dict[str, str]:
    """Every named statement, rendered for ``schema``."""
    validate_schema_name(schema)
    return {name: _render(body, schema) for name, body in _raw_queries().items()}


def migrations() -> list[tuple[int, str]]:
    """(version, raw text) of every migration file, in order."""
    folder = resources.files("iterflow") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = re.match(r"^(\d+)_.*\.sql$", entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    return sorted(found)


def render_migration(text: str, schema: str) -> str:
    return _render(text, validate_schema_name(schema))


def schema_sql() -> str:
    """The raw text of ``sql/schema.sql``: the schema the migrations build, as one file."""
    return (resources.files("iterflow") / "sql" / "schema.sql").read_text(encoding="utf-8")


def latest_version() -> int:
    return migrations()[-1][0]

