"""``embedded.database_url``: the one DSN resolution of the CLI, the demo, the tests and the benchmarks."""

from __future__ import annotations

import pytest

from iterflow import IterflowError, embedded
from iterflow.errors import Code


def test_an_explicit_dsn_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://env/db")
    assert embedded.database_url("postgresql://given/db") == "postgresql://given/db"
    assert embedded.database_url() == "postgresql://env/db"


def test_no_database_at_all_is_one_error_with_a_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pgserver the embedded server cannot start: an IterflowError that is still the
    ImportError of a missing optional dependency, saying both ways out."""
    monkeypatch.delenv("DATABASE_URL", raising=False)

    def missing() -> str:
        raise ImportError("No module named 'pgserver'")

    monkeypatch.setattr(embedded, "embedded_url", missing)
    announced: list[str] = []
    with pytest.raises(ImportError) as info:
        embedded.database_url(None, announce=announced.append)
    assert isinstance(info.value, IterflowError)
    assert info.value.code == Code.DATABASE_UNAVAILABLE
    assert "pgserver" in info.value.message and "DATABASE_URL" in info.value.message
    assert announced == []


def test_the_embedded_server_is_announced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setattr(embedded, "embedded_url", lambda: "postgresql://embedded/db")
    announced: list[str] = []
    assert embedded.database_url(announce=announced.append) == "postgresql://embedded/db"
    assert announced == ["using embedded Postgres at postgresql://embedded/db"]
