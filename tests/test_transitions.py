"""A run's finish has two forms in SQL: ``finish_run`` for one run (the latency path: every
finish of the pure-Python core, and the Rust core's rarer ones) and ``finish_runs`` for a batch
(the Rust writer's group commit). What follows a finish is shared (``finish_consequences``);
the fencing and the row changes are written in each form. These tests put real runs in every
case a finish meets and require both forms to answer and leave the rows alike
(docs/architecture.md, "Database")."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql as pgsql

import iterflow

Snapshot = dict[str, Any]


@pytest.fixture
def conn(dsn: str, schema_name: str) -> Iterator[psycopg.Connection[Any]]:
    import asyncio

    asyncio.run(iterflow.migrate(dsn, schema_name))
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(pgsql.SQL("SET search_path = {}").format(pgsql.Identifier(schema_name)))
        yield c


def _run(c: psycopg.Connection[Any], status: str, *, parent: uuid.UUID | None = None) -> uuid.UUID:
    rid = uuid.uuid4()
    c.execute(
        "INSERT INTO runs (id, name, version, status, input, parent_id, parent_key)"
        " VALUES (%s, 'f', 1, %s, 'null', %s, %s)",
        (rid, status, parent, None if parent is None else str(rid)),
    )
    return rid


def _queue(c: psycopg.Connection[Any], rid: uuid.UUID, *, leased: bool) -> int | None:
    row = c.execute(
        "INSERT INTO queue (run_id, flow_name, ready_at, lease_owner, lease_token, lease_until)"
        " VALUES (%s, 'f', now(), %s, CASE WHEN %s THEN nextval('lease_tokens') END,"
        "         CASE WHEN %s THEN now() + interval '1 minute' END)"
        " RETURNING lease_token",
        (rid, "w" if leased else None, leased, leased),
    ).fetchone()
    return None if row is None else row[0]


# Each case builds its runs and returns (the run to finish, the token to pass, the status,
# and the other runs whose rows the finish may change, by role).
Case = Callable[[psycopg.Connection[Any]], tuple[uuid.UUID, int | None, str, dict[str, uuid.UUID]]]


def _leased(c: psycopg.Connection[Any]) -> tuple[uuid.UUID, int | None, str, dict[str, uuid.UUID]]:
    rid = _run(c, "running")
    return rid, _queue(c, rid, leased=True), "done", {}


def _stale_token(c: psycopg.Connection[Any]) -> tuple[uuid.UUID, int | None, str, dict[str, uuid.UUID]]:
    rid = _run(c, "running")
    token = _queue(c, rid, leased=True)
    assert token is not None
    return rid, token + 1_000_000, "done", {}


def _lease_gone(c: psycopg.Connection[Any]) -> tuple[uuid.UUID, int | None, str, dict[str, uuid.UUID]]:
    rid = _run(c, "sleeping")  # its lease was swept and the run re-queued, unleased
    _queue(c, rid, leased=False)
    return rid, 12345, "done", {}


def _no_token_queued(c: psycopg.Connection[Any]) -> tuple[uuid.UUID, int | None, str, dict[str, uuid.UUID]]:
    rid = _run(c, "sleeping")
    _queue(c, rid, leased=False)
    return rid, None, "canceled", {}


def _no_token_unqueued(c: psycopg.Connection[Any]) -> tuple[uuid.UUID, int | None, str, dict[str, uuid.UUID]]:
    return _run(c, "awaiting_signal"), None, "canceled", {}


def _terminal(c: psycopg.Connection[Any]) -> tuple[uuid.UUID, int | None, str, dict[str, uuid.UUID]]:
    return _run(c, "done"), None, "failed", {}


def _failed_with_children(c: psycopg.Connection[Any]) -> tuple[uuid.UUID, int | None, str, dict[str, uuid.UUID]]:
    rid = _run(c, "running")
    token = _queue(c, rid, leased=True)
    waiting = _run(c, "sleeping", parent=rid)
    _queue(c, waiting, leased=False)
    finished = _run(c, "done", parent=rid)
    return rid, token, "failed", {"live child": waiting, "finished child": finished}


def _child_with_parent(c: psycopg.Connection[Any]) -> tuple[uuid.UUID, int | None, str, dict[str, uuid.UUID]]:
    parent = _run(c, "awaiting_child")
    rid = _run(c, "running", parent=parent)
    return rid, _queue(c, rid, leased=True), "done", {"parent": parent}


CASES: dict[str, Case] = {
    "leased, own token": _leased,
    "a stale token": _stale_token,
    "lease swept, run re-queued": _lease_gone,
    "no token, queued": _no_token_queued,
    "no token, not queued": _no_token_unqueued,
    "already terminal": _terminal,
    "failed with children": _failed_with_children,
    "child of a waiting parent": _child_with_parent,
}


def _snapshot(c: psycopg.Connection[Any], roles: dict[str, uuid.UUID]) -> Snapshot:
    out: Snapshot = {}
    for role, rid in roles.items():
        run = c.execute(
            "SELECT status, output, error, waiting, finished_at IS NOT NULL, cancel_reason"
            "  FROM runs WHERE id = %s", (rid,)).fetchone()
        queued = c.execute("SELECT woken, lease_token IS NOT NULL FROM queue WHERE run_id = %s", (rid,)).fetchone()
        out[role] = (run, queued)
    return out


def _finish_one(c: psycopg.Connection[Any], rid: uuid.UUID, token: int | None, status: str) -> bool:
    error = None if status == "done" else '{"code": "X", "message": "boom"}'
    row = c.execute("SELECT finish_run(%s, %s, %s, %s::jsonb, %s::jsonb)",
                    (rid, token, status, '{"out": 1}' if status == "done" else None, error)).fetchone()
    assert row is not None
    return bool(row[0])


def _finish_many(c: psycopg.Connection[Any], rid: uuid.UUID, token: int | None, status: str) -> bool:
    # a batch of two: the case's run beside an unrelated leased run, which must finish too
    other = _run(c, "running")
    other_token = _queue(c, other, leased=True)
    error = None if status == "done" else '{"code": "X", "message": "boom"}'
    rows = c.execute(
        "SELECT ord, finished FROM finish_runs(%s::uuid[], %s::bigint[], %s::text[], %s::jsonb[], %s::jsonb[])"
        " ORDER BY ord",
        ([rid, other], [token, other_token], [status, "done"],
         ['{"out": 1}' if status == "done" else None, '{"out": 2}'], [error, None]),
    ).fetchall()
    assert [r[0] for r in rows] == [1, 2]
    assert rows[1][1] is True, "the other run of the batch was not finished"
    return bool(rows[0][1])


@pytest.mark.parametrize("case", CASES)
def test_both_forms_of_a_finish_agree(conn: psycopg.Connection[Any], case: str) -> None:
    results = {}
    for form, finish in (("finish_run", _finish_one), ("finish_runs", _finish_many)):
        rid, token, status, others = CASES[case](conn)
        roles = {"run": rid, **others}
        before = _snapshot(conn, roles)
        finished = finish(conn, rid, token, status)
        results[form] = (finished, before, _snapshot(conn, roles))
    assert results["finish_run"][0] == results["finish_runs"][0], f"{case}: the forms answer differently"
    assert results["finish_run"][2] == results["finish_runs"][2], f"{case}: the forms leave different rows"
    finished, before, after = results["finish_run"]
    expected = case in ("leased, own token", "no token, queued", "no token, not queued",
                        "failed with children", "child of a waiting parent")
    assert finished is expected, case
    if not expected:
        assert after == before, f"{case}: a refused finish changed rows"
        return
    run, queued = after["run"]
    assert run[0] in ("done", "failed", "canceled") and run[4] is True and queued is None
    if case == "failed with children":
        assert after["live child"][0][0] == "canceled" and after["live child"][1] is None
        assert after["finished child"] == before["finished child"]
    if case == "child of a waiting parent":
        parent_queue = after["parent"][1]
        assert parent_queue is not None and parent_queue[0] is True, "the parent was not woken"
