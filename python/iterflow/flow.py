"""``Flow``: a named, versioned body, and ``define_flow`` for imperative bodies."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import validate
from .errors import InvalidArgument
from .schemas import Schema

if TYPE_CHECKING:
    from .builder import Shape
    from .context import Context

Body = Callable[["Context", Any], Awaitable[Any]]
DRIFT_MODES = ("park", "fail")


def check_name(value: Any, field_name: str) -> str:
    """Names become cursor keys, index entries and NOTIFY payloads: 1 to ``MAX_NAME_CHARS``
    characters of valid UTF-8 without NUL, not blank. Any other character is fine: cursor keys
    encode ``:`` and ``%`` (keys.py), so no name can produce another call's key."""
    value = validate.text(value, field_name, max_chars=validate.MAX_NAME_CHARS)
    if not value.strip():
        raise InvalidArgument(field_name, f"must be a non-empty string, got {value!r}")
    return value


def check_version(value: Any) -> int:
    """A positive int that fits the ``version`` column (int4)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= validate.MAX_VERSION:
        raise InvalidArgument("version", f"must be an int from 1 to {validate.MAX_VERSION:,}, "
                                         f"got {validate.show(value)}")
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
    which ``engine.signal`` then validates at delivery (docs/signals.md §4)."""
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
