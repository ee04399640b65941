"""The worked examples in examples/, run end to end on a real PostgreSQL (every core).

Each example exposes its real durations (days) and a factory the tests call with milliseconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from examples import account_deletion, agent_loop, checkout_saga, multi_signer, onboarding

from iterflow import Code, Engine, RunCanceled, RunDetail, RunFailed

FAST = {"poll_interval": 0.05}


async def _until(engine: Engine, run_id: str, pred: Callable[[RunDetail], bool], timeout: float = 10.0) -> RunDetail:
    deadline = time.monotonic() + timeout
    while True:
        detail = await engine.status(run_id)
        assert detail is not None
        if pred(detail):
            return detail
        assert time.monotonic() < deadline, f"condition not reached; run is {detail.run.status}"
        await asyncio.sleep(0.02)


def _keys(detail: RunDetail, kinds: Sequence[str] = ("step", "sleep", "signal")) -> list[str]:
    """Recorded cursor keys in call order."""
    return [s["key"] for s in detail.steps if s["kind"] in kinds]


def _step(detail: RunDetail, key: str) -> dict[str, Any]:
    return next(s for s in detail.steps if s["key"] == key)


def _waiting_for(name: str) -> Callable[[RunDetail], bool]:
    return lambda d: d.run.status == "awaiting_signal" and d.run.waiting is not None and d.run.waiting.name == name


# -- onboarding ----------------------------------------------------------------------------------

async def test_onboarding_sleeps_then_takes_the_survey_score(make_engine):
    engine = await make_engine(onboarding.build_onboarding(sleep="300ms", survey_timeout="10s"), **FAST)
    handle = engine.handle("onboard")
    run = await handle.start({"user_id": "u_1", "email": "u1@example.com"}, idempotency_key="signup:u_1")
    assert (await handle.start({"user_id": "u_1", "email": "u1@example.com"}, idempotency_key="signup:u_1")) \
        .run_id == run.run_id

    sleeping = await _until(engine, run.run_id, lambda d: d.run.status == "sleeping")
    assert _keys(sleeping) == ["create-account", "sleep"]
    await _until(engine, run.run_id, _waiting_for("survey"))
    # the declared schema guards the webhook: a bad score is refused and nothing is stored
    bad = await engine.signal(run.run_id, "survey", {"score": 11})
    assert bad.kind == "invalid_payload" and [i["path"] for i in bad.issues] == ["score"]
    assert (await engine.signal(run.run_id, "survey", {"score": 9})).kind == "delivered"

    assert await handle.result(run.run_id, timeout=5) == {"account_id": "acct_u_1", "score": 9}
    assert _keys(await engine.status(run.run_id)) == ["create-account", "sleep", "signal:survey"]


async def test_onboarding_unanswered_survey_fails_with_signal_timeout(make_engine):
    engine = await make_engine(onboarding.build_onboarding(sleep="100ms", survey_timeout="200ms"), **FAST)
    handle = engine.handle("onboard")
    run = await handle.start({"user_id": "u_2", "email": "u2@example.com"})
    with pytest.raises(RunFailed) as info:
        await handle.result(run.run_id, timeout=5)
    assert info.value.code == Code.SIGNAL_TIMEOUT
    assert (await engine.signal(run.run_id, "survey", {"score": 3})).kind == "closed"


async def test_onboarding_with_reminder_handles_the_timeout(make_engine):
    engine = await make_engine(onboarding.build_onboarding_with_reminder(sleep="100ms", survey_timeout="1s"), **FAST)
    handle = engine.handle("onboard-with-reminder")
    silent = await handle.start({"user_id": "u_3", "email": "u3@example.com"})
    late = await handle.start({"user_id": "u_4", "email": "u4@example.com"})

    # u_4 answers only after the reminder, once the second wait is live (an answer sent while the run
    # is between the two waits is judged against the timed-out first one and refused as "expired")
    await _until(engine, late.run_id,
                 lambda d: _waiting_for("survey")(d) and any(s["key"] == "send-reminder" for s in d.steps))
    assert (await engine.signal(late.run_id, "survey", {"score": 7})).kind == "delivered"
    assert await handle.result(late.run_id, timeout=5) == {"account_id": "acct_u_4", "score": 7, "reminded": True}

    # u_3 never answers: one reminder, then the run finishes without a score instead of failing
    assert await handle.result(silent.run_id, timeout=5) == {"account_id": "acct_u_3", "score": None,
                                                            "reminded": True}
    detail = await engine.status(silent.run_id)
    assert _keys(detail) == ["create-account", "sleep", "signal:survey", "send-reminder", "signal:survey:1"]
    assert _step(detail, "signal:survey")["error"]["code"] == Code.SIGNAL_TIMEOUT
    assert _step(detail, "send-reminder")["result"] == {"to": "u3@example.com", "template": "survey-reminder"}


# -- checkout saga -------------------------------------------------------------------------------

def _order(order_id: str, card: str = "tok_visa") -> dict[str, Any]:
    return {"order_id": order_id, "sku": "mug", "quantity": 2, "amount_cents": 1800, "card_token": card}


async def _checkout_engine(make_engine, payments: Any, inventory: Any) -> Engine:
    return await make_engine(checkout_saga.build(payments, inventory, charge_base_delay="50ms"), **FAST)


async def test_checkout_retries_lost_responses_without_double_charging(make_engine):
    payments = checkout_saga.InMemoryPayments(lose_responses=2)
    inventory = checkout_saga.InMemoryInventory({"mug": 5})
    engine = await _checkout_engine(make_engine, payments, inventory)
    handle = engine.handle("checkout")
    run = await handle.start(_order("o_1"))

    assert await handle.result(run.run_id, timeout=10) == {"order_id": "o_1", "charge_id": "ch_1"}
    detail = await engine.status(run.run_id)
    assert _keys(detail) == ["reserve-inventory", "charge-card", "commit-inventory"]
    assert _step(detail, "charge-card")["attempts"] == 3
    # three calls reached the provider, all with the run's key: one charge
    assert payments.calls == 3
    assert payments.charges == {"ch_1": 1800}
    assert payments.idempotency_keys == {f"{run.run_id}:charge-card": "ch_1"}
    assert inventory.committed == [f"{run.run_id}:hold"] and inventory.stock == {"mug": 3}


async def test_checkout_decline_is_permanent_and_compensates_once(make_engine):
    payments = checkout_saga.InMemoryPayments()
    inventory = checkout_saga.InMemoryInventory({"mug": 5})
    engine = await _checkout_engine(make_engine, payments, inventory)
    handle = engine.handle("checkout")
    run = await handle.start(_order("o_2", card=checkout_saga.InMemoryPayments.DECLINED_CARD))

    with pytest.raises(RunFailed) as info:
        await handle.result(run.run_id, timeout=10)
    assert info.value.code == Code.STEP_FAILED
    assert "CardDeclined" in info.value.message
    detail = await engine.status(run.run_id)
    assert _keys(detail) == ["reserve-inventory", "charge-card", "release-inventory"]
    assert _step(detail, "charge-card")["attempts"] == 1  # classify said permanent: no retries
    assert _step(detail, "release-inventory")["attempts"] == 1
    assert payments.calls == 1 and payments.charges == {} and payments.refunds == {}
    assert inventory.released == [f"{run.run_id}:hold"] and inventory.stock == {"mug": 5}


class _ExpiredHolds(checkout_saga.InMemoryInventory):
    def commit(self, hold_id: str) -> None:
        raise checkout_saga.ReservationExpired(f"hold {hold_id} lapsed")


async def test_checkout_failure_after_charge_refunds_then_releases(make_engine):
    payments = checkout_saga.InMemoryPayments()
    inventory = _ExpiredHolds({"mug": 5})
    engine = await _checkout_engine(make_engine, payments, inventory)
    handle = engine.handle("checkout")
    run = await handle.start(_order("o_3"))

    with pytest.raises(RunFailed) as info:
        await handle.result(run.run_id, timeout=10)
    assert "ReservationExpired" in info.value.message
    detail = await engine.status(run.run_id)
    assert _keys(detail) == ["reserve-inventory", "charge-card", "commit-inventory", "refund", "release-inventory"]
    assert payments.refunds == {_step(detail, "refund")["result"]: "ch_1"}
    assert payments.idempotency_keys[f"{run.run_id}:refund"] == _step(detail, "refund")["result"]
    assert inventory.stock == {"mug": 5}


async def test_checkout_same_idempotency_key_is_the_same_run(make_engine):
    payments = checkout_saga.InMemoryPayments()
    inventory = checkout_saga.InMemoryInventory({"mug": 5})
    engine = await _checkout_engine(make_engine, payments, inventory)
    handle = engine.handle("checkout")
    first = await handle.start(_order("o_4"), idempotency_key="checkout:o_4")
    again = await handle.start(_order("o_4"), idempotency_key="checkout:o_4")
    assert (first.created, again.created) == (True, False)
    assert again.run_id == first.run_id
    await handle.result(first.run_id, timeout=10)
    assert (await handle.start(_order("o_4"), idempotency_key="checkout:o_4")).run_id == first.run_id
    assert len(payments.charges) == 1 and inventory.stock == {"mug": 3}


# -- multi-signer --------------------------------------------------------------------------------

CONTRACT = {"contract_id": "c_1", "counterparty": "ACME", "value_cents": 5_000_000}


async def test_multi_signer_consumes_out_of_order_approvals_in_declared_order(make_engine):
    engine = await make_engine(multi_signer.signing, **FAST)
    handle = engine.handle("contract-signing")
    run = await handle.start(CONTRACT)

    # the CEO and finance answer first; the run cannot be waiting on them yet
    assert (await engine.signal(run.run_id, "ceo", {"signer": "cleo", "signature_id": "sig_9"})).kind == "buffered"
    assert (await engine.signal(run.run_id, "finance", {"signer": "fin", "budget_code": "OP-2024"})).kind \
        == "buffered"
    await _until(engine, run.run_id, _waiting_for("legal"))
    # delivered, or buffered if the early signals' wake-up re-claimed the run in the meantime
    assert (await engine.signal(run.run_id, "legal", {"signer": "lee"})).kind in ("delivered", "buffered")

    out = await handle.result(run.run_id, timeout=5)
    assert out["signers"] == [{"role": "legal", "by": "lee"}, {"role": "finance", "by": "fin"},
                              {"role": "ceo", "by": "cleo"}]
    assert out["sealed"] is True
    detail = await engine.status(run.run_id)
    assert _keys(detail) == ["open-envelope", "signal:legal", "signal:finance", "signal:ceo", "seal-envelope"]
    received = [s["name"] for s in detail.signals]
    consumed = [s["name"] for s in sorted(detail.signals, key=lambda s: s["consumed_at"])]
    assert received == ["ceo", "finance", "legal"]
    assert consumed == ["legal", "finance", "ceo"]


async def test_multi_signer_refuses_invalid_approvals_and_stores_nothing(make_engine):
    engine = await make_engine(multi_signer.signing, **FAST)
    handle = engine.handle("contract-signing")
    run = await handle.start(CONTRACT)
    await _until(engine, run.run_id, _waiting_for("legal"))

    bad_finance = await engine.signal(run.run_id, "finance", {"signer": "fin", "budget_code": "opex"})
    assert bad_finance.kind == "invalid_payload"
    assert [i["path"] for i in bad_finance.issues] == ["budget_code"]
    bad_legal = await engine.signal(run.run_id, "legal", {"redlines": "none"})
    assert bad_legal.kind == "invalid_payload"
    assert {i["path"] for i in bad_legal.issues} == {"signer", "redlines"}

    detail = await engine.status(run.run_id)
    assert detail.signals == []
    assert detail.run.status == "awaiting_signal" and detail.run.waiting.name == "legal"


# -- human-in-the-loop agent --------------------------------------------------------------------

async def test_agent_loop_three_human_turns_then_self_approves(make_engine):
    seen: list[tuple[str, ...]] = []

    def think(question: str, feedback: Sequence[str]) -> agent_loop.Thought:
        seen.append(tuple(feedback))
        return {"draft": f"{question} v{len(feedback)}", "confident": len(feedback) >= 3}

    engine = await make_engine(listen=False, **FAST)
    engine.register(agent_loop.build(engine, think))
    await engine.listen()
    handle = engine.handle("agent")
    run = await handle.start({"question": "plan"})

    for turn in range(3):
        # waiting again, with every earlier reply consumed: this turn's wait is the live one
        await _until(engine, run.run_id, lambda d, n=turn: _waiting_for("human")(d) and len(d.signals) == n
                     and all(s["consumed_at"] is not None for s in d.signals))
        assert (await engine.signal(run.run_id, "human", {"feedback": f"fix {turn}"})).kind == "delivered"

    assert await handle.result(run.run_id, timeout=10) == {"answer": "plan v3", "turns": 4, "approved_by": "agent"}
    # the model ran once per turn, never again on replay
    assert seen == [(), ("fix 0",), ("fix 0", "fix 1"), ("fix 0", "fix 1", "fix 2")]
    detail = await engine.status(run.run_id)
    assert _keys(detail) == [
        "think", "signal:human", "think:1", "signal:human:1", "think:2", "signal:human:2",
        "think:3", "self-approve", "signal:human:3",
    ]
    # the self-signal arrived while the run was running: buffered, then taken at once by the wait
    assert _step(detail, "self-approve")["result"] == "buffered"
    last = detail.signals[-1]
    assert last["payload"] == {"skip": True, "by": "agent"} and last["idempotency_key"] == "self-approve:3"
    assert last["consumed_by"] == "signal:human:3"


# -- account deletion ----------------------------------------------------------------------------

async def test_account_deletion_undo_during_grace_period(make_engine):
    accounts = account_deletion.InMemoryAccounts(["u_1"])
    engine = await make_engine(account_deletion.build(accounts, grace="1s"), **FAST)
    deletions = engine.handle("account-deletion")
    request = account_deletion.DeletionRequest(user_id="u_1", email="u1@example.com")
    run_id = await account_deletion.schedule_deletion(deletions, request)
    assert await account_deletion.schedule_deletion(deletions, request) == run_id  # double click: one run

    await _until(engine, run_id, lambda d: d.run.status == "sleeping")
    await account_deletion.undo_deletion(engine, run_id)
    with pytest.raises(RunCanceled) as info:
        await deletions.result(run_id, timeout=5)
    assert info.value.message == "user undid the deletion"

    await asyncio.sleep(1.2)  # past the original deadline: nothing wakes the run, the account survives
    detail = await engine.status(run_id)
    assert detail.run.status == "canceled"
    assert detail.run.error["code"] == Code.RUN_CANCELED
    assert detail.run.error["message"] == "user undid the deletion"
    assert _keys(detail) == ["notify-scheduled", "sleep"]
    assert accounts.users == {"u_1"}
    assert accounts.outbox == [("u1@example.com", "deletion-scheduled")]


async def test_account_deletion_runs_after_the_grace_period(make_engine):
    accounts = account_deletion.InMemoryAccounts(["u_2", "u_3"])
    engine = await make_engine(account_deletion.build(accounts, grace="200ms"), **FAST)
    deletions = engine.handle("account-deletion")
    run_id = await account_deletion.schedule_deletion(
        deletions, account_deletion.DeletionRequest(user_id="u_2", email="u2@example.com"))
    out = await deletions.result(run_id, timeout=5)
    assert out["user_id"] == "u_2"
    assert accounts.users == {"u_3"}
    assert _keys(await engine.status(run_id)) == ["notify-scheduled", "sleep", "delete-account"]
