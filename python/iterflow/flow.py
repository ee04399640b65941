"""``Flow``: a named, versioned body, and ``define_flow`` for imperative bodies."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import validate
from .control import FlowControl, flow_control
from .errors import InvalidArgument
from .schemas import Schema
from .shape import Shape

if TYPE_CHECKING:
    from .context import Context

Body = Callable[["Context", Any], Awaitable[Any]]


@dataclass(frozen=True, eq=False)
class Flow:
    """A registrable flow. Builder flows carry a static ``shape`` for the drift check."""

    name: str
    version: int
    body: Body
    input_schema: Schema | None = None
    signal_schemas: Mapping[str, Schema] = field(default_factory=dict)
    shape: Shape | None = None
    drift: str | None = None
    control: FlowControl | None = None  # fleet-wide limits and the run key (control.py)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def define_flow(
    name: str,
    *,
    version: int = 1,
    input: Any = None,
    signals: Mapping[str, Any] | None = None,
    drift: str | None = None,
    concurrency: int | None = None,
    key: Callable[[Any], str] | None = None,
    key_concurrency: int | None = None,
) -> Callable[[Body], Flow]:
    """Decorate ``async def body(ctx, input)``; ``signals`` declares payload schemas by name,
    which ``engine.signal`` then validates at delivery (docs/signals.md §4). ``concurrency``,
    ``key`` and ``key_concurrency`` limit the flow across the fleet (docs/guide.md, "Flow
    control")."""
    validate.name(name, "name")
    validate.version(version)
    validate.drift(drift)
    control = flow_control(concurrency, key, key_concurrency)
    schemas = {validate.name(k, "signals"): Schema.of(v) for k, v in (signals or {}).items()}

    def wrap(body: Body) -> Flow:
        if not inspect.iscoroutinefunction(body):
            raise InvalidArgument("body", f"flow {name!r} body must be an async function")
        return Flow(
            name=name, version=version, body=body, input_schema=Schema.of(input),
            signal_schemas={k: v for k, v in schemas.items() if v is not None}, drift=drift,
            control=control,
        )

    return wrap
