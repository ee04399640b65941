"""Step execution (docs/guide.md §2, "Steps"; docs/replay.md §3): retries and backoff, timeouts and the abort token,
classification, error records, memoization, threads vs the loop, and the suspend exception."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest

import iterflow
from iterflow import Code, FlowRuntimeError, RunFailed, define_flow, flow
from iterflow.steps import StepOptions

FAST = {"poll_interval": 0.05}


async def rows(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, args or None)
        return await cur.fetchall() if cur.description else []


async def steps_of(dsn: str, schema: str, run_id: str) -> dict[str, dict[str, Any]]:
    found = await rows(
        dsn, f'SELECT key, status, result, error, attempts FROM "{schema}".steps WHERE run_id = %s', run_id
    )
    return {k: {"status": s, "result": r, "error": e, "attempts": a} for k, s, r, e, a in found}


async def run_error(dsn: str, schema: str, run_id: str) -> dict[str, Any]:
    ((error,),) = await rows(dsn, f'SELECT error FROM "{schema}".runs WHERE id = %s', run_id)
    return error  # type: ignore[no-any-return]


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def single_step_flow(name: str, fn: Any, **options: Any) -> iterflow.Flow:
    @define_flow(name)
    async def body(ctx: iterflow.Context, _: Any) -> Any:
        return await ctx.step("only", fn, **options)

    return body


async def run_to_end(engine: iterflow.Engine, name: str, value: Any = None, timeout: float = 15) -> Any:
    started = await engine.handle(name).start(value)
    return started.run_id, await _outcome(engine.handle(name), started.run_id, timeout)


async def _outcome(handle: iterflow.FlowHandle, run_id: str, timeout: float) -> Any:
    try:
        return await handle.result(run_id, timeout=timeout)
    except RunFailed as exc:
        return exc


# -- retries and backoff ---------------------------------------------------------------------


class Flaky:
    """Fails ``failures`` times, then returns; records each attempt's number and time."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts: list[int] = []
        self.times: list[float] = []

    def __call__(self, s: iterflow.StepArgs) -> str:
        self.attempts.append(s.attempt)
        self.times.append(time.monotonic())
        if len(self.attempts) <= self.failures:
            raise ConnectionError(f"attempt {s.attempt} failed")
        return f"ok on {s.attempt}"

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


BACKOFFS: dict[str, tuple[Any, float, list[float]]] = {
    # name: (backoff, base_delay, expected gaps between attempts 1-2, 2-3, 3-4)
    "fixed": ("fixed", 0.15, [0.15, 0.15, 0.15]),
    "linear": ("linear", 0.1, [0.1, 0.2, 0.3]),
    "exponential": ("exponential", 0.1, [0.1, 0.2, 0.4]),
    "callable": (lambda n: 0.05 * n * n, 0.1, [0.05, 0.2, 0.45]),
}


async def test_retries_with_backoff(make_engine: Any, dsn: str, schema_name: str) -> None:
    steps = {name: Flaky(failures=3) for name in BACKOFFS}
    flows = [
        single_step_flow(name, steps[name], retries=5, backoff=backoff, base_delay=base)
        for name, (backoff, base, _) in BACKOFFS.items()
    ]
    engine = await make_engine(*flows, **FAST)
    outcomes = await asyncio.gather(*(run_to_end(engine, name) for name in BACKOFFS))
    for name, (run_id, out) in zip(BACKOFFS, outcomes, strict=True):
        step, expected = steps[name], BACKOFFS[name][2]
        assert out == "ok on 4", name
        assert step.attempts == [1, 2, 3, 4], name
        for gap, want in zip(step.gaps(), expected, strict=True):
            assert want * 0.88 - 0.01 <= gap <= want + 0.5, (name, step.gaps(), expected)
        recorded = await steps_of(dsn, schema_name, run_id)
        assert recorded["only"]["attempts"] == 4 and recorded["only"]["status"] == "done", name


async def test_retries_exhausted(make_engine: Any, dsn: str, schema_name: str) -> None:
    step = Flaky(failures=100)
    engine = await make_engine(
        single_step_flow("f", step, retries=2, backoff="fixed", base_delay=0.05), **FAST
    )
    run_id, out = await run_to_end(engine, "f")
    assert isinstance(out, RunFailed) and out.code == Code.STEP_FAILED
    assert "ConnectionError" in out.message and "attempt 3 failed" in out.message
    assert step.attempts == [1, 2, 3]
    assert (await steps_of(dsn, schema_name, run_id))["only"]["attempts"] == 3


async def test_no_retries_by_default(make_engine: Any) -> None:
    step = Flaky(failures=1)
    engine = await make_engine(single_step_flow("f", step), **FAST)
    _, out = await run_to_end(engine, "f")
    assert isinstance(out, RunFailed) and step.attempts == [1]


async def test_retrying_status_while_backing_off(make_engine: Any) -> None:
    step = Flaky(failures=1)
    engine = await make_engine(
        single_step_flow("f", step, retries=1, backoff="fixed", base_delay=1.0), **FAST
    )
    started = await engine.handle("f").start()
    await wait_until(lambda: len(step.attempts) == 1)
    await asyncio.sleep(0.2)
    detail = await engine.status(started.run_id)
    assert detail is not None and detail.run.status == "retrying"
    assert detail.run.waiting is not None and detail.run.waiting.kind == "retry"
    assert detail.run.waiting.until is not None and "retrying" in str(detail.run.waiting)
    assert await engine.handle("f").result(started.run_id, timeout=10) == "ok on 2"


def test_backoff_formulas() -> None:
    def delays(**kw: Any) -> list[float]:
        opts = StepOptions.build(**kw)
        return [opts.delay(n).total_seconds() for n in range(1, 6)]

    assert delays(backoff="fixed", base_delay="2s") == [2, 2, 2, 2, 2]
    assert delays(backoff="linear", base_delay="2s") == [2, 4, 6, 8, 10]
    assert delays(backoff="linear", base_delay="2s", max_delay="5s") == [2, 4, 5, 5, 5]
    assert delays(backoff=lambda n: timedelta(seconds=n + 0.5)) == [1.5, 2.5, 3.5, 4.5, 5.5]
    assert delays(backoff=lambda n: "1m", max_delay="30s") == [30] * 5
    for _ in range(20):
        for n, value in enumerate(delays(base_delay=1, max_delay="1h"), start=1):
            assert 2 ** (n - 1) * 0.9 <= value <= 2 ** (n - 1) * 1.1
    assert delays(base_delay=1, max_delay=3)[-1] == 3  # jitter never exceeds the cap
    jittered = {StepOptions.build(base_delay=10).delay(3).total_seconds() for _ in range(20)}
    assert len(jittered) > 1, "exponential backoff must be jittered"


@pytest.mark.parametrize(
    "options",
    [
        {"retries": -1},
        {"retries": 1.5},
        {"backoff": "random"},
        {"base_delay": "later"},
        {"timeout": "-1s"},
        {"classify": "permanent"},
    ],
)
def test_bad_step_options(options: dict[str, Any]) -> None:
    with pytest.raises(iterflow.IterflowError) as info:
        flow("bad").step("s", lambda: 1, **options)
    assert info.value.code == Code.INVALID_ARGUMENT


# -- timeouts and the abort token ---------------------------------------------------------------


async def test_sync_step_timeout_fires_abort_token(make_engine: Any, dsn: str, schema_name: str) -> None:
    seen: list[tuple[bool, str | None, str]] = []

    def slow(s: iterflow.StepArgs) -> str:
        start = time.monotonic()
        while not s.abort.aborted and time.monotonic() - start < 5:
            time.sleep(0.01)
        seen.append((s.abort.aborted, s.abort.reason, threading.current_thread().name))
        return "late"

    engine = await make_engine(single_step_flow("f", slow, timeout=0.2), **FAST)
    t0 = time.monotonic()
    run_id, out = await run_to_end(engine, "f")
    assert isinstance(out, RunFailed) and out.code == Code.STEP_TIMEOUT
    assert time.monotonic() - t0 < 2.0
    await wait_until(lambda: bool(seen))
    assert seen[0][:2] == (True, "timeout")
    recorded = await steps_of(dsn, schema_name, run_id)
    assert recorded["only"]["error"]["code"] == Code.STEP_TIMEOUT and recorded["only"]["result"] is None


async def test_sync_step_ignoring_the_token_still_times_out(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    finished = threading.Event()

    def stubborn(s: iterflow.StepArgs) -> str:
        time.sleep(1.0)
        finished.set()
        return "too late"

    engine = await make_engine(single_step_flow("f", stubborn, timeout=0.2), **FAST)
    t0 = time.monotonic()
    run_id, out = await run_to_end(engine, "f")
    assert isinstance(out, RunFailed) and out.code == Code.STEP_TIMEOUT
    assert time.monotonic() - t0 < 0.9, "the timeout must not wait for the thread"
    await asyncio.get_running_loop().run_in_executor(None, finished.wait, 3)
    await asyncio.sleep(0.2)
    recorded = await steps_of(dsn, schema_name, run_id)
    assert recorded["only"]["result"] is None, "the late return must not be recorded"
    ((status,),) = await rows(dsn, f'SELECT status FROM "{schema_name}".runs WHERE id = %s', run_id)
    assert status == "failed"


async def test_async_step_timeout_fires_abort_token(make_engine: Any) -> None:
    seen: dict[str, Any] = {}

    async def slow(s: iterflow.StepArgs) -> str:
        async def watch() -> None:
            seen["waited"] = await s.abort.wait()

        asyncio.get_running_loop().create_task(watch())
        try:
            seen["direct"] = await s.abort.wait()
            await asyncio.sleep(5)
        finally:
            seen["finally"] = (s.abort.aborted, s.abort.reason)
        return "late"

    engine = await make_engine(single_step_flow("f", slow, timeout=0.2), **FAST)
    t0 = time.monotonic()
    _, out = await run_to_end(engine, "f")
    assert isinstance(out, RunFailed) and out.code == Code.STEP_TIMEOUT
    assert time.monotonic() - t0 < 2.0
    await wait_until(lambda: "waited" in seen and "finally" in seen)
    assert seen["waited"] == "timeout"
    assert seen["finally"] == (True, "timeout")
    assert seen.get("direct") == "timeout", "await abort.wait() inside the step must return on timeout"


async def test_step_raising_timeout_error_is_not_a_step_timeout(make_engine: Any) -> None:
    fired: list[bool] = []

    async def upstream(s: iterflow.StepArgs) -> None:
        await asyncio.sleep(0.01)
        fired.append(s.abort.aborted)
        raise TimeoutError("upstream took too long")

    engine = await make_engine(single_step_flow("f", upstream, timeout=5), **FAST)
    _, out = await run_to_end(engine, "f")
    assert isinstance(out, RunFailed) and out.code == Code.STEP_FAILED
    assert "upstream took too long" in out.message
    assert fired == [False]


async def test_timeout_is_per_attempt_and_retried(make_engine: Any) -> None:
    attempts: list[int] = []

    async def sometimes_slow(s: iterflow.StepArgs) -> int:
        attempts.append(s.attempt)
        if s.attempt < 3:
            await asyncio.sleep(5)
        return s.attempt

    engine = await make_engine(
        single_step_flow("f", sometimes_slow, timeout=0.15, retries=3, backoff="fixed", base_delay=0.05),
        **FAST,
    )
    _, out = await run_to_end(engine, "f")
    assert out == 3 and attempts == [1, 2, 3]


async def test_default_step_timeout(make_engine: Any) -> None:
    def slow(s: iterflow.StepArgs) -> str:
        s.abort.raise_if_aborted()
        time.sleep(0.5)
        return "done"

    @define_flow("defaults")
    async def defaults(ctx: iterflow.Context, _: Any) -> Any:
        overridden = await ctx.step("explicit", slow, timeout="3s")
        return overridden, await ctx.step("implicit", slow)

    engine = await make_engine(defaults, default_step_timeout="200ms", **FAST)
    _, out = await run_to_end(engine, "defaults")
    assert isinstance(out, RunFailed) and out.code == Code.STEP_TIMEOUT

    builder = flow("builder-defaults").step("slow", slow).build()
    engine = await make_engine(builder, default_step_timeout=0.2, **FAST)
    _, out = await run_to_end(engine, "builder-defaults")
    assert isinstance(out, RunFailed) and out.code == Code.STEP_TIMEOUT


# -- classification and custom errors -------------------------------------------------------------


async def test_classify_permanent_stops_retries(make_engine: Any) -> None:
    calls: list[int] = []

    def step(s: iterflow.StepArgs) -> None:
        calls.append(s.attempt)
        raise (PermissionError if s.attempt == 2 else TimeoutError)("nope")

    def classify(exc: BaseException) -> str:
        return "permanent" if isinstance(exc, PermissionError) else "transient"

    engine = await make_engine(
        single_step_flow("f", step, retries=10, backoff="fixed", base_delay=0.02, classify=classify), **FAST
    )
    _, out = await run_to_end(engine, "f")
    assert isinstance(out, RunFailed) and "PermissionError" in out.message
    assert calls == [1, 2]


async def test_broken_classifier_counts_as_transient(make_engine: Any) -> None:
    calls: list[int] = []

    def step(s: iterflow.StepArgs) -> int:
        calls.append(s.attempt)
        if s.attempt == 1:
            raise ValueError("first")
        return s.attempt

    engine = await make_engine(
        single_step_flow("f", step, retries=2, backoff="fixed", base_delay=0.02, classify=lambda e: 1 / 0),
        **FAST,
    )
    _, out = await run_to_end(engine, "f")
    assert out == 2 and calls == [1, 2]


async def test_non_retryable_flow_runtime_error(make_engine: Any, dsn: str, schema_name: str) -> None:
    calls: list[int] = []

    def step(s: iterflow.StepArgs) -> None:
        calls.append(s.attempt)
        raise FlowRuntimeError("CARD_DECLINED", "card declined", non_retryable=True)

    engine = await make_engine(single_step_flow("f", step, retries=5, base_delay=0.02), **FAST)
    run_id, out = await run_to_end(engine, "f")
    assert isinstance(out, RunFailed)
    assert (out.code, out.message) == ("CARD_DECLINED", "card declined")
    assert calls == [1]
    assert (await run_error(dsn, schema_name, run_id))["code"] == "CARD_DECLINED"
    assert (await steps_of(dsn, schema_name, run_id))["only"]["error"]["code"] == "CARD_DECLINED"


async def test_retryable_flow_runtime_error_keeps_its_code(make_engine: Any) -> None:
    calls: list[int] = []

    def step(s: iterflow.StepArgs) -> None:
        calls.append(s.attempt)
        raise FlowRuntimeError("UPSTREAM_DOWN", f"attempt {s.attempt}")

    engine = await make_engine(
        single_step_flow("f", step, retries=2, backoff="fixed", base_delay=0.02), **FAST
    )
    _, out = await run_to_end(engine, "f")
    assert isinstance(out, RunFailed) and (out.code, out.message) == ("UPSTREAM_DOWN", "attempt 3")
    assert calls == [1, 2, 3]


async def test_failed_step_error_record(make_engine: Any, dsn: str, schema_name: str) -> None:
    def step() -> None:
        try:
            {}["missing"]
        except KeyError as exc:
            raise RuntimeError("could not load the order") from exc

    engine = await make_engine(single_step_flow("f", step), **FAST)
    run_id, out = await run_to_end(engine, "f")
    assert isinstance(out, RunFailed) and out.code == Code.STEP_FAILED
    recorded = (await steps_of(dsn, schema_name, run_id))["only"]["error"]
    assert set(recorded) >= {"code", "message", "traceback", "cause"}
    assert recorded["code"] == Code.STEP_FAILED
    assert "RuntimeError" in recorded["message"] and "could not load the order" in recorded["message"]
    assert "Traceback" in recorded["traceback"] and "def step" not in recorded["traceback"]
    assert '{}["missing"]' in recorded["traceback"] or "missing" in recorded["traceback"]
    assert recorded["cause"] == [{"type": "KeyError", "message": "'missing'"}]
    # the run's stored error keeps what happened in the step, not just the replayed re-raise
    error = await run_error(dsn, schema_name, run_id)
    assert set(error) >= {"code", "message", "traceback", "cause"}
    assert error["code"] == Code.STEP_FAILED and "could not load the order" in error["message"]
    assert error["cause"] and error["cause"][0]["type"] == "KeyError"
    assert "RuntimeError" in error["traceback"]
    assert out.error == error


async def test_body_exception_error_record(make_engine: Any, dsn: str, schema_name: str) -> None:
    @define_flow("body-fails")
    async def body(ctx: iterflow.Context, _: Any) -> None:
        await ctx.step("fine", lambda: 1)
        try:
            int("x")
        except ValueError as exc:
            raise LookupError("wrapped") from exc

    engine = await make_engine(body, **FAST)
    run_id, out = await run_to_end(engine, "body-fails")
    assert isinstance(out, RunFailed) and out.code == Code.STEP_FAILED
    error = await run_error(dsn, schema_name, run_id)
    assert "LookupError" in error["message"] and "wrapped" in error["message"]
    assert error["cause"][0]["type"] == "ValueError"
    assert "LookupError" in error["traceback"]


async def test_caught_step_failure_is_memoized(make_engine: Any) -> None:
    calls: list[int] = []
    caught: list[str] = []

    def fails() -> None:
        calls.append(1)
        raise FlowRuntimeError("NOPE", "no", non_retryable=True)

    @define_flow("catches")
    async def catches(ctx: iterflow.Context, _: Any) -> Any:
        try:
            await ctx.step("bad", fails)
        except FlowRuntimeError as exc:
            caught.append(exc.code)
        await ctx.sleep(0.15)
        return "recovered"

    engine = await make_engine(catches, **FAST, sticky_cache=0)  # replays (the sticky cache would not)
    _, out = await run_to_end(engine, "catches")
    assert out == "recovered"
    assert calls == [1], "a failed step must not re-run on replay"
    assert caught == ["NOPE", "NOPE"], "the recorded failure is raised again on replay"


# -- ctx calls inside a step -----------------------------------------------------------------------


async def test_ctx_call_inside_step_is_refused(make_engine: Any, dsn: str, schema_name: str) -> None:
    @define_flow("child")
    async def child(ctx: iterflow.Context, _: Any) -> int:
        return 1

    @define_flow("nested")
    async def nested(ctx: iterflow.Context, call: str) -> Any:
        async def inner() -> Any:
            if call == "step":
                return await ctx.step("inner", lambda: 1)
            if call == "sleep":
                return await ctx.sleep(0.01)
            if call == "signal":
                return await ctx.signal("go", timeout=1)
            return await ctx.invoke(child, None)

        return await ctx.step("outer", inner, retries=3, base_delay=0.01)

    engine = await make_engine(nested, child, **FAST)
    calls = ["step", "sleep", "signal", "invoke"]
    outcomes = await asyncio.gather(*(run_to_end(engine, "nested", call) for call in calls))
    for call, (run_id, out) in zip(calls, outcomes, strict=True):
        assert isinstance(out, RunFailed) and out.code == Code.STEP_INVALID_AWAIT, call
        recorded = await steps_of(dsn, schema_name, run_id)
        assert list(recorded) == ["outer"], f"{call}: nothing may be recorded for the refused call"
        assert recorded["outer"]["attempts"] == 1, f"{call}: STEP_INVALID_AWAIT is not retried"
    assert await rows(dsn, f'SELECT count(*) FROM "{schema_name}".runs') == [(4,)], "no child was spawned"


async def test_ctx_call_from_sync_step_thread_is_refused(make_engine: Any) -> None:
    @define_flow("nested-sync")
    async def nested(ctx: iterflow.Context, _: Any) -> Any:
        def inner() -> Any:
            return asyncio.run(ctx.step("inner", lambda: 1))

        return await ctx.step("outer", inner)

    engine = await make_engine(nested, **FAST)
    _, out = await run_to_end(engine, "nested-sync")
    assert isinstance(out, RunFailed) and out.code == Code.STEP_INVALID_AWAIT


# -- the suspend exception cannot be swallowed -------------------------------------------------------


async def test_swallowed_suspend_still_suspends(make_engine: Any) -> None:
    after: list[float] = []
    t0 = time.monotonic()

    @define_flow("swallow")
    async def swallow(ctx: iterflow.Context, _: Any) -> Any:
        try:
            await ctx.sleep(0.4)
        except BaseException:  # noqa: BLE001 - the point of the test
            pass
        await ctx.step("after", lambda: after.append(time.monotonic() - t0))
        return "finished"

    engine = await make_engine(swallow, **FAST)
    _, out = await run_to_end(engine, "swallow")
    assert out == "finished"
    assert len(after) == 1 and after[0] >= 0.38, "the step after the sleep must wait for the sleep"


async def test_swallowed_suspend_then_return_still_suspends(make_engine: Any) -> None:
    @define_flow("swallow-return")
    async def swallow(ctx: iterflow.Context, _: Any) -> Any:
        try:
            await ctx.sleep(0.2)
        except BaseException:  # noqa: BLE001
            return "escaped"
        return "slept"

    engine = await make_engine(swallow, **FAST)
    run_id, out = await run_to_end(engine, "swallow-return")
    assert out == "slept"


async def test_swallowed_suspend_then_raise_still_suspends(make_engine: Any) -> None:
    @define_flow("swallow-raise")
    async def swallow(ctx: iterflow.Context, _: Any) -> Any:
        try:
            await ctx.sleep(0.2)
        except BaseException as exc:
            raise ValueError("converted") from exc
        return "slept"

    engine = await make_engine(swallow, **FAST)
    _, out = await run_to_end(engine, "swallow-raise")
    assert out == "slept"


async def test_except_exception_does_not_catch_suspend(make_engine: Any) -> None:
    caught: list[str] = []

    @define_flow("except-exception")
    async def body(ctx: iterflow.Context, _: Any) -> Any:
        try:
            await ctx.sleep(0.15)
        except Exception as exc:  # noqa: BLE001
            caught.append(type(exc).__name__)
        return "ok"

    engine = await make_engine(body, **FAST)
    _, out = await run_to_end(engine, "except-exception")
    assert out == "ok" and caught == []


# -- where steps run, what they may be ------------------------------------------------------------------


async def test_sync_steps_run_in_threads_async_steps_on_the_loop(make_engine: Any) -> None:
    seen: dict[str, Any] = {}

    def sync_step() -> None:
        seen["sync"] = threading.current_thread()

    async def async_step() -> None:
        seen["async"] = threading.current_thread()
        seen["loop"] = asyncio.get_running_loop()

    @define_flow("where")
    async def where(ctx: iterflow.Context, _: Any) -> None:
        seen["body"] = threading.current_thread()
        seen["body_loop"] = asyncio.get_running_loop()
        await ctx.step("sync", sync_step)
        await ctx.step("async", async_step)

    engine = await make_engine(where, **FAST)
    await run_to_end(engine, "where")
    assert seen["sync"] is not seen["body"]
    assert seen["async"] is seen["body"] and seen["loop"] is seen["body_loop"]


async def test_blocking_sync_step_does_not_block_the_loop(make_engine: Any) -> None:
    ticks: list[float] = []

    def blocking() -> str:
        time.sleep(0.4)
        return "ok"

    engine = await make_engine(single_step_flow("f", blocking), **FAST)

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    task = asyncio.ensure_future(ticker())
    try:
        _, out = await run_to_end(engine, "f")
    finally:
        task.cancel()
    assert out == "ok"
    assert max(b - a for a, b in zip(ticks, ticks[1:], strict=False)) < 0.2


async def test_zero_argument_callables(make_engine: Any) -> None:
    class Callable0:
        def __call__(self) -> str:
            return "instance"

    class AsyncCallable:
        async def __call__(self, s: iterflow.StepArgs) -> str:
            return f"async instance {s.attempt}"

    async def async_zero() -> str:
        return "async zero"

    def add(a: int, b: int) -> int:
        return a + b

    @define_flow("zero")
    async def zero(ctx: iterflow.Context, _: Any) -> Any:
        return [
            await ctx.step("lambda", lambda: "lambda"),
            await ctx.step("async", async_zero),
            await ctx.step("partial", functools.partial(add, 1, 2)),
            await ctx.step("instance", Callable0()),
            await ctx.step("async-instance", AsyncCallable()),
            await ctx.step("defaulted", lambda n=7: n),
            await ctx.step("with-args", lambda s: s.input),
            await ctx.step("with-args-and-default", lambda s, n=1: s.attempt + n),
        ]

    engine = await make_engine(zero, **FAST)
    _, out = await run_to_end(engine, "zero")
    assert out == ["lambda", "async zero", 3, "instance", "async instance 1", 7, None, 2]

    builder = flow("zero-builder").step("a", lambda: 5).step("b", lambda s: s.input * 2).build()
    engine = await make_engine(builder, **FAST)
    _, out = await run_to_end(engine, "zero-builder")
    assert out == 10


# -- memoization -----------------------------------------------------------------------------------------


async def test_completed_steps_do_not_rerun_after_resume(
    make_engine: Any, dsn: str, schema_name: str
) -> None:
    await rows(dsn, f'CREATE TABLE "{schema_name}".effects (step text, at timestamptz DEFAULT now())')
    replays: list[int] = []

    def effect(name: str) -> Any:
        def run(s: iterflow.StepArgs) -> str:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'INSERT INTO "{schema_name}".effects (step) VALUES (%s)', (name,))
            return f"{name}-done"

        return run

    @define_flow("memo")
    async def memo(ctx: iterflow.Context, _: Any) -> Any:
        replays.append(ctx.attempt)
        a = await ctx.step("a", effect("a"))
        await ctx.sleep(0.15)
        b = await ctx.step("b", effect("b"))
        await ctx.sleep(0.15)
        c = await ctx.step("c", effect("c"))
        return [a, b, c]

    engine = await make_engine(memo, **FAST, sticky_cache=0)  # replays (the sticky cache would not)
    run_id, out = await run_to_end(engine, "memo")
    assert out == ["a-done", "b-done", "c-done"]
    assert len(replays) == 3, "two sleeps: the body ran three times"
    counts = dict(await rows(dsn, f'SELECT step, count(*) FROM "{schema_name}".effects GROUP BY step'))
    assert counts == {"a": 1, "b": 1, "c": 1}
    recorded = await steps_of(dsn, schema_name, run_id)
    assert {k: v["attempts"] for k, v in recorded.items() if k in "abc"} == {"a": 1, "b": 1, "c": 1}


async def test_loop_occurrences_get_numbered_keys(make_engine: Any, dsn: str, schema_name: str) -> None:
    calls: list[int] = []

    @define_flow("loop")
    async def loop(ctx: iterflow.Context, _: Any) -> Any:
        total = 0
        for i in range(3):
            total += await ctx.step("add", lambda i=i: calls.append(i) or i)
            if i == 1:
                await ctx.sleep(0.1)
        return total

    engine = await make_engine(loop, **FAST)
    run_id, out = await run_to_end(engine, "loop")
    assert out == 3 and calls == [0, 1, 2]
    recorded = await steps_of(dsn, schema_name, run_id)
    assert {k: v["result"] for k, v in recorded.items() if k.startswith("add")} == {
        "add": 0,
        "add:1": 1,
        "add:2": 2,
    }


@pytest.mark.parametrize("output", [10**5000, {"when": object()}], ids=["huge-int", "object"])
async def test_an_output_that_cannot_be_stored_fails_the_run_at_once(make_engine: Any, output: Any) -> None:
    """Every replay would return the same output: the run fails with a typed error naming the
    output on its first attempt, instead of being re-run every lease until max_run_attempts."""

    @define_flow("unstorable")
    async def unstorable(ctx: Any, _inp: Any) -> Any:
        await ctx.step("s", lambda: 1)
        return output

    engine = await make_engine(unstorable)
    run = await engine.handle("unstorable").start(None)
    with pytest.raises(RunFailed) as failed:
        await engine.handle("unstorable").result(run.run_id, timeout=5)
    assert failed.value.code == Code.STEP_FAILED and "output" in failed.value.message
    assert (await engine.status(run.run_id)).run.attempts == 1
