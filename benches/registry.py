"""The registry the runner reads: every workload, its title and the metrics it reports.

Above both workload modules (``workloads.py``, ``fanin.py``), so neither imports the other's
entries (tests/test_layers.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .fanin import w8_fan_in
from .loops import w9_long_loop, w10_agent_turns
from .workloads import (
    Env,
    Sizes,
    w1_burn_down,
    w2_burn_down,
    w3_latency,
    w4_sleep,
    w5_signals,
    w6_fan_out,
    w11_burn_down_keyed,
    w12_remote_child,
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # "higher" | "lower"
    optional: bool = False  # may be null (e.g. no local PostgreSQL processes to read CPU time from)


@dataclass(frozen=True)
class Workload:
    id: str
    title: Callable[[Sizes], str]
    run: Callable[[Env], Awaitable[dict[str, Any]]] | None
    metrics: tuple[Metric, ...]
    source: str | None = None  # metrics taken from another workload's result (w7 <- w1)


WORKLOADS: tuple[Workload, ...] = (
    Workload("w1", lambda s: f"burn-down {s.w1_flows:,} x 3 steps", w1_burn_down, (
        Metric("flows_per_s", "flows/s", "higher"), Metric("steps_per_s", "steps/s", "higher"))),
    Workload("w11", lambda s: f"burn-down {s.w1_flows:,} x 3 steps, 100 keys, 8 per key", w11_burn_down_keyed, (
        Metric("flows_per_s", "flows/s", "higher"), Metric("steps_per_s", "steps/s", "higher"))),
    Workload("w2", lambda s: f"burn-down {s.w2_flows:,} x 1 step", w2_burn_down, (
        Metric("flows_per_s", "flows/s", "higher"),)),
    Workload("w3", lambda s: f"latency @{s.w3_rate:g}/s for {s.w3_seconds:g}s", w3_latency, (
        Metric("p50_ms", "start->done p50 ms (db)", "lower"), Metric("p99_ms", "start->done p99 ms (db)", "lower"),
        Metric("client_p50_ms", "start->done p50 ms (client)", "lower"),
        Metric("client_p99_ms", "start->done p99 ms (client)", "lower"))),
    Workload("w4", lambda s: f"sleep {s.w4_flows:,}, wake {s.w4_min_s:g}-{s.w4_max_s:g}s after arm", w4_sleep, (
        Metric("p50_ms", "wake lateness p50 ms", "lower"), Metric("p99_ms", "wake lateness p99 ms", "lower"))),
    Workload("w5", lambda s: f"signals {s.w5_flows:,} @{s.w5_rate:g}/s", w5_signals, (
        Metric("p50_ms", "signal->resume p50 ms", "lower"), Metric("p99_ms", "signal->resume p99 ms", "lower"))),
    Workload("w6", lambda s: f"fan-out {s.w6_parents} x {s.w6_children}", w6_fan_out, (
        Metric("seconds", "seconds", "lower"),)),
    Workload("w7", lambda s: "cost (of w1's drain)", None, (
        Metric("xacts_per_step", "pg xacts/step", "lower"), Metric("wal_bytes_per_step", "WAL bytes/step", "lower"),
        Metric("connections", "connections held", "lower"),
        Metric("engine_cpu_us_per_step", "engine CPU us/step", "lower"),
        Metric("postgres_cpu_us_per_step", "postgres CPU us/step", "lower", optional=True)), source="w1"),
    Workload("w8", lambda s: f"fan-in {s.w8_flows:,} x 3 steps, {s.w8_flows:,} result() waiting", w8_fan_in, (
        Metric("flows_per_s_inproc", "flows/s, waiters in the worker (gather)", "higher"),
        Metric("ratio_inproc", "gather/db drain, waiters in the worker", "higher"),
        Metric("connections_inproc", "peak connections, waiters in the worker", "lower"),
        Metric("flows_per_s_subproc", "flows/s, waiters in a client process (gather)", "higher"),
        Metric("ratio_subproc", "gather/db drain, waiters in a client process", "higher"),
        Metric("connections_subproc", "peak connections, waiters in a client process", "lower"))),
    Workload("w9", lambda s: f"long loop: 1 run x {s.w9_iterations:,} x (step + 1ms sleep)", w9_long_loop, (
        Metric("first_ms_per_iter", "ms/iteration, first 100", "lower"),
        Metric("last_ms_per_iter", "ms/iteration, last 100", "lower"),
        Metric("ratio_last_first", "last/first", "lower"),
        Metric("first_cpu_us_per_iter", "engine CPU us/iteration, first 100", "lower"),
        Metric("last_cpu_us_per_iter", "engine CPU us/iteration, last 100", "lower"))),
    Workload("w10", lambda s: f"agent turns: {s.w10_runs:,} runs x {s.w10_turns:,} x (signal + step)",
             w10_agent_turns, (
                 Metric("turns_per_s", "turns/s", "higher"),
                 Metric("p50_ms", "signal->resume p50 ms", "lower"),
                 Metric("p99_ms", "signal->resume p99 ms", "lower"))),
    Workload("w12", lambda s: f"child in another worker: {s.w12_parents:,} parents @{s.w12_rate:g}/s",
             w12_remote_child, (
                 Metric("p50_ms", "child done->parent resumed p50 ms", "lower"),
                 Metric("p99_ms", "child done->parent resumed p99 ms", "lower"))),
)
