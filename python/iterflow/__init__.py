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
from .steps import AbortToken, StepArgs
from .types import (
    RetryResult,
    RunDetail,
    RunPage,
    RunSummary,
    SignalResult,
    StartResult,
    StartSpec,
    Waiting,
)

__all__ = [
    "AbortToken", "Code", "Context", "Engine", "Flow", "FlowHandle", "FlowRuntimeError", "IterflowError",
    "Limits", "Retention", "RetryResult", "RunCanceled", "RunDetail", "RunFailed", "RunNotFound", "RunPage",
    "RunSummary", "SchemaMismatch", "SignalResult", "StartResult", "StartSpec", "StepArgs", "Waiting",
    "create_engine", "define_flow", "flow", "migrate",
]
