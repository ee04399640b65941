"""Onboarding: create the account, wait three days, then give the user a week to answer a survey.

Why a durable flow: the waits are days long. While it sleeps or waits for the survey the run
holds no worker, thread or connection, and deploys, crashes and restarts in between change
nothing: it resumes where it was. The survey answer arrives from outside (a webhook calls
``engine.signal(run_id, "survey", payload)``); if it comes early it is buffered until the run asks.

Two shapes of the same journey:

- ``build_onboarding`` is a builder chain. Its shape is static, so the engine
  can check in-flight runs against a new deploy. An unanswered survey fails the run with
  ``SIGNAL_TIMEOUT``: nobody answering is visible in ``list_runs(status="failed")``.
- ``build_onboarding_with_reminder`` is a body flow, for when silence is business as usual: it
  catches ``SIGNAL_TIMEOUT``, sends one reminder and waits once more before finishing without a score.

The durations are parameters so tests and staging run the real flow in milliseconds.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from iterflow import Code, Context, Flow, FlowRuntimeError, define_flow, flow
from iterflow.durations import DurationLike


class Signup(BaseModel):
    user_id: str
    email: str


class Survey(BaseModel):
    score: int = Field(ge=0, le=10)
    comment: str = ""


def create_account(signup: Signup) -> dict[str, str]:
    """Stand-in for your user service. Make the real one idempotent on ``user_id``: steps run at least once."""
    return {"user_id": signup.user_id, "account_id": f"acct_{signup.user_id}"}


def send_survey_reminder(email: str) -> dict[str, str]:
    """Stand-in for your mailer; pass the run id as the provider's idempotency key in real code."""
    return {"to": email, "template": "survey-reminder"}


def build_onboarding(sleep: DurationLike = "3d", survey_timeout: DurationLike = "7d") -> Flow:
    """The linear journey; a survey that never comes fails the run with ``SIGNAL_TIMEOUT``."""
    return (
        flow("onboard")
        .version(1)
        .input(Signup)
        .step("create-account", lambda s: create_account(s.input))
        .sleep(sleep)
        # merge keeps the account in the channel next to the answer (it re-runs on replay: keep it pure)
        .signal("survey", schema=Survey, timeout=survey_timeout,
                merge=lambda account, survey: {**account, "score": survey.score})
        .output(lambda v: {"account_id": v.input["account_id"], "score": v.input["score"]})
        .build()
    )


def build_onboarding_with_reminder(sleep: DurationLike = "3d", survey_timeout: DurationLike = "7d") -> Flow:
    """Same journey, but silence earns one reminder and a second wait instead of a failed run."""

    @define_flow("onboard-with-reminder", input=Signup, signals={"survey": Survey})
    async def onboard(ctx: Context, signup: Signup) -> dict[str, Any]:
        account = await ctx.step("create-account", lambda: create_account(signup))
        await ctx.sleep(sleep)
        survey = await _survey_or_none(ctx, survey_timeout)
        reminded = survey is None
        if survey is None:
            await ctx.step("send-reminder", lambda: send_survey_reminder(signup.email))
            survey = await _survey_or_none(ctx, survey_timeout)
        return {
            "account_id": account["account_id"],
            "score": survey.score if survey is not None else None,
            "reminded": reminded,
        }

    return onboard


async def _survey_or_none(ctx: Context, timeout: DurationLike) -> Survey | None:
    """The next survey answer, or None when ``timeout`` passes first (the only error swallowed)."""
    try:
        survey: Survey = await ctx.signal("survey", timeout=timeout)
    except FlowRuntimeError as exc:
        if exc.code != Code.SIGNAL_TIMEOUT:
            raise
        return None
    return survey
