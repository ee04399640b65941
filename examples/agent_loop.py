"""Human-in-the-loop agent: draft, wait for a human's feedback, redraft; the agent may approve itself.

Why this shape: every turn is the same two calls, a ``think`` step (the model call, memoized so
a replay never pays for it twice) and a wait on the ``human`` signal. A turn can last seconds or
a week; the run holds nothing while it waits.

When the model is confident it skips the review by *sending itself* the verdict a human would
send (``{"skip": true}``) instead of branching around the wait. The loop keeps one shape, the
run's signal inbox stays the single audit trail of who approved each turn, and a human can send
the same ``skip`` to accept a draft early. The self-signal carries an idempotency key, so a
retried step cannot queue a second verdict.

The flow needs the engine to signal itself, so ``build`` takes it::

    engine = create_engine(dsn)
    engine.register(build(engine, think=my_llm_call))
    await engine.listen()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypedDict

from pydantic import BaseModel

from iterflow import Context, Engine, Flow, define_flow


class Task(BaseModel):
    question: str


class Verdict(BaseModel):
    """What a reviewer sends on the ``human`` signal: feedback to redraft, or ``skip`` to accept."""

    feedback: str = ""
    skip: bool = False
    by: str = "human"


class Thought(TypedDict):
    draft: str
    confident: bool


# The model call: (question, feedback so far) -> a draft and whether it needs a human review.
Think = Callable[[str, Sequence[str]], Thought]


def build(engine: Engine, think: Think) -> Flow:
    """The agent flow; ``engine`` is where it sends its own ``skip`` verdicts."""

    @define_flow("agent", input=Task, signals={"human": Verdict})
    async def agent(ctx: Context, task: Task) -> dict[str, Any]:
        feedback: list[str] = []
        while True:
            turn = len(feedback)
            thought: Thought = await ctx.step("think", partial(think, task.question, tuple(feedback)), timeout="2m")
            if thought["confident"]:
                await ctx.step("self-approve", _self_approve(engine, ctx.run_id, turn=turn))
            verdict: Verdict = await ctx.signal("human")
            if verdict.skip:
                return {"answer": thought["draft"], "turns": turn + 1, "approved_by": verdict.by}
            feedback.append(verdict.feedback)

    return agent


def _self_approve(engine: Engine, run_id: str, *, turn: int) -> Callable[[], Any]:
    """A step that delivers ``skip`` to this very run; the next ``ctx.signal("human")`` takes it at once."""

    async def send() -> str:
        result = await engine.signal(run_id, "human", {"skip": True, "by": "agent"},
                                     idempotency_key=f"self-approve:{turn}")
        return result.kind

    return send
