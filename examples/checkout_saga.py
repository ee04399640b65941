"""Checkout saga: reserve stock, charge the card, commit the stock; undo what was done if a step fails.

Why this shape:

- Each side effect is its own step, so a crash after the charge resumes at the commit: the
  recorded charge is never redone, and the compensation knows exactly what to undo.
- Steps run *at least once* (a worker can die after the provider charged but before the result
  was stored). Every call to the outside therefore carries an idempotency key derived from
  ``ctx.run_id`` and the step, so a retried charge returns the first charge instead of a second one.
- The charge retries transient failures (timeouts, 5xx, lost responses) with exponential backoff,
  but ``classify`` marks a decline as permanent: retrying a declined card only annoys the bank.
- On failure the saga compensates in reverse order (refund if charged, then release the stock)
  and re-raises, so the run ends ``failed`` with the step's error for whoever looks at it.
  A canceled run stops where it is; compensation is for failures.

``InMemoryPayments`` and ``InMemoryInventory`` simulate the outside world; swap in your
payment provider's SDK and your stock service, keeping the idempotency keys.
"""

from __future__ import annotations

import threading
from typing import Protocol

from pydantic import BaseModel, Field

from iterflow import Context, Flow, FlowRuntimeError, define_flow
from iterflow.durations import DurationLike


class Order(BaseModel):
    order_id: str
    sku: str
    quantity: int = Field(gt=0)
    amount_cents: int = Field(gt=0)
    card_token: str


class CardDeclined(Exception):
    """The bank said no; the same request will get the same answer."""


class PaymentUnavailable(Exception):
    """The provider timed out or failed; the request may or may not have gone through."""


class ReservationExpired(Exception):
    """The stock hold lapsed before it was committed."""


class Payments(Protocol):
    def charge(self, card_token: str, amount_cents: int, *, idempotency_key: str) -> str: ...
    def refund(self, charge_id: str, *, idempotency_key: str) -> str: ...


class Inventory(Protocol):
    def reserve(self, sku: str, quantity: int, *, hold_id: str) -> None: ...
    def commit(self, hold_id: str) -> None: ...
    def release(self, hold_id: str) -> None: ...


def classify_payment_error(exc: BaseException) -> str:
    """A decline will not change on retry; anything else (timeouts, 5xx, lost responses) might."""
    return "permanent" if isinstance(exc, CardDeclined) else "transient"


def build(payments: Payments, inventory: Inventory, *, charge_base_delay: DurationLike = "2s") -> Flow:
    """The checkout flow bound to its services; ``charge_base_delay`` is the first retry's backoff."""

    @define_flow("checkout", input=Order)
    async def checkout(ctx: Context, order: Order) -> dict[str, str]:
        hold_id = f"{ctx.run_id}:hold"
        await ctx.step("reserve-inventory", lambda: inventory.reserve(order.sku, order.quantity, hold_id=hold_id))
        charge_id: str | None = None
        try:
            charge_id = await ctx.step(
                "charge-card",
                lambda: payments.charge(order.card_token, order.amount_cents,
                                        idempotency_key=f"{ctx.run_id}:charge-card"),
                retries=3, backoff="exponential", base_delay=charge_base_delay, max_delay="1m", timeout="30s",
                classify=classify_payment_error,
            )
            await ctx.step("commit-inventory", lambda: inventory.commit(hold_id))
        except FlowRuntimeError:
            if charge_id is not None:
                await ctx.step("refund", lambda: payments.refund(charge_id, idempotency_key=f"{ctx.run_id}:refund"))
            await ctx.step("release-inventory", lambda: inventory.release(hold_id))
            raise
        return {"order_id": order.order_id, "charge_id": charge_id}

    return checkout


class InMemoryPayments:
    """A payment provider with real idempotency keys. ``lose_responses`` simulates a flaky network:
    the next that many calls do their work, then fail as if the response was lost."""

    DECLINED_CARD = "tok_chargeDeclined"

    def __init__(self, *, lose_responses: int = 0) -> None:
        self.lose_responses = lose_responses
        self.calls = 0
        self.charges: dict[str, int] = {}  # charge id -> amount
        self.refunds: dict[str, str] = {}  # refund id -> charge id
        self.idempotency_keys: dict[str, str] = {}  # idempotency key -> charge or refund id
        self._lock = threading.Lock()

    def charge(self, card_token: str, amount_cents: int, *, idempotency_key: str) -> str:
        with self._lock:
            self.calls += 1
            if card_token == self.DECLINED_CARD:
                raise CardDeclined(f"card {card_token} declined: insufficient funds")
            charge_id = self.idempotency_keys.setdefault(idempotency_key, f"ch_{len(self.idempotency_keys) + 1}")
            self.charges.setdefault(charge_id, amount_cents)
            if self.lose_responses > 0:
                self.lose_responses -= 1
                raise PaymentUnavailable("connection reset before the response arrived")
            return charge_id

    def refund(self, charge_id: str, *, idempotency_key: str) -> str:
        with self._lock:
            refund_id = self.idempotency_keys.setdefault(idempotency_key, f"re_{len(self.idempotency_keys) + 1}")
            self.refunds[refund_id] = charge_id
            return refund_id


class InMemoryInventory:
    """Stock with holds; ``commit``, ``release`` and ``reserve`` are idempotent per hold id."""

    def __init__(self, stock: dict[str, int]) -> None:
        self.stock = dict(stock)
        self.holds: dict[str, tuple[str, int]] = {}
        self.committed: list[str] = []
        self.released: list[str] = []
        self._lock = threading.Lock()

    def reserve(self, sku: str, quantity: int, *, hold_id: str) -> None:
        with self._lock:
            if hold_id in self.holds:
                return
            if self.stock.get(sku, 0) < quantity:
                raise ValueError(f"only {self.stock.get(sku, 0)} of {sku} left")
            self.stock[sku] -= quantity
            self.holds[hold_id] = (sku, quantity)

    def commit(self, hold_id: str) -> None:
        with self._lock:
            if hold_id not in self.holds:
                raise ReservationExpired(f"hold {hold_id} is gone")
            if hold_id not in self.committed:
                self.committed.append(hold_id)

    def release(self, hold_id: str) -> None:
        with self._lock:
            hold = self.holds.pop(hold_id, None)
            if hold is not None:
                sku, quantity = hold
                self.stock[sku] += quantity
                self.released.append(hold_id)
