"""A run's timeline drawn to scale: one bar per step, sleep, signal wait and child run on a
time axis from the run's creation to its end (or now), as geometry an inline SVG draws.

When a bar starts. Sleeps, signal waits and child calls are recorded when the body reaches
them (``created_at``), so they start there. A step is recorded once it has an outcome, so its
own row cannot say when it began: its bar starts where the call before it (in call order)
ended, the earliest the body can have reached it (concurrent steps are drawn from the same
point). A received signal and a ``ctx.log`` are points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

WIDTH = 960
LABEL_WIDTH = 200
ROW_HEIGHT = 22
AXIS_HEIGHT = 28
TICKS = 6


@dataclass(frozen=True)
class Bar:
    label: str
    kind: str  # step | sleep | signal | invoke | child | log | received
    state: str  # done | failed | open | waiting | attempt | a run status for a child
    x: float
    y: float
    width: float  # 0 for a point
    title: str


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True)
class Timeline:
    bars: list[Bar]
    ticks: list[Tick]
    width: int
    height: int
    plot_left: int
    span: str


def build(run_created: datetime, run_end: datetime, steps: Sequence[Mapping[str, Any]],
          signals: Sequence[Mapping[str, Any]], children: Sequence[Mapping[str, Any]]) -> Timeline:
    """The timeline of one run; ``run_end`` is its finish (or now for a live run)."""
    spans = list(_step_spans(run_created, run_end, steps))
    spans += [(f"child {c['name']}@{c['version']}", "child", c["status"], c["created_at"],
               c["finished_at"] or run_end, f"child run {c['id']} ({c['status']})") for c in children]
    spans += [(f"signal {s['name']} received", "received", "done", s["received_at"], None,
               f"signal {s['name']!r} received {s['received_at']:%H:%M:%S.%f}"[:-3]) for s in signals]
    end = max([run_end, *(e for *_, e, _ in spans if e is not None)])
    total = max((end - run_created).total_seconds(), 1e-3)
    plot = WIDTH - LABEL_WIDTH - 10

    def x_of(at: datetime) -> float:
        return LABEL_WIDTH + max(0.0, (at - run_created).total_seconds()) / total * plot

    bars = []
    for i, (label, kind, state, start, stop, title) in enumerate(spans):
        x = x_of(start)
        width = 0.0 if stop is None else max(x_of(stop) - x, 2.0)
        bars.append(Bar(label[:32], kind, state, round(x, 1), AXIS_HEIGHT + i * ROW_HEIGHT, round(width, 1), title))
    ticks = [Tick(round(LABEL_WIDTH + plot * k / TICKS, 1), _offset(total * k / TICKS)) for k in range(TICKS + 1)]
    return Timeline(bars, ticks, WIDTH, AXIS_HEIGHT + max(len(bars), 1) * ROW_HEIGHT + 6, LABEL_WIDTH,
                    _offset(total))


def _step_spans(run_created: datetime, run_end: datetime, steps: Sequence[Mapping[str, Any]],
                ) -> list[tuple[str, str, str, datetime, datetime | None, str]]:
    out: list[tuple[str, str, str, datetime, datetime | None, str]] = []
    reached = run_created
    for s in sorted(steps, key=lambda s: (s["seq"], s["key"])):
        kind, created, finished = s["kind"], s["created_at"], s["finished_at"]
        if kind == "log":
            out.append(("log", "log", "done", created, None, f"ctx.log at {created:%H:%M:%S}"))
            continue
        start = min(created, reached) if kind == "step" else created
        stop = finished or (s["deadline"] if kind == "sleep" and s["deadline"] else None) or run_end
        state = "failed" if s["error"] and s["status"] == "done" else s["status"]
        tries = f", {s['attempts']} attempts" if s["attempts"] and s["attempts"] > 1 else ""
        out.append((f"{kind} {s['name']}", kind, state, start, stop,
                    f"{kind} {s['name']!r} [{s['key']}] {state}{tries}, {_offset((stop - start).total_seconds())}"))
        reached = max(reached, finished or created)
    return out


def _offset(seconds: float) -> str:
    """A duration for the axis: ``+850ms``, ``+12.5s``, ``+3m20s``, ``+2h05m``."""
    if seconds < 1:
        return f"+{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"+{seconds:.1f}s"
    td = timedelta(seconds=round(seconds))
    minutes, secs = divmod(int(td.total_seconds()), 60)
    if minutes < 60:
        return f"+{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"+{hours}h{minutes:02d}m"
