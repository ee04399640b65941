"""``iterflow demo``: one real multi-step flow on a real PostgreSQL, narrated as it runs.

An order-fulfilment body flow reserves stock, charges a card (the first attempt fails on
purpose so the retry is visible), waits out a durable one-second hold, hands packing to a
child flow, then waits for a ``shipped`` signal that the demo itself sends from outside, the
way a carrier webhook would. Every line is printed as it happens; at the end the demo prints
the output, the step timeline read back from ``engine.status()``, and timings.

Everything lives in its own schema (``iterflow_demo``), created by the normal migrations; the
demo never drops or rewrites anything, so running it against a database you use is safe.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .builder import flow
from .context import Context
from .embedded import database_url
from .engine import Engine, create_engine
from .errors import EmbeddedUnavailable, IterflowError
from .flow import define_flow
from .migrate import migrate
from .steps import StepArgs
from .types import TERMINAL

SCHEMA = "iterflow_demo"
SIGNAL_DELAY = 0.5  # seconds between "the run is waiting" and the carrier's webhook firing


class _Clock:
    """Prints lines prefixed with the seconds since the demo started."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.t0 = time.monotonic()
        self.out = out

    def say(self, message: str) -> None:
        self.out(f"[{time.monotonic() - self.t0:6.2f}s] {message}")


def _build_flows(clock: _Clock) -> tuple[Any, Any]:
    """The demo's two flows. Step functions print; code between ctx calls does not (it re-runs
    on every replay, so a print there would repeat)."""

    def pick(s: StepArgs) -> dict[str, Any]:
        order = s.input
        clock.say(f"  child pack-order: picked {sum(i['qty'] for i in order['items'])} item(s)")
        return {**order, "picked": True}

    def label(s: StepArgs) -> dict[str, Any]:
        tracking = f"TRK-{s.input['order_id'][-6:].upper()}"
        clock.say(f"  child pack-order: printed label {tracking}")
        return {"tracking": tracking, "boxes": 1}

    pack = (
        flow("demo-pack-order")
        .version(1)
        .step("pick", pick)
        .step("label", label)
        .output(lambda v: v.input)
        .build()
    )

    def reserve_stock(order: dict[str, Any]) -> Callable[[StepArgs], dict[str, Any]]:
        def run(s: StepArgs) -> dict[str, Any]:
            lines = [f"{i['qty']} x {i['sku']}" for i in order["items"]]
            clock.say(f"step reserve-stock: reserved {', '.join(lines)}")
            return {"reservation": f"RSV-{order['order_id'][-6:].upper()}"}
        return run

    def charge_card(order: dict[str, Any]) -> Callable[[StepArgs], dict[str, Any]]:
        def run(s: StepArgs) -> dict[str, Any]:
            if s.attempt == 1:
                clock.say(f"step charge-card: attempt {s.attempt} -> card network timeout (simulated, transient)")
                raise ConnectionError("card network timeout (simulated)")
            clock.say(f"step charge-card: attempt {s.attempt} -> charged {order['total']:.2f} EUR")
            return {"charge_id": f"ch_{uuid.uuid4().hex[:10]}", "amount": order["total"], "attempt": s.attempt}
        return run

    def confirm(order: dict[str, Any], shipped: dict[str, Any]) -> Callable[[], str]:
        def run() -> str:
            clock.say(f"step send-confirmation: emailed {order['email']} (carrier {shipped['carrier']})")
            return "sent"
        return run

    @define_flow("demo-order-fulfilment", version=1)
    async def fulfil(ctx: Context, order: dict[str, Any]) -> dict[str, Any]:
        reservation = await ctx.step("reserve-stock", reserve_stock(order))
        charge = await ctx.step("charge-card", charge_card(order), retries=2, base_delay="200ms",
                                backoff="fixed", timeout="10s")
        await ctx.sleep("1s")  # a durable hold (e.g. a fraud-check window): survives restarts
        parcel = await ctx.invoke(pack, {"order_id": order["order_id"], "items": order["items"]})
        shipped = await ctx.signal("shipped", timeout="30s")
        email = await ctx.step("send-confirmation", confirm(order, shipped))
        return {"order_id": order["order_id"], **reservation, "charge": charge, "parcel": parcel,
                "shipped": shipped, "confirmation": email}

    return fulfil, pack


def _fmt_time(value: Any, origin: datetime | None) -> str:
    if not isinstance(value, datetime) or origin is None:
        return "-"
    return f"+{(value - origin).total_seconds():.3f}s"


def _waiting_line(status: str, waiting: Any) -> str:
    return f"{status} ({waiting})" if waiting is not None and status not in TERMINAL else status


async def _watch(engine: Engine, run_id: str, clock: _Clock, deadline: float) -> str:
    """Narrate the run's status changes and send the ``shipped`` signal once it waits for it."""
    last = None
    signal_task: asyncio.Task[None] | None = None

    async def send_signal() -> None:
        await asyncio.sleep(SIGNAL_DELAY)
        clock.say("webhook: carrier reports the parcel shipped -> engine.signal(run_id, 'shipped', ...)")
        res = await engine.signal(run_id, "shipped", {"carrier": "DHL", "eta_days": 2},
                                  idempotency_key=f"carrier-event:{run_id}")
        clock.say(f"webhook: signal result = {res.kind!r}")

    try:
        while time.monotonic() < deadline:
            detail = await engine.status(run_id)
            if detail is None:
                raise RuntimeError(f"run {run_id} disappeared")
            run = detail.run
            line = _waiting_line(run.status, run.waiting)
            if line != last:
                clock.say(f"run status: {line}")
                last = line
            if (run.status == "awaiting_signal" and run.waiting is not None and run.waiting.name == "shipped"
                    and signal_task is None):
                signal_task = asyncio.get_running_loop().create_task(send_signal())
            if run.status in TERMINAL:
                if signal_task is not None:
                    await signal_task
                return run.status
            await asyncio.sleep(0.02)
        raise TimeoutError(f"run {run_id} did not finish within the demo's time budget")
    finally:
        if signal_task is not None and not signal_task.done():
            signal_task.cancel()


def _note(step: Any, origin: datetime | None) -> str:
    if step.get("error"):
        return f"error {step['error'].get('code')}"
    if step["kind"] == "sleep" and step.get("deadline") is not None:
        return f"until {_fmt_time(step['deadline'], origin)}"
    if step["kind"] == "invoke" and step.get("child_id"):
        return f"child {str(step['child_id'])[:13]}..."
    return ""


def _print_timeline(detail: Any, out: Callable[[str], None]) -> None:
    run = detail.run
    origin = run.created_at
    out("")
    out(f"step timeline of run {run.run_id} (engine.status; times relative to the run's creation):")
    out(f"  {'#':>2}  {'cursor key':<26} {'kind':<7} {'status':<8} {'tries':>5}  {'recorded':>9}  "
        f"{'finished':>9}  note")
    for s in detail.steps:
        out(f"  {s['seq']:>2}  {s['key']:<26} {s['kind']:<7} {s['status']:<8} {s['attempts'] or '':>5}  "
            f"{_fmt_time(s.get('created_at'), origin):>9}  {_fmt_time(s.get('finished_at'), origin):>9}  "
            f"{_note(s, origin)}")
    if detail.signals:
        out("signals:")
        for sig in detail.signals:
            out(f"  {sig['name']!r} received {_fmt_time(sig['received_at'], origin)}, consumed "
                f"{_fmt_time(sig['consumed_at'], origin)} by {sig['consumed_by']}")
    if detail.children:
        out("children:")
        for child in detail.children:
            out(f"  {child['id']}  {child['name']}@{child['version']}  {child['status']}  "
                f"(finished {_fmt_time(child['finished_at'], origin)})")


async def run_demo(dsn: str | None = None, *, out: Callable[[str], None] | None = None) -> int:
    """Run the demo; returns a process exit code (0 when the order was fulfilled)."""
    if out is None:
        def out(line: str) -> None:
            print(line, flush=True)
    assert out is not None
    try:
        url = database_url(dsn, announce=out)
    except EmbeddedUnavailable as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    clock = _Clock(out)
    version = await migrate(url, SCHEMA)
    clock.say(f"migrations applied: schema {SCHEMA!r} is at version {version}")

    fulfil, pack = _build_flows(clock)
    # A step timeout and a retention window keep the engine's startup warnings quiet, and
    # retention keeps the demo schema from growing with every run.
    engine = create_engine(url, schema=SCHEMA, concurrency=4, default_step_timeout="30s",
                           retention={"runs_older_than": "7d", "events_older_than": "7d"},
                           poll_interval="200ms")
    handle = engine.register(fulfil)
    engine.register(pack)
    order_id = f"ord_{uuid.uuid4().hex[:12]}"
    order = {"order_id": order_id, "email": "ada@example.com", "total": 42.5,
             "items": [{"sku": "mug-blue", "qty": 2}, {"sku": "tea-earl-grey", "qty": 1}]}
    try:
        await engine.listen()
        clock.say(f"worker listening ({engine.core.name} core, concurrency {engine.settings.concurrency})")
        started = time.monotonic()
        res = await handle.start(order, idempotency_key=f"order:{order_id}", tags=["demo"])
        clock.say(f"started run {res.run_id} of demo-order-fulfilment@1 (created={res.created})")
        status = await _watch(engine, res.run_id, clock, deadline=time.monotonic() + 60)
        elapsed = time.monotonic() - started
        if status != "done":
            detail = await engine.status(res.run_id)
            error = detail.run.error if detail is not None else None
            out(f"run ended {status}: {error}")
            return 1
        output = await handle.result(res.run_id, timeout=5)
        out("")
        out("output:")
        for key, value in output.items():
            out(f"  {key}: {value}")
        detail = await engine.status(res.run_id)
        assert detail is not None
        _print_timeline(detail, out)
        run = detail.run
        db_total = (run.updated_at - run.created_at).total_seconds()
        out("")
        out(f"timings: start -> done {elapsed:.2f}s wall clock ({db_total:.2f}s by the database clock), "
            f"of which ~1.0s durable sleep and ~{SIGNAL_DELAY:.1f}s waiting for the webhook, "
            f"plus the 200ms retry backoff")
        out(f"inspect it again with: iterflow runs show {res.run_id} --schema {SCHEMA}")
        return 0
    except IterflowError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 1
    finally:
        await engine.stop()


def main() -> None:
    raise SystemExit(asyncio.run(run_demo(None)))


if __name__ == "__main__":
    main()
