"""``ExecutionServices``: what executing a run needs from its engine, in one object.

The core (the retry layer over the chosen core), the limits, the step limits, the metrics
hooks, the database clock estimate, the logger, the engine's defaults, run-id minting and input
encoding: a bundle of services, built once by the engine and shared by the worker, each
``Execution`` and each ``Context``. The registry of flows
is not here: it is the engine's (``Engine.flows``), handed to the worker, so that the execution
layer below the flow definitions never refers to them (docs/architecture.md §1).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

from . import codec
from .clock import DbClock
from .config import Limits
from .errors import Code
from .observe import Hooks
from .schemas import Schema
from .step_limits import StepLimits

if TYPE_CHECKING:
    from .cores.base import Core


class FlowRef(Protocol):
    """What starting a run of a flow needs from it: a ``Flow`` or a ``FlowHandle`` (``ctx.invoke``,
    ``handle.start``, crons); a protocol, so this layer need not import either."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def input_schema(self) -> Schema | None: ...


def new_id() -> str:
    """A time-ordered UUID (v7 layout) so new runs land at the right edge of the primary key."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62 | rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


@dataclass
class ExecutionServices:
    """What executing a run needs from its engine (the module docstring says why one object)."""

    core: Core
    limits: Limits
    hooks: Hooks
    log: logging.Logger
    default_step_timeout: timedelta | None
    max_run_attempts: int
    drift: str
    step_limits: StepLimits
    clock: DbClock = field(default_factory=DbClock)  # the database's time, from every claim's reading

    new_id = staticmethod(new_id)

    def encode_input(self, flow: FlowRef, value: Any) -> str:
        """Validate against the flow's input schema, then encode within ``max_input_bytes``."""
        schema: Schema | None = getattr(flow, "input_schema", None)
        if schema is not None:
            value = schema.validate(value, code=Code.INPUT_INVALID, what=f"input of {flow.name}@{flow.version}")
        return codec.encode(value, field="input", limit=self.limits.max_input_bytes, code=Code.INPUT_TOO_LARGE)
