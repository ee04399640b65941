"""Contract signing: legal, then finance, then the CEO, whatever order their approvals arrive in.

Why this shape: the signing order is a business rule (finance does not approve what legal has not
cleared), so it lives in the flow, not in the three systems that send approvals. Each approval is
a signal with its own schema:

- ``engine.signal`` validates the payload at delivery, so a malformed approval is refused on the
  spot (``invalid_payload`` with ``issues``, nothing stored) and the sender can return a 422;
- an approval that arrives before its turn is ``buffered`` and consumed when the flow gets there,
  so the senders never need to know where the run is.

A builder chain fits: the steps are linear and the shape is checked against in-flight runs on
every deploy. Add ``timeout=`` to a ``.signal`` to make a signer's silence fail the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from iterflow import flow


class Contract(BaseModel):
    contract_id: str
    counterparty: str
    value_cents: int = Field(gt=0)


class LegalApproval(BaseModel):
    signer: str
    redlines: list[str] = []


class FinanceApproval(BaseModel):
    signer: str
    budget_code: str = Field(pattern=r"^[A-Z]{2}-\d{4}$")


class CeoSignature(BaseModel):
    signer: str
    signature_id: str


Approval = LegalApproval | FinanceApproval | CeoSignature
Envelope = dict[str, Any]


def open_envelope(contract: Contract) -> Envelope:
    """Stand-in for your e-signature provider: open an envelope for the three signers."""
    return {"contract_id": contract.contract_id, "envelope_id": f"env_{contract.contract_id}", "signers": []}


def seal_envelope(envelope: Envelope) -> Envelope:
    """Stand-in for your e-signature provider: seal the fully signed envelope."""
    return {**envelope, "sealed": True}


def add_signer(role: str) -> Callable[[Envelope, Approval], Envelope]:
    """A ``merge`` that appends one signer to the envelope; pure, because merges re-run on every replay."""

    def merge(envelope: Envelope, approval: Approval) -> Envelope:
        return {**envelope, "signers": [*envelope["signers"], {"role": role, "by": approval.signer}]}

    return merge


signing = (
    flow("contract-signing")
    .version(1)
    .input(Contract)
    .step("open-envelope", lambda s: open_envelope(s.input))
    .signal("legal", schema=LegalApproval, merge=add_signer("legal"))
    .signal("finance", schema=FinanceApproval, merge=add_signer("finance"))
    .signal("ceo", schema=CeoSignature, merge=add_signer("ceo"))
    .step("seal-envelope", lambda s: seal_envelope(s.input))
    .output(lambda v: v.input)
    .build()
)
