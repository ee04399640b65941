"""Workloads 9 and 10: long-lived runs whose history keeps growing (issue 15).

- **w9, long loop**: one run of ``w9_iterations`` iterations of ``await ctx.step(...)`` then
  ``await ctx.sleep("1ms")``. Every iteration suspends, so each resumes by a claim that reads the
  run's whole history and a replay of it: the cost of an iteration grows with the iterations
  before it unless something keeps it flat (a sticky cache, or ``ctx.continue_as_new``). The
  step records when it started (wall clock) and the worker process's CPU time then; the report
  compares the first and the last 100 iterations (ms per iteration, their ratio, engine CPU per
  iteration). A flat loop has a ratio near 1.
- **w10, agent turns**: ``w10_runs`` runs of ``w10_turns`` turns each, a turn being a
  ``ctx.signal("turn")`` wait then a step, as a chat agent's run waits for each user message. A
  separate client process (an application's web tier) sends each run's next signal once the
  previous turn's step is recorded (``handle.wait(step=...)``, as an agent client would), for
  every run at once. Reported: turns per second over the client's whole session, and
  signal -> resume latency (the client's ``time.time()`` in the payload to the start of the step
  after the wait, read from the steps table).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

from iterflow import Context, create_engine, define_flow

from .stats import Monitor, process_cpu_s, summarize_ms, with_app_name
from .workloads import Env, WorkloadError, run_child, wait_all_done, wait_until

# iterations at each end of the long loop that the per-iteration figures compare
WINDOW = 100


# -- flows -----------------------------------------------------------------------------------
async def _tick() -> list[float]:
    """When the iteration's step started, and this process's CPU seconds then (the worker runs
    in the benchmark's process)."""
    return [time.time(), process_cpu_s()]


async def _wall_clock() -> float:
    return time.time()


@define_flow("bench_long_loop")
async def long_loop(ctx: Context, iterations: int) -> int:
    for _ in range(iterations):
        await ctx.step("tick", _tick)
        await ctx.sleep("1ms")
    return iterations


@define_flow("bench_agent")
async def agent(ctx: Context, turns: int) -> int:
    await ctx.step("think-0", _wall_clock)
    for i in range(1, turns + 1):
        await ctx.signal("turn")
        await ctx.step(f"think-{i}", _wall_clock)
    return turns


# -- w9 ----------------------------------------------------------------------------------------
async def w9_long_loop(env: Env) -> dict[str, Any]:
    n = env.sizes.w9_iterations
    window = min(WINDOW, max(n // 2, 1))
    worker = env.worker(long_loop)
    client = env.engine("client")
    run = await client.handle(long_loop.name, long_loop.version).start(n)
    await client.stop()
    started = time.monotonic()
    async with env.monitor() as mon:
        await worker.listen()
        await _wait_loop(mon, env, run.run_id, n)
        elapsed = time.monotonic() - started
        rows = await mon.fetch(
            f'SELECT result FROM "{env.schema}".steps WHERE run_id = %s AND kind = %s ORDER BY seq',
            run.run_id, "step",
        )
    ticks = [(float(r[0][0]), float(r[0][1])) for r in rows]
    if len(ticks) != n:
        raise WorkloadError(f"long loop: expected {n} step records, found {len(ticks)}")
    first, last = _per_iteration(ticks[:window + 1]), _per_iteration(ticks[-window - 1:])
    return {
        "iterations": n, "window": window, "seconds": elapsed,
        "first_ms_per_iter": first[0], "last_ms_per_iter": last[0],
        "ratio_last_first": last[0] / first[0] if first[0] > 0 else float("nan"),
        "first_cpu_us_per_iter": first[1], "last_cpu_us_per_iter": last[1],
        "cpu_ratio_last_first": last[1] / first[1] if first[1] > 0 else float("nan"),
    }


def _per_iteration(ticks: list[tuple[float, float]]) -> tuple[float, float]:
    """Wall ms and worker CPU us per iteration between the first and the last tick given."""
    steps = max(len(ticks) - 1, 1)
    return ((ticks[-1][0] - ticks[0][0]) * 1000 / steps, (ticks[-1][1] - ticks[0][1]) * 1e6 / steps)


class _Progress:
    """A counter a waiting workload watches: stalled once it has not moved for ``stall_s``."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._last: int | None = None
        self._since = time.monotonic()

    def stalled(self, value: int) -> bool:
        now = time.monotonic()
        if value != self._last:
            self._last, self._since = value, now
        return now - self._since > self.stall_s


async def _wait_loop(mon: Monitor, env: Env, run_id: str, iterations: int) -> None:
    """Until the one run is terminal (done, else WorkloadError); progress is its step count,
    so a slow but moving loop is not taken for a stall."""
    progress = _Progress(env.sizes.stall_s)
    while True:
        ((status, steps),) = await mon.fetch(
            f'SELECT r.status, (SELECT count(*) FROM "{env.schema}".steps s WHERE s.run_id = r.id)'
            f' FROM "{env.schema}".runs r WHERE r.id = %s', run_id,
        )
        if status in ("done", "failed", "canceled"):
            if status != "done":
                raise WorkloadError(f"long loop: the run ended {status}")
            return
        if progress.stalled(steps):
            raise WorkloadError(f"long loop: no progress for {env.sizes.stall_s:g}s at {steps} records "
                                f"of {2 * iterations}")
        await asyncio.sleep(env.sizes.poll_s)


# -- w10 ---------------------------------------------------------------------------------------
async def _wait_turns(mon: Monitor, env: Env, runs: int, turns: int, talk: asyncio.Task[Any]) -> None:
    """Until every run has ended; progress is the turns taken (signals consumed), since all
    runs advance together and none ends before the last turns: a slow but moving session is
    not taken for a stall."""
    progress = _Progress(env.sizes.stall_s)
    while True:
        ((ended, taken),) = await mon.fetch(
            f'SELECT (SELECT count(*) FROM "{env.schema}".runs WHERE finished_at IS NOT NULL),'
            f' (SELECT count(*) FROM "{env.schema}".signals WHERE consumed_at IS NOT NULL)'
        )
        if ended >= runs:
            return
        if talk.done() and talk.exception() is not None:
            raise WorkloadError(f"agent client failed: {talk.exception()!r}")
        if progress.stalled(taken):
            raise WorkloadError(f"agent turns: no progress for {env.sizes.stall_s:g}s at {taken} of "
                                f"{runs * turns} turns, {ended} of {runs} runs ended")
        await asyncio.sleep(env.sizes.poll_s)


async def w10_agent_turns(env: Env) -> dict[str, Any]:
    runs, turns = env.sizes.w10_runs, env.sizes.w10_turns
    worker = env.worker(agent)
    client = env.engine("client")
    ids = [r.run_id for r in await client.handle(agent.name, agent.version).start_many([{"input": turns}] * runs)]
    await client.stop()
    async with env.monitor() as mon:
        await worker.listen()
        # every run has thought its first turn and waits for the user: the session starts warm
        await wait_until(mon, env, f"{runs} agent runs reaching their first ctx.signal",
                         lambda st: st.get("awaiting_signal", 0), runs)
        talk = asyncio.get_running_loop().create_task(run_child("benches.loops:agent_client_main", {
            "dsn": env.dsn, "schema": env.schema, "core": env.core, "app_prefix": env.app(""),
            "ids": ids, "turns": turns,
        }, "agent client"))
        await _wait_turns(mon, env, runs, turns, talk)
        await wait_all_done(mon, env, f"{runs} agent runs of {turns} turns", runs, watch=talk)
        session = await talk
        rows = await mon.fetch(
            f'SELECT run_id::text, seq, kind, result FROM "{env.schema}".steps'
            f" WHERE kind IN ('step', 'signal') ORDER BY run_id, seq"
        )
    latency = _signal_to_resume(rows)
    if len(latency) != runs * turns:
        raise WorkloadError(f"agent turns: expected {runs * turns} signal->resume pairs, found {len(latency)}")
    s = summarize_ms(latency)
    return {"turns_per_s": runs * turns / session["seconds"], "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"],
            "max_ms": s["max_ms"], "runs": runs, "turns": turns, **session}


def _signal_to_resume(rows: list[tuple[Any, ...]]) -> list[float]:
    """Per signal record, the start of the step right after it minus the payload's send time."""
    out = []
    for (run, _seq, kind, result), (run2, _seq2, kind2, result2) in zip(rows, rows[1:], strict=False):
        if run == run2 and kind == "signal" and kind2 == "step":
            out.append(float(result2) - float(result["sent"]))
    return out


async def _agent_client(spec: dict[str, Any]) -> dict[str, Any]:
    """The client process: every run's conversation at once; each next signal goes once the
    run recorded the previous turn's step."""
    engine = create_engine(with_app_name(spec["dsn"], spec["app_prefix"] + "client"), schema=spec["schema"],
                           core=spec["core"])
    handle = engine.handle(agent.name, agent.version)
    kinds: dict[str, int] = {}
    wait_s: list[float] = []
    slow: list[int] = []  # turns whose wait took over a second (a wake-up missed: the safety read found it)

    async def converse(run_id: str) -> None:
        for i in range(1, spec["turns"] + 1):
            t = time.monotonic()
            await handle.wait(run_id, step=f"think-{i - 1}", timeout=120)
            wait_s.append(time.monotonic() - t)
            if wait_s[-1] > 1.0:
                slow.append(i)
            res = await engine.signal(run_id, "turn", {"sent": time.time()})
            kinds[res.kind] = kinds.get(res.kind, 0) + 1
        await handle.result(run_id, timeout=120)

    try:
        await engine.client()
        t0 = time.monotonic()
        await asyncio.gather(*(converse(r) for r in spec["ids"]))
        return {"seconds": time.monotonic() - t0, "kinds": kinds, "client_wait": summarize_ms(wait_s),
                "slow_wait_turns": slow}
    finally:
        await engine.stop()


def agent_client_main() -> None:
    """Entry point of the agent client process: a JSON spec on stdin, a JSON result on stdout."""
    spec = json.loads(sys.stdin.read())
    logging.basicConfig(level=logging.ERROR)
    sys.stdout.write(json.dumps(asyncio.run(_agent_client(spec))))
