"""Signals (docs/signals.md): the six result kinds, buffering order, idempotency, timeouts."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel

from iterflow import Code, FlowRuntimeError, RunFailed, RunNotFound, define_flow, flow


class Approval(BaseModel):
    by: str
    ok: bool


@define_flow("two-signals")
async def two_signals(ctx, _inp):
    first = await ctx.signal("note")
    second = await ctx.signal("note")
    return [first, second]


@define_flow("typed-signal", signals={"approve": Approval})
async def typed_signal(ctx, _inp):
    approval = await ctx.signal("approve")
    return {"by": approval.by, "type": type(approval).__name__}


@define_flow("timed-signal")
async def timed_signal(ctx, _inp):
    try:
        return await ctx.signal("answer", timeout="300ms")
    except FlowRuntimeError as exc:  # the timeout is catchable
        return {"timed_out": getattr(exc, "code", None)}


async def _wait_status(engine, run_id, status, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        detail = await engine.status(run_id)
        if detail.run.status == status:
            return detail
        assert asyncio.get_running_loop().time() < deadline, f"run stuck in {detail.run.status}"
        await asyncio.sleep(0.02)


async def test_delivered_when_waiting_and_buffered_in_order_when_early(make_engine):
    engine = await make_engine(two_signals)
    handle = engine.handle("two-signals")
    early = await handle.start(None)
    # both arrive before the run asks: buffered, consumed oldest first
    r1 = await engine.signal(early.run_id, "note", 1)
    r2 = await engine.signal(early.run_id, "note", 2)
    assert {r1.kind, r2.kind} <= {"buffered", "delivered"}
    assert await handle.result(early.run_id, timeout=5) == [1, 2]

    late = await handle.start(None)
    await _wait_status(engine, late.run_id, "awaiting_signal")
    assert (await engine.signal(late.run_id, "note", "a")).kind == "delivered"
    await asyncio.sleep(0)
    await engine.signal(late.run_id, "note", "b")
    assert await handle.result(late.run_id, timeout=5) == ["a", "b"]


async def test_buffered_before_any_worker(make_engine):
    client = await make_engine(listen=False)
    handle = client.handle("two-signals")
    run = await handle.start(None)
    assert (await client.signal(run.run_id, "note", "x")).kind == "buffered"
    assert (await client.signal(run.run_id, "note", "y")).kind == "buffered"
    await make_engine(two_signals)
    assert await handle.result(run.run_id, timeout=5) == ["x", "y"]


async def test_duplicate_key_is_duplicate_for_the_life_of_the_run(make_engine):
    engine = await make_engine(two_signals)
    handle = engine.handle("two-signals")
    run = await handle.start(None)
    assert (await engine.signal(run.run_id, "note", 1, idempotency_key="k1")).kind in ("buffered", "delivered")
    assert (await engine.signal(run.run_id, "note", 99, idempotency_key="k1")).kind == "duplicate"
    await _wait_status(engine, run.run_id, "awaiting_signal")
    # consumed already; the key is still remembered
    await _wait_until_consumed(engine, run.run_id, 1)
    assert (await engine.signal(run.run_id, "note", 99, idempotency_key="k1")).kind == "duplicate"
    await engine.signal(run.run_id, "note", 2, idempotency_key="k2")
    assert await handle.result(run.run_id, timeout=5) == [1, 2]
    assert (await engine.signal(run.run_id, "note", 3)).kind == "closed"


async def _wait_until_consumed(engine, run_id, count):
    for _ in range(250):
        detail = await engine.status(run_id)
        if sum(1 for s in detail.signals if s["consumed_at"] is not None) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("signal never consumed")


async def test_unknown_run_raises_not_found(make_engine):
    engine = await make_engine(listen=False)
    with pytest.raises(RunNotFound) as info:
        await engine.signal("00000000-0000-0000-0000-000000000000", "x", 1)
    assert info.value.code == Code.RUN_NOT_FOUND


async def test_invalid_payload_stores_nothing_and_schema_type_reaches_body(make_engine):
    engine = await make_engine(typed_signal)
    handle = engine.handle("typed-signal")
    run = await handle.start(None)
    bad = await engine.signal(run.run_id, "approve", {"by": 5})
    assert bad.kind == "invalid_payload"
    assert {i["path"] for i in bad.issues} == {"by", "ok"}
    assert (await engine.status(run.run_id)).signals == []
    assert (await engine.signal(run.run_id, "approve", {"by": "ann", "ok": True})).kind in ("buffered", "delivered")
    assert await handle.result(run.run_id, timeout=5) == {"by": "ann", "type": "Approval"}


async def test_timeout_raises_signal_timeout_then_late_signal_is_expired(make_engine):
    engine = await make_engine(timed_signal)
    handle = engine.handle("timed-signal")
    run = await handle.start(None)
    assert await handle.result(run.run_id, timeout=5) == {"timed_out": Code.SIGNAL_TIMEOUT}
    assert (await engine.signal(run.run_id, "answer", 1)).kind == "closed"


async def test_expired_while_run_still_live(make_engine):
    @define_flow("expire-then-sleep")
    async def body(ctx, _inp):
        try:
            await ctx.signal("answer", timeout="200ms")
        except FlowRuntimeError:
            pass
        await ctx.signal("never")

    engine = await make_engine(body)
    run = await engine.handle("expire-then-sleep").start(None)
    detail = await _wait_status(engine, run.run_id, "awaiting_signal")
    while detail.run.waiting.name != "never":
        await asyncio.sleep(0.02)
        detail = await engine.status(run.run_id)
    assert (await engine.signal(run.run_id, "answer", 1)).kind == "expired"


async def test_uncaught_timeout_fails_run_with_code(make_engine):
    strict = flow("strict-signal").signal("answer", timeout="200ms").build()
    engine = await make_engine(strict)
    run = await engine.handle("strict-signal").start(None)
    with pytest.raises(RunFailed) as info:
        await engine.handle("strict-signal").result(run.run_id, timeout=5)
    assert info.value.code == Code.SIGNAL_TIMEOUT


async def test_signal_payload_invalid_at_consumption(make_engine):
    @define_flow("consume-validate")
    async def body(ctx, _inp):
        return await ctx.signal("data", schema=Approval)

    engine = await make_engine(body)
    handle = engine.handle("consume-validate")
    run = await handle.start(None)
    await engine.signal(run.run_id, "data", {"nope": 1})
    with pytest.raises(RunFailed) as info:
        await handle.result(run.run_id, timeout=5)
    assert info.value.code == Code.SIGNAL_PAYLOAD_INVALID


@pytest.mark.parametrize("attempt", range(8))
async def test_delivery_at_the_deadline_never_lost_nor_resumed_twice(make_engine, attempt):
    """Race a delivery against the timeout: exactly one of them wins, consistently."""

    @define_flow(f"race-{attempt}")
    async def body(ctx, _inp):
        try:
            got = await ctx.signal("ping", timeout="250ms")
            outcome = {"got": got}
        except FlowRuntimeError as exc:
            outcome = {"timeout": exc.code}
        await ctx.step("after", lambda: 1)
        return outcome

    engine = await make_engine(body, poll_interval=0.02)
    handle = engine.handle(f"race-{attempt}")
    run = await handle.start(None)
    await _wait_status(engine, run.run_id, "awaiting_signal")
    await asyncio.sleep(0.22 + attempt * 0.01)
    res = await engine.signal(run.run_id, "ping", "p")
    out = await handle.result(run.run_id, timeout=5)
    detail = await engine.status(run.run_id)
    consumed = [s for s in detail.signals if s["consumed_at"] is not None]
    if "got" in out:
        assert res.kind in ("delivered", "buffered")
        assert len(consumed) == 1
    else:
        assert out == {"timeout": Code.SIGNAL_TIMEOUT}
        # the timeout committed first, so the signal was refused rather than silently dropped
        assert res.kind in ("expired", "closed")
        assert consumed == []
    assert [s["key"] for s in detail.steps if s["kind"] == "step"] == ["after"]


async def test_racing_waits_on_two_names_wake_on_either(make_engine):
    @define_flow("approve-or-reject")
    async def decide(ctx, _inp):
        approve = asyncio.ensure_future(ctx.signal("approve"))
        reject = asyncio.ensure_future(ctx.signal("reject"))
        done, pending = await asyncio.wait({approve, reject}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return "approved" if approve in done else "rejected"

    engine = await make_engine(decide)
    handle = engine.handle("approve-or-reject")
    run = await handle.start(None)
    await _wait_status(engine, run.run_id, "awaiting_signal")
    res = await engine.signal(run.run_id, "reject", {"why": "no"})
    assert res.kind == "delivered" and res.cursor_key == "signal:reject"
    assert await handle.result(run.run_id, timeout=5) == "rejected"


async def test_signal_raced_against_a_sleep_is_delivered(make_engine):
    @define_flow("signal-or-sleep")
    async def race(ctx, _inp):
        sig = asyncio.ensure_future(ctx.signal("go"))
        nap = asyncio.ensure_future(ctx.sleep("1h"))
        done, pending = await asyncio.wait({sig, nap}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return "signal" if sig in done else "slept"

    engine = await make_engine(race)
    handle = engine.handle("signal-or-sleep")
    run = await handle.start(None)
    await _wait_status(engine, run.run_id, "sleeping")
    assert (await engine.signal(run.run_id, "go", 1)).kind == "delivered"
    assert await handle.result(run.run_id, timeout=5) == "signal"


async def _waiting_without_a_worker(make_engine, flow):
    """A run of ``flow`` suspended in ``ctx.signal`` whose worker has stopped, and a client-only
    engine: signals delivered now wait for a claim the test makes itself."""
    worker = await make_engine(flow)
    handle = worker.handle(flow.name)
    run = await handle.start(None)
    await _wait_status(worker, run.run_id, "awaiting_signal")
    await worker.stop()
    return handle, run, await make_engine(flow, listen=False)


@pytest.mark.parametrize("timeout", [None, "1h"], ids=["untimed", "timed"])
async def test_the_claim_that_wakes_a_run_resolves_its_signal(make_engine, timeout):
    """A woken run comes back from the claim with the delivered signal already consumed and
    recorded at the wait's cursor key, so it resumes without another write first."""

    @define_flow("claim-resolves")
    async def wait_once(ctx, _inp):
        return await ctx.signal("go", timeout=timeout)

    _handle, run, client = await _waiting_without_a_worker(make_engine, wait_once)
    delivered = await client.signal(run.run_id, "go", {"n": 7})
    assert delivered.kind == "delivered"
    [claimed] = await client.core.claim(["claim-resolves"], 5, "probe", 60_000)
    rec = claimed.history[delivered.cursor_key]
    assert (rec.kind, rec.name, rec.status, rec.result, rec.deadline) == ("signal", "go", "done", {"n": 7}, None)
    detail = await client.status(run.run_id)
    assert [(s["name"], s["consumed_by"]) for s in detail.signals] == [("go", delivered.cursor_key)]
    assert await client.core.finish(run.run_id, claimed.lease_token, "done", None, None)


async def test_signals_racing_in_one_wake_are_each_resolved_once(make_engine):
    """Both names of a raced wait arrive before the run is claimed: the claim consumes one
    entry of each, and a later entry of the same name stays buffered for a later wait."""

    @define_flow("both-then-again")
    async def both(ctx, _inp):
        a = asyncio.ensure_future(ctx.signal("a"))
        b = asyncio.ensure_future(ctx.signal("b"))
        first = await asyncio.gather(a, b)
        return [*first, await ctx.signal("a")]

    handle, run, client = await _waiting_without_a_worker(make_engine, both)
    for name, value in (("a", 1), ("b", 2), ("a", 3)):
        await client.signal(run.run_id, name, value)
    [claimed] = await client.core.claim(["both-then-again"], 5, "probe", 60_000)
    done = sorted((r.name, r.result) for r in claimed.history.values() if r.kind == "signal")
    assert done == [("a", 1), ("b", 2)]
    await client.core.finish(run.run_id, claimed.lease_token, "failed", None, None)

    again = await handle.start(None)
    await make_engine(both)
    for name, value in (("b", 20), ("a", 10), ("a", 30)):
        await client.signal(again.run_id, name, value)
    assert await handle.result(again.run_id, timeout=5) == [10, 20, 30]


async def test_only_the_payload_the_wait_will_consume_is_delivered(make_engine):
    """Two signals of one name reach a run waiting once for that name before it resumes: the
    first is `delivered` (the wait consumes it), the second `buffered` (it stays in the inbox
    for a later wait), never two `delivered` for one wait."""

    @define_flow("one-wait")
    async def one_wait(ctx, _inp):
        return await ctx.signal("go")

    handle, run, client = await _waiting_without_a_worker(make_engine, one_wait)
    first = await client.signal(run.run_id, "go", 1)
    second = await client.signal(run.run_id, "go", 2)
    assert (first.kind, second.kind) == ("delivered", "buffered")
    await make_engine(one_wait)
    assert await handle.result(run.run_id, timeout=5) == 1
    detail = await client.status(run.run_id)
    assert [(s["payload"], s["consumed_at"] is not None) for s in detail.signals] == [(1, True), (2, False)]
