"""``Flow``: a named, versioned body, and ``define_flow`` for imperative bodies."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument
from .schemas import Schema

if TYPE_CHECKING:
    from .builder import Shape
    from .context import Context

Body = Callable[["Context", Any], Awaitable[Any]]
DRIFT_MODES = ("park", "fail")
_OCCURRENCE = re.compile(r":\d+$")


def check_name(value: Any, field_name: str) -> str:
    """Names become cursor keys and SQL values: non-empty, no ``:n`` suffix (that is an occurrence)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(field_name, f"must be a non-empty string, got {value!r}")
    if _OCCURRENCE.search(value):
        raise InvalidArgument(field_name, f"{value!r} must not end in ':<number>' (reserved for occurrences)")
    return value


def check_version(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument("version", f"must be a positive int, got {value!r}")
    return value


def check_drift(value: Any) -> str | None:
    if value is not None and value not in DRIFT_MODES:
        raise InvalidArgument("drift", f"must be 'park' or 'fail', got {value!r}")
    return value


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
) -> Callable[[Body], Flow]:
    """Decorate ``async def body(ctx, input)``; ``signals`` declares payload schemas by name,
    which ``engine.signal`` then validates at delivery (SPEC 2.6)."""
    check_name(name, "name")
    check_version(version)
    check_drift(drift)
    schemas = {check_name(k, "signals"): Schema.of(v) for k, v in (signals or {}).items()}

    def wrap(body: Body) -> Flow:
        if not inspect.iscoroutinefunction(body):
            raise InvalidArgument("body", f"flow {name!r} body must be an async function")
        return Flow(
            name=name, version=version, body=body, input_schema=Schema.of(input),
            signal_schemas={k: v for k, v in schemas.items() if v is not None}, drift=drift,
        )

    return wrap
