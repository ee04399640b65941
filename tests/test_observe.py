"""Observability (docs/operations.md §6): metrics hooks see the run's life, and can never break it."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from iterflow import FlowRuntimeError, RunFailed, define_flow


@define_flow("observed")
async def observed(ctx, inp):
    await ctx.step("one", lambda: 1)
    if inp == "fail":
        def bad():
            raise FlowRuntimeError("OBSERVED_FAIL", "told to", non_retryable=True)

        await ctx.step("bad", bad)
    await ctx.sleep("50ms")
    return "ok"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, *args))


class Exploding:
    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def hook(*_args):
            raise RuntimeError(f"hook {name} is broken")

        return hook


async def test_hooks_see_runs_steps_suspensions_and_failures(make_engine):
    rec = Recorder()
    engine = await make_engine(observed, metrics=rec, poll_interval=0.05)
    handle = engine.handle("observed")
    ok = await handle.start(None)
    assert await handle.result(ok.run_id, timeout=5) == "ok"
    bad = await handle.start("fail")
    with pytest.raises(RunFailed):
        await handle.result(bad.run_id, timeout=5)
    names = [c[0] for c in rec.calls]
    assert names.count("run_started") >= 3  # two runs, one resumed after its sleep
    assert ("run_suspended", "sleeping") in rec.calls
    assert ("run_failed", "OBSERVED_FAIL") in rec.calls
    completed = [c for c in rec.calls if c[0] == "run_completed"]
    assert len(completed) == 1 and completed[0][1] >= 0
    step_statuses = sorted(c[1] for c in rec.calls if c[0] == "step_finished")
    assert step_statuses == ["error", "ok", "ok"]


async def test_raising_hooks_never_break_a_run_and_warn_once(make_engine, caplog):
    engine = await make_engine(observed, metrics=Exploding(), poll_interval=0.05)
    handle = engine.handle("observed")
    with caplog.at_level(logging.WARNING, logger="iterflow"):
        runs = [await handle.start(None) for _ in range(3)]
        for run in runs:
            assert await handle.result(run.run_id, timeout=5) == "ok"
        assert (await engine.signal(runs[0].run_id, "x", 1)).kind == "closed"
    warnings = [r.getMessage() for r in caplog.records if "metrics hook run_started" in r.getMessage()]
    assert len(warnings) == 1


async def test_startup_warnings(make_engine, caplog):
    with caplog.at_level(logging.WARNING, logger="iterflow"):
        await make_engine(observed)
    text = caplog.text
    assert "no default_step_timeout" in text
    assert "no retention" in text


async def test_logs_carry_structured_fields(make_engine, caplog):
    @define_flow("logs")
    async def logs(ctx, _inp):
        ctx.log("checkpoint", order="o-1")
        return 1

    engine = await make_engine(logs)
    with caplog.at_level(logging.INFO, logger="iterflow"):
        run = await engine.handle("logs").start(None)
        await engine.handle("logs").result(run.run_id, timeout=5)
    (record,) = [r for r in caplog.records if r.getMessage() == "checkpoint"]
    assert record.run_id == run.run_id and record.flow == "logs"
    assert record.data == {"order": "o-1"}


async def test_otel_spans_per_run_attempt_and_step(make_engine):
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = await make_engine(observed, poll_interval=0.05)
    run = await engine.handle("observed").start(None)
    assert await engine.handle("observed").result(run.run_id, timeout=5) == "ok"
    mine: list = []
    for _ in range(100):  # result() can return before the worker has closed the last attempt's span
        mine = [s for s in exporter.get_finished_spans() if s.attributes.get("iterflow.run_id") == run.run_id]
        if len(mine) >= 3:
            break
        await asyncio.sleep(0.02)
    names = sorted(s.name for s in mine)
    # two attempts (before and after the sleep), one executed step
    assert names == ["iterflow.run observed", "iterflow.run observed", "iterflow.step one"]
    step_span = next(s for s in mine if s.name == "iterflow.step one")
    run_spans = [s for s in mine if s.name.startswith("iterflow.run")]
    assert step_span.parent is not None and step_span.parent.span_id in {s.context.span_id for s in run_spans}


def test_spans_are_built_only_once_a_tracer_provider_is_set():
    """Having opentelemetry-api installed is not enough to pay for spans: until the application
    sets a provider, ``span()`` neither builds the attributes nor enters a tracer (fresh process:
    a provider, once set, cannot be unset)."""
    pytest.importorskip("opentelemetry.sdk")
    script = textwrap.dedent("""
        import logging
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from iterflow.observe import Hooks

        built = []
        def attributes():
            built.append(1)
            return {"k": "v"}

        hooks = Hooks(None, logging.getLogger("t"))
        with hooks.span("before", attributes):
            pass
        assert built == [], built
        trace.set_tracer_provider(TracerProvider())
        with hooks.span("after", attributes):
            assert trace.get_current_span().is_recording()
        assert built == [1], built
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "OTEL_PYTHON_TRACER_PROVIDER"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
