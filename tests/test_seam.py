"""The seam between Python and the Rust core (docs/architecture.md §4): the extension, its stub
``iterflow/_core.pyi`` and the protocol's types in ``cores/base.py`` name the same fields, and
the values that cross are the named classes the stub promises."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import iterflow
from iterflow.cores import base

_core = pytest.importorskip("iterflow._core")
from iterflow.cores.rust import RustCore  # noqa: E402

STUB = Path(iterflow.__file__).with_name("_core.pyi")

# each row class of the extension and the protocol dataclass it becomes in cores/rust.py
COUNTERPARTS = {
    "ClaimedRun": base.ClaimedRun,
    "StepRecord": base.StepRecord,
    "StoredStep": base.StoredStep,
    "Created": base.Created,
    "LeaseState": base.LeaseState,
    "Resolved": base.Resolved,
    "ChangedRuns": base.ChangedRuns,
    "Woken": base.Woken,
}
# row classes typed by the stub alone (the protocol answers admin_query's rows as dicts; a
# handoff's claim is decoded from its notice by base.Handoff.from_notice, for both cores)
STUB_ONLY = {"QueryResult", "HandedRun"}


def _stub_classes() -> dict[str, ast.ClassDef]:
    tree = ast.parse(STUB.read_text())
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _stub_fields(cls: ast.ClassDef) -> set[str]:
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _stub_methods(cls: ast.ClassDef) -> set[str]:
    return {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}


def _fields(cls: type) -> set[str]:
    """The attributes a frozen pyclass with ``get_all`` exposes (object fields as members)."""
    return {name for name, v in vars(cls).items()
            if inspect.isgetsetdescriptor(v) or inspect.ismemberdescriptor(v)}


def _public(obj: Any) -> set[str]:
    return {n for n in vars(obj) if not n.startswith("_") or n in ("__new__", "__version__")}


@pytest.mark.parametrize("name", sorted(COUNTERPARTS))
def test_row_classes_match_their_protocol_dataclass(name: str) -> None:
    rust = getattr(_core, name)
    python = {f.name for f in dataclasses.fields(COUNTERPARTS[name])}
    assert _fields(rust) == python
    assert _stub_fields(_stub_classes()[name]) == python


@pytest.mark.parametrize("name", sorted(STUB_ONLY))
def test_stub_only_row_classes_match_the_stub(name: str) -> None:
    assert _fields(getattr(_core, name)) == _stub_fields(_stub_classes()[name])


def test_stub_names_every_class_method_and_function() -> None:
    stub = _stub_classes()
    runtime_classes = {n for n, v in vars(_core).items() if inspect.isclass(v)}
    assert set(stub) == runtime_classes
    for name in ("Core", "Pump", "Json"):
        runtime = {n for n in _public(getattr(_core, name)) if n != "__new__"}
        assert _stub_methods(stub[name]) - {"__new__"} == runtime, name
    tree = ast.parse(STUB.read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert functions == {n for n, v in vars(_core).items() if inspect.isbuiltin(v)}
    error_attrs = _stub_fields(stub["CoreError"])
    assert error_attrs == {"code", "message", "sqlstate", "detail", "transient"}


@pytest.fixture
async def rust(dsn: str, schema_name: str) -> AsyncIterator[RustCore]:
    await iterflow.migrate(dsn, schema_name)
    core = RustCore(dsn, schema=schema_name, pool_size=2, notify=False)
    await core.open()
    yield core
    await core.close()


async def _one_run(rust: RustCore) -> str:
    run_id = str(uuid.uuid4())
    made = await rust.insert_runs([base.RunSpec(run_id, "seam", 1, '{"n": 1}')])
    assert made == [base.Created(run_id=run_id, status="pending", created=True)]
    return run_id


async def test_rows_cross_as_named_frozen_classes(rust: RustCore) -> None:
    run_id = await _one_run(rust)
    rec = base.StepRecord("a", 0, "step", "a", "done", attempts=1)
    raw = await rust._run(rust._c.record_step, run_id, "a", 0, "step", "a", "done", json.dumps({"x": [1]}),
                          None, 1, None, None)
    assert isinstance(raw, _core.StoredStep)
    assert (raw.status, raw.result, raw.error, raw.written) == ("done", {"x": [1]}, None, True)
    assert isinstance(raw.finished_at, datetime) and raw.finished_at.tzinfo is not None
    with pytest.raises(AttributeError):
        raw.status = "failed"
    again = await rust.record_step(run_id, rec, json.dumps(2), None)
    assert again == base.StoredStep("done", {"x": [1]}, None, False, raw.finished_at)

    runs = await rust._run(rust._c.claim, ["seam"], 10, "me", 60_000, None)
    assert [type(r) for r in runs] == [_core.ClaimedRun]
    head = runs[0]
    assert (head.run_id, head.name, head.version, head.input, head.depth) == (run_id, "seam", 1, {"n": 1}, 1)
    assert [type(s) for s in head.history] == [_core.StepRecord]
    assert (head.history[0].key, head.history[0].result) == ("a", {"x": [1]})

    states = await rust.heartbeat([(run_id, head.lease_token)], 60_000)
    assert states == [base.LeaseState(run_id=run_id, held=True, cancel_reason=None)]


async def test_claim_builds_the_protocol_types(rust: RustCore) -> None:
    run_id = await _one_run(rust)
    await rust.record_step(run_id, base.StepRecord("k", 0, "step", "k", "done", attempts=1), json.dumps("v"), None)
    [run] = await rust.claim(["seam"], 10, "me", 60_000)
    assert isinstance(run, base.ClaimedRun)
    assert run.run_id == run_id and run.input == {"n": 1} and run.attempts == 1
    assert isinstance(run.history["k"], base.StepRecord)
    assert (run.history["k"].status, run.history["k"].result) == ("done", "v")


async def test_resolve_changes_query_and_detail(rust: RustCore) -> None:
    run_id = await _one_run(rust)
    [run] = await rust.claim(["seam"], 10, "me", 60_000)
    resolved = await rust.resolve_signal(run_id, "s", 0, "go", False, json.dumps({"t": 1}))
    assert isinstance(resolved, base.Resolved)
    assert (resolved.outcome, resolved.payload) == ("none", None) and isinstance(resolved.at, datetime)
    changed = await rust._wait(rust._c.changed_runs, 0.0)
    assert isinstance(changed, _core.ChangedRuns) and isinstance(changed.listening, bool)
    assert await rust.changed_runs(0.0) == base.ChangedRuns([], everything=False, listening=False)
    result = await rust._run(rust._c.query, "release_leases", [[run_id], [run.lease_token]])
    assert isinstance(result, _core.QueryResult)
    assert result.has_columns is True and result.rowcount == len(result.rows) == 1
    assert isinstance(result.rows[0], dict)
    detail = await rust.run_detail(run_id)
    assert detail is not None
    assert set(detail) == {"run", "steps", "signals", "children", "events", "timer"}
    assert detail["run"]["id"] == uuid.UUID(run_id)
    assert await rust.run_detail(str(uuid.uuid4())) is None
