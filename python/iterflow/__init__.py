"""iterflow: durable, iterative workflows on your own PostgreSQL."""

from .builder import flow
from .config import Limits, Retention
from .context import Context
from .engine import Engine, create_engine
from .errors import (
    Code,
    FlowRuntimeError,
    IterflowError,
    RunCanceled,
    RunFailed,
    RunNotFound,
    SchemaMismatch,
)
from .flow import Flow, define_flow
from .handle import FlowHandle
from .migrate import migrate
from .step_limits import StepLimit
from .steps import AbortToken, StepArgs
from .types import (
    Explanation,
    Reason,
    RetryResult,
    RunDetail,
    RunPage,
    RunSummary,
    SignalResult,
    StartResult,
    StartSpec,
    Waiting,
    WorkerInfo,
)

__all__ = [
    "AbortToken", "Code", "Context", "Engine", "Explanation", "Flow", "FlowHandle", "FlowRuntimeError",
    "IterflowError", "Limits", "Reason", "Retention", "RetryResult", "RunCanceled", "RunDetail", "RunFailed",
    "RunNotFound", "RunPage", "RunSummary", "SchemaMismatch", "SignalResult", "StartResult", "StartSpec",
    "StepArgs", "StepLimit", "Waiting", "WorkerInfo", "create_engine", "define_flow", "flow", "migrate",
]
