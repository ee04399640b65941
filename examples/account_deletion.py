"""Account deletion with a 30-day grace period that the user can undo.

Why this shape: the deletion request is a run started at once, so the schedule lives in the
database rather than in a nightly job scanning a ``delete_after`` column. The run tells the user,
sleeps out the grace period durably (restarts and deploys do not reset the clock) and only then
deletes. Undo is ``engine.cancel``: cancellation is sticky, so a canceled run never reaches the
delete step, even if a worker picks it up the moment the grace period ends, and the cancel reason
stays on the run as the record of why the account survived.

``schedule_deletion`` uses the user id as the idempotency key: pressing "delete my account" twice
schedules one deletion, and both clicks get the same run id back.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from pydantic import BaseModel

from iterflow import Context, Engine, Flow, FlowHandle, define_flow
from iterflow.durations import DurationLike


class DeletionRequest(BaseModel):
    user_id: str
    email: str


class Accounts(Protocol):
    def notify(self, email: str, template: str) -> None: ...
    def delete(self, user_id: str) -> None: ...


def build(accounts: Accounts, grace: DurationLike = "30d") -> Flow:
    """The deletion flow bound to your account service; ``grace`` is how long the user can undo."""

    @define_flow("account-deletion", input=DeletionRequest)
    async def delete_account(ctx: Context, request: DeletionRequest) -> dict[str, Any]:
        await ctx.step("notify-scheduled", lambda: accounts.notify(request.email, "deletion-scheduled"))
        await ctx.sleep(grace)
        await ctx.step("delete-account", lambda: accounts.delete(request.user_id))
        return {"user_id": request.user_id, "deleted_at": ctx.now().isoformat()}

    return delete_account


async def schedule_deletion(deletions: FlowHandle, request: DeletionRequest) -> str:
    """Start (or find) the user's pending deletion; returns its run id."""
    started = await deletions.start(request, idempotency_key=f"delete-account:{request.user_id}")
    return started.run_id


async def undo_deletion(engine: Engine, run_id: str) -> None:
    """The "keep my account" button: cancel the run; the reason is stored on it."""
    await engine.cancel(run_id, reason="user undid the deletion")


class InMemoryAccounts:
    """Simulated account service; replace with yours (make ``delete`` idempotent: steps run at least once)."""

    def __init__(self, user_ids: list[str]) -> None:
        self.users = set(user_ids)
        self.outbox: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def notify(self, email: str, template: str) -> None:
        with self._lock:
            self.outbox.append((email, template))

    def delete(self, user_id: str) -> None:
        with self._lock:
            self.users.discard(user_id)
