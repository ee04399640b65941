"""Micro benchmarks of the hot pure-Python pieces (pytest-benchmark; no database needed).

    pytest benches/micro                      # or: pytest benches/micro --benchmark-json out.json

* replay: a 100-step history driven through the real ``Context`` (and, for a builder flow,
  the drift check of ``Shape.check``). Every step is memoized, so the core is never called:
  the runtime gets ``core=None`` and the body is driven by hand with ``coro.send(None)``;
  a replay that tried to suspend or touch the database would fail the benchmark.
* JSON: ``iterflow.codec.encode`` of typical step results (small, medium, with non-JSON types).
* cursor keys: ``Context._next`` assigning keys (``name``, ``name:1``...) to 100 ctx calls, and
  ``types.encode_cursor``/``decode_cursor`` for list_runs pages.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest

from iterflow import codec, flow
from iterflow.config import Limits
from iterflow.context import Context
from iterflow.cores.base import ClaimedRun, StepRecord
from iterflow.observe import Hooks
from iterflow.services import ExecutionServices
from iterflow.step_limits import StepLimits
from iterflow.types import decode_cursor, encode_cursor

STEPS = 100
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def _noop() -> None:
    return None


def _services() -> ExecutionServices:
    log = logging.getLogger("benches.micro")
    hooks = Hooks(None, log)
    return ExecutionServices(core=None, limits=Limits(), hooks=hooks, log=log,  # type: ignore[arg-type]
                   default_step_timeout=None, max_run_attempts=100, drift="park",
                   step_limits=StepLimits({}, None, hooks))  # type: ignore[arg-type]


def _history(n: int = STEPS) -> dict[str, StepRecord]:
    return {
        f"s{i}": StepRecord(key=f"s{i}", seq=i, kind="step", name=f"s{i}", status="done",
                            result={"i": i, "ok": True}, attempts=1, finished_at=T0 + timedelta(milliseconds=i))
        for i in range(n)
    }


def _claimed(history: dict[str, StepRecord]) -> ClaimedRun:
    return ClaimedRun(run_id="0190b4a2-0000-7000-8000-000000000000", lease_token=1, name="replay", version=1,
                      input=None, attempts=2, cancel_reason=None, parent_id=None, depth=1, created_at=T0,
                      parent_status=None, db_now=T0 + timedelta(seconds=1), history=history)


async def _body(ctx: Context, inp: Any) -> int:
    total = 0
    for i in range(STEPS):
        out = await ctx.step(f"s{i}", _noop)
        total += out["i"]
    return total


def _drive(coro: Any) -> Any:
    """Run a coroutine that must complete without ever suspending (all memo hits)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("replay suspended: a step was not memoized")


EXPECTED = sum(range(STEPS))


def test_replay_100_steps_define_flow(benchmark: Any) -> None:
    rt, history = _services(), _history()

    def replay() -> int:
        ctx = Context(_claimed(history), rt, body_flow=True)
        return _drive(_body(ctx, None))

    assert benchmark(replay) == EXPECTED


def test_replay_100_steps_builder(benchmark: Any) -> None:
    b = flow("replay")
    for i in range(STEPS):
        b = b.step(f"s{i}", _noop)
    built = b.build()
    assert built.shape is not None
    rt, history = _services(), _history()

    def replay() -> Any:
        assert built.shape is not None and built.shape.check(history) is None
        ctx = Context(_claimed(history), rt, body_flow=False)
        return _drive(built.body(ctx, None))

    assert benchmark(replay) == {"i": STEPS - 1, "ok": True}


SMALL = {"order_id": 12345, "status": "charged", "amount": 19.99, "currency": "EUR"}
MEDIUM = {"items": [{"sku": f"SKU-{i:05d}", "qty": i % 7, "price": i * 1.25, "tags": ["a", "b"]} for i in range(100)],
          "customer": {"id": 42, "name": "Zoë Example", "email": "zoe@example.com"}}
RICH = {"when": datetime(2025, 5, 1, 12, 0, tzinfo=UTC), "day": date(2025, 5, 1),
        "id": UUID(int=12345), "price": Decimal("19.99"), "codes": ("x", "y"), "n": 3}


@pytest.mark.parametrize("name,value", [("small", SMALL), ("medium", MEDIUM), ("rich", RICH), ("none", None)])
def test_codec_encode(benchmark: Any, name: str, value: Any) -> None:
    text = benchmark(codec.encode, value, field="step result", limit=1_048_576, code="STEP_RESULT_TOO_LARGE")
    assert isinstance(text, str) and text


def test_cursor_keys_100_calls(benchmark: Any) -> None:
    """Keys for 100 ctx calls over 10 names (so 90 of them carry an ``:n`` occurrence suffix)."""
    rt, run = _services(), _claimed({})
    names = [f"step{i % 10}" for i in range(STEPS)]

    def keys() -> str:
        ctx = Context(run, rt, body_flow=True)
        last = ""
        for name in names:
            last = ctx._next("step", name)[0]
        return last

    assert benchmark(keys) == "step9:9"


def test_list_runs_cursor_roundtrip(benchmark: Any) -> None:
    at, run_id = T0, "0190b4a2-0000-7000-8000-000000000000"
    assert benchmark(lambda: decode_cursor(encode_cursor(at, run_id))) == (at, run_id)
