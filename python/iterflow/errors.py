"""Every error iterflow raises, and the one table of stable codes.

Codes are the contract (docs/guide.md §5): callers branch on ``exc.code``, never on messages or
on the exception class alone. Each exception carries ``code`` and ``message``; validation
errors also carry ``issues`` (``[{"path": ..., "message": ...}]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final


class Code:
    """The stable error codes. Values never change across releases."""

    STEP_FAILED: Final = "STEP_FAILED"
    STEP_TIMEOUT: Final = "STEP_TIMEOUT"
    STEP_RESULT_TOO_LARGE: Final = "STEP_RESULT_TOO_LARGE"
    INPUT_TOO_LARGE: Final = "INPUT_TOO_LARGE"
    SIGNAL_PAYLOAD_TOO_LARGE: Final = "SIGNAL_PAYLOAD_TOO_LARGE"
    STEP_INVALID_AWAIT: Final = "STEP_INVALID_AWAIT"
    SIGNAL_TIMEOUT: Final = "SIGNAL_TIMEOUT"
    SIGNAL_PAYLOAD_INVALID: Final = "SIGNAL_PAYLOAD_INVALID"
    INPUT_INVALID: Final = "INPUT_INVALID"
    FLOW_UNKNOWN: Final = "FLOW_UNKNOWN"
    REPLAY_INCOMPATIBLE_VERSION: Final = "REPLAY_INCOMPATIBLE_VERSION"
    REPLAY_NON_DETERMINISTIC: Final = "REPLAY_NON_DETERMINISTIC"
    RUN_CANCELED: Final = "RUN_CANCELED"
    RUN_ATTEMPTS_EXHAUSTED: Final = "RUN_ATTEMPTS_EXHAUSTED"
    INVOKE_DEPTH_EXCEEDED: Final = "INVOKE_DEPTH_EXCEEDED"
    INVOKE_FANOUT_EXCEEDED: Final = "INVOKE_FANOUT_EXCEEDED"
    SCHEMA_MISMATCH: Final = "SCHEMA_MISMATCH"
    RUN_NOT_FOUND: Final = "RUN_NOT_FOUND"
    # ctx.continue_as_new called while other branches of the body still run or wait.
    CONTINUE_AS_NEW_INVALID: Final = "CONTINUE_AS_NEW_INVALID"
    # Raised to the caller for a malformed argument
    # (bad duration, bad schema name, bad limit, bad filter) before anything is written.
    INVALID_ARGUMENT: Final = "INVALID_ARGUMENT"
    # Misuse of the engine's lifecycle (register after listen, duplicate name@version, ...).
    ENGINE_STATE: Final = "ENGINE_STATE"
    # core="rust" was asked for but the extension is not importable.
    CORE_UNAVAILABLE: Final = "CORE_UNAVAILABLE"
    # An infrastructure fault (connection lost, server restarting, too many clients, ...) that
    # outlived the bounded retries (see iterflow.faults).
    DATABASE_UNAVAILABLE: Final = "DATABASE_UNAVAILABLE"
    # The database refused a statement for a reason retrying cannot fix; the message carries
    # PostgreSQL's SQLSTATE and text.
    DATABASE_ERROR: Final = "DATABASE_ERROR"


Issue = dict[str, str]


class IterflowError(Exception):
    """Base of every iterflow exception; ``code`` is stable, ``message`` is for humans."""

    code: str = Code.STEP_FAILED

    def __init__(self, code: str, message: str, *, issues: Sequence[Issue] = ()) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.issues: list[Issue] = list(issues)


class InvalidArgument(IterflowError, ValueError):
    """A caller passed a malformed value; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(Code.INVALID_ARGUMENT, f"{field}: {message}")
        self.field = field


class ValidationFailed(IterflowError, ValueError):
    """A value failed its declared schema (``INPUT_INVALID``, ``SIGNAL_PAYLOAD_INVALID``)."""


class LimitExceeded(IterflowError, ValueError):
    """A ``limits`` byte cap was exceeded; raised before any write."""


class EngineStateError(IterflowError, RuntimeError):
    """The engine was used out of order (e.g. ``register`` after ``listen``)."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.ENGINE_STATE, message)


class CoreUnavailable(IterflowError, RuntimeError):
    def __init__(self, message: str) -> None:
        super().__init__(Code.CORE_UNAVAILABLE, message)


class EmbeddedUnavailable(IterflowError, ImportError):
    """No DSN was given, ``$DATABASE_URL`` is unset and the embedded Postgres cannot start
    (``pgserver``, the ``[embedded]`` extra, is not installed). An ``ImportError`` too, as the
    missing optional dependency it is."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.DATABASE_UNAVAILABLE, message)


class SchemaMismatch(IterflowError, RuntimeError):
    """The database schema is missing or older than this engine; the message says the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.SCHEMA_MISMATCH, message)


class DatabaseError(IterflowError):
    """The database failed a statement; ``sqlstate`` is PostgreSQL's code when it sent one."""

    def __init__(self, message: str, *, sqlstate: str | None = None, code: str = Code.DATABASE_ERROR) -> None:
        super().__init__(code, message)
        self.sqlstate = sqlstate


class DatabaseUnavailable(DatabaseError):
    """An infrastructure fault outlived the bounded retries (the server is down, restarting,
    out of connections, or the network dropped). Nothing the caller asked for is lost by
    retrying the same call later: every engine write is idempotent or fenced."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message, sqlstate=sqlstate, code=Code.DATABASE_UNAVAILABLE)


class RunNotFound(IterflowError, LookupError):
    def __init__(self, run_id: str) -> None:
        super().__init__(Code.RUN_NOT_FOUND, f"no run with id {run_id!r}")
        self.run_id = run_id


class RunFailed(IterflowError):
    """``handle.result`` of a failed run; ``code``/``message`` are the run's stored error."""

    def __init__(self, run_id: str, code: str, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(code, message)
        self.run_id = run_id
        self.error = error or {}


class RunCanceled(IterflowError):
    def __init__(self, run_id: str, reason: str) -> None:
        super().__init__(Code.RUN_CANCELED, reason)
        self.run_id = run_id


class FlowRuntimeError(IterflowError):
    """Raise in a step for a custom code; ``non_retryable=True`` fails the step at once.

    Also what a body sees for a timed-out signal wait, a failed child, or a failed step.
    """

    def __init__(
        self, code: str, message: str, *, non_retryable: bool = False, recorded: dict[str, Any] | None = None
    ) -> None:
        super().__init__(code, message)
        self.non_retryable = non_retryable
        # the stored error record this exception replays (a step's original failure, with its
        # traceback): a run that fails with it keeps that record instead of describing replay
        self.recorded = recorded


class SuspendRun(BaseException):
    """Unwinds a body that must wait (sleep, signal, child).

    A ``BaseException`` so ``except Exception`` in user code cannot swallow it; the context
    re-raises it on the next ctx call and on the body's return if user code swallows it anyway.
    """


class ContinueAsNew(BaseException):
    """Unwinds a body that called ``ctx.continue_as_new``; the runner then ends the run and
    starts its successor with ``input`` (encoded JSON text) in one transaction. A
    ``BaseException`` for the reason ``SuspendRun`` is one."""

    def __init__(self, input: str) -> None:
        super().__init__("continue as new")
        self.input = input


class DriftDetected(BaseException):
    """Replay found history the code can no longer produce; the run parks (or fails)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
