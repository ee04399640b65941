"""Running one step attempt: the abort token, timeouts, retry policy and error records.

Step bodies run at least once; this module decides, for a failed attempt, whether the step is
retried (and when) or fails for good, and shapes the durable error record.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import random
import traceback
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any, Literal

from . import validate
from .durations import parse_duration
from .errors import Code, FlowRuntimeError, InvalidArgument, IterflowError

# True while a step function runs: ctx calls made from inside a step are refused.
in_step: contextvars.ContextVar[bool] = contextvars.ContextVar("iterflow_in_step", default=False)

# How long an async step may keep running after its timeout fired the abort token.
ABORT_GRACE = 1.0

Backoff = Literal["exponential", "linear", "fixed"] | Callable[[int], Any]


class AbortToken:
    """Fired when the step times out, its run is canceled, or the worker shuts down.

    Threads cannot be killed, so a sync step that ignores the token keeps running; honour it.
    """

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None  # made on the first wait(): most steps never wait
        self._loop = asyncio.get_running_loop()
        self.reason: str | None = None

    @property
    def aborted(self) -> bool:
        return self.reason is not None

    def fire(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._loop.call_soon_threadsafe(self._release_waiters)

    def _release_waiters(self) -> None:
        if self._event is not None:
            self._event.set()

    async def wait(self) -> str:
        if self.reason is None:
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()
        return self.reason or ""

    def raise_if_aborted(self) -> None:
        if self.reason is not None:
            raise FlowRuntimeError(Code.STEP_FAILED, f"step aborted: {self.reason}")


@dataclass(frozen=True)
class StepArgs:
    """What a step function receives: builder channel (None in bodies), abort token, attempt."""

    input: Any
    abort: AbortToken
    attempt: int


@dataclass(frozen=True)
class StepOptions:
    retries: int = 0
    backoff: Backoff = "exponential"
    base_delay: timedelta = timedelta(seconds=1)
    max_delay: timedelta = timedelta(minutes=5)
    timeout: timedelta | None = None
    classify: Callable[[BaseException], str] | None = None
    result: Any = None
    limit: str | None = None  # a step limit of the engine (step_limits.py)
    limit_key: str | None = None  # the key a per-key limit counts this call under

    @classmethod
    def build(
        cls,
        *,
        retries: int = 0,
        backoff: Backoff = "exponential",
        base_delay: Any = "1s",
        max_delay: Any = "5m",
        timeout: Any = None,
        classify: Callable[[BaseException], str] | None = None,
        result: Any = None,
        limit: str | None = None,
        limit_key: str | None = None,
        default_timeout: timedelta | None = None,
    ) -> StepOptions:
        """Validate options when the step is declared, so mistakes surface before any run."""
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgument("retries", f"must be a non-negative int, got {retries!r}")
        if not callable(backoff) and backoff not in ("exponential", "linear", "fixed"):
            raise InvalidArgument("backoff", f"must be exponential, linear, fixed or a callable, got {backoff!r}")
        if classify is not None and not callable(classify):
            raise InvalidArgument("classify", "must be a callable exc -> 'permanent' | 'transient'")
        return cls(
            retries=retries,
            backoff=backoff,
            base_delay=_duration(base_delay, "base_delay"),
            max_delay=_duration(max_delay, "max_delay"),
            timeout=_duration(timeout, "timeout") if timeout is not None else default_timeout,
            classify=classify,
            result=result,
            limit=validate.name(limit, "limit") if limit is not None else None,
            limit_key=validate.idempotency_key(limit_key, "limit_key"),
        )

    @staticmethod
    def cached(options: dict[str, Any], default_timeout: timedelta | None) -> StepOptions:
        """``build`` for a ``ctx.step`` call: the same options on every replay of every run,
        so each distinct spelling is validated once."""
        try:
            return _cached_options(tuple(options.items()), default_timeout)
        except TypeError:  # an unhashable option value: validate it the long way
            return StepOptions.build(**options, default_timeout=default_timeout)

    def delay(self, attempt: int) -> timedelta:
        """Backoff before attempt ``attempt + 1`` (``attempt`` is the one that just failed)."""
        base = self.base_delay.total_seconds()
        if callable(self.backoff):
            seconds = parse_duration(self.backoff(attempt), field="backoff()").total_seconds()
        elif self.backoff == "fixed":
            seconds = base
        elif self.backoff == "linear":
            seconds = base * attempt
        else:
            seconds = base * 2 ** (attempt - 1)
            seconds *= 1 + random.uniform(-0.1, 0.1)
        return timedelta(seconds=min(max(seconds, 0.0), self.max_delay.total_seconds()))

    def is_terminal(self, exc: BaseException, attempt: int) -> bool:
        if isinstance(exc, FlowRuntimeError) and exc.non_retryable:
            return True
        if self.classify is not None and _safe_classify(self.classify, exc) == "permanent":
            return True
        return attempt > self.retries


@lru_cache(maxsize=1024)
def _cached_options(items: tuple[tuple[str, Any], ...], default_timeout: timedelta | None) -> StepOptions:
    return StepOptions.build(**dict(items), default_timeout=default_timeout)


def _duration(value: Any, field: str) -> timedelta:
    """Step options are re-read on every replay of every step: parse each spelling once."""
    try:
        return _parsed(value, field)
    except TypeError:  # unhashable garbage: let the parser give its typed error
        return parse_duration(value, field=field)


@lru_cache(maxsize=256)
def _parsed(value: Any, field: str) -> timedelta:
    return parse_duration(value, field=field)


def _safe_classify(classify: Callable[[BaseException], str], exc: BaseException) -> str:
    try:
        return str(classify(exc))
    except Exception:  # noqa: BLE001 - a broken classifier must not hide the step's error
        return "transient"


class StepTimeout(FlowRuntimeError):
    def __init__(self, timeout: timedelta) -> None:
        super().__init__(Code.STEP_TIMEOUT, f"step attempt exceeded its timeout of {timeout.total_seconds():g}s")


def _accepts_args(fn: Callable[..., Any]) -> bool:
    # only a *required* positional parameter (or *args) takes StepArgs: ``lambda i=i: ...`` in a
    # loop is a zero-argument callable, not a function that wants StepArgs bound to ``i``.
    # Plain functions (the common case, a fresh lambda on every replay) are read off their code
    # object: inspect.signature costs more than a memoized step.
    if isinstance(fn, types.FunctionType):
        code = fn.__code__
        if code.co_flags & inspect.CO_VARARGS:
            return True
        return code.co_argcount > len(fn.__defaults__ or ())
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind == p.VAR_POSITIONAL
        or (p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)
        for p in params
    )


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


async def call_step(fn: Callable[..., Any], args: StepArgs, timeout: timedelta | None) -> Any:
    """Run one attempt: async functions on the loop, sync ones in a thread; enforce the timeout."""
    call_args = (args,) if _accepts_args(fn) else ()
    if timeout is None and _is_async(fn):
        return await _call_inline(fn, call_args)
    ctx = contextvars.copy_context()
    ctx.run(in_step.set, True)
    if _is_async(fn):
        task: asyncio.Future[Any] = asyncio.get_running_loop().create_task(
            _await(fn, call_args), context=ctx
        )
    else:
        task = asyncio.ensure_future(asyncio.to_thread(ctx.run, fn, *call_args))
    if timeout is None:
        return await task
    try:
        return await asyncio.wait_for(asyncio.shield(task), timeout.total_seconds())
    except TimeoutError:
        if task.done():  # the step itself raised TimeoutError before its deadline
            raise
        args.abort.fire("timeout")
        # an async step gets a moment to see the token (``await abort.wait()``) before it is cancelled
        asyncio.get_running_loop().call_later(ABORT_GRACE, task.cancel)
        raise StepTimeout(timeout) from None


async def _call_inline(fn: Callable[..., Awaitable[Any]], call_args: tuple[Any, ...]) -> Any:
    """An async step without a timeout runs in the body's own task: nothing needs a separate
    task to cancel, and a task plus a context copy per step dominates a no-op step's cost.
    ``in_step`` is set around the call only; tasks the step spawns inherit it."""
    token = in_step.set(True)
    try:
        return await _await(fn, call_args)
    finally:
        in_step.reset(token)


async def _await(fn: Callable[..., Awaitable[Any]], call_args: tuple[Any, ...]) -> Any:
    result = fn(*call_args)
    if inspect.isawaitable(result):
        return await result
    return result


def make_error(code: str, message: str, *, traceback: str | None = None,
               cause: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The durable ``{code, message, traceback, cause}`` record every failure is stored as
    (docs/guide.md §5); one builder, so every writer stores the same four keys."""
    return {"code": code, "message": message, "traceback": traceback, "cause": cause}


def error_record(exc: BaseException, default_code: str = Code.STEP_FAILED) -> dict[str, Any]:
    """The durable record of an exception (``make_error``), its text made storable."""
    if isinstance(exc, FlowRuntimeError) and exc.recorded is not None:
        # a step's stored failure re-raised by replay: keep the original
        recorded = exc.recorded
        return make_error(exc.code, str(recorded.get("message") or ""),
                          traceback=recorded.get("traceback"), cause=recorded.get("cause"))
    code = exc.code if isinstance(exc, IterflowError) else default_code
    message = exc.message if isinstance(exc, IterflowError) else f"{type(exc).__name__}: {exc}"
    causes: list[dict[str, str]] = []
    seen: BaseException | None = exc.__cause__
    while seen is not None and len(causes) < 20:
        causes.append({"type": type(seen).__name__, "message": _storable(str(seen))})
        seen = seen.__cause__
    return make_error(
        _storable(code), _storable(message),
        traceback=_storable("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:]),
        cause=causes or None,
    )


def _storable(text: str) -> str:
    """``text`` as jsonb can hold it: NUL and lone surrogates (which an exception message may
    carry) are written as escapes, so recording the failure can never fail in turn."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def raise_recorded(error: dict[str, Any]) -> None:
    """Replay a stored failure into the body, as the non-retryable error it was."""
    raise FlowRuntimeError(str(error.get("code") or Code.STEP_FAILED), str(error.get("message") or ""),
                           non_retryable=True, recorded=dict(error))
