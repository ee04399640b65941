"""The engine's ``limits`` and ``retention`` settings (docs/guide.md §3; retention: docs/operations.md §6).

Both accept the dataclass or a plain dict with the same keys, because settings usually come
from a config file. They are checked when built, so a typo or a negative cap fails at engine
construction, naming the setting, instead of misbehaving hours later in a sweep.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Self, TypeVar

from iterflow.durations import DurationLike, parse_duration
from iterflow.errors import InvalidArgument
from iterflow.validate import integer, show

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Settings = TypeVar("_Settings", bound="DataclassInstance")

# jsonb cannot hold a value over 256 MiB - 1, so a larger cap would promise nothing
MAX_BYTES_CAP = 268_435_455
MAX_INVOKE_DEPTH = 1000
MAX_CHILDREN_PER_RUN = 1_000_000
MIN_RETENTION_SCHEDULE = timedelta(seconds=1)


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps checked before any write; ``None`` disables a byte cap (the depth/fan-out caps stay)."""

    max_input_bytes: int | None = 1_048_576
    max_step_result_bytes: int | None = 1_048_576
    max_signal_payload_bytes: int | None = 262_144
    max_invoke_depth: int = 10
    max_children_per_run: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_input_bytes", "max_step_result_bytes", "max_signal_payload_bytes"):
            _check_positive(getattr(self, name), f"limits.{name}", optional=True, high=MAX_BYTES_CAP)
        _check_positive(self.max_invoke_depth, "limits.max_invoke_depth", optional=False, high=MAX_INVOKE_DEPTH)
        _check_positive(self.max_children_per_run, "limits.max_children_per_run", optional=False,
                        high=MAX_CHILDREN_PER_RUN)

    @classmethod
    def coerce(cls, value: Self | Mapping[str, Any] | None) -> Self:
        return _coerce(cls, value, "limits")


@dataclasses.dataclass(frozen=True, init=False)
class Retention:
    """What the retention sweep deletes and how often it runs; ``None`` keeps that kind forever.

    ``runs_older_than`` only ever applies to terminal runs. The constructor takes any duration
    form and stores a ``timedelta`` so the sweep never re-parses.
    """

    events_older_than: timedelta | None
    runs_older_than: timedelta | None
    schedule: timedelta

    def __init__(
        self,
        events_older_than: DurationLike | None = None,
        runs_older_than: DurationLike | None = None,
        schedule: DurationLike = "1h",
    ) -> None:
        events = (
            None if events_older_than is None else _positive_duration(events_older_than, "events_older_than")
        )
        runs = None if runs_older_than is None else _positive_duration(runs_older_than, "runs_older_than")
        object.__setattr__(self, "events_older_than", events)
        object.__setattr__(self, "runs_older_than", runs)
        object.__setattr__(self, "schedule", _positive_duration(schedule, "schedule"))

    @classmethod
    def coerce(cls, value: Self | Mapping[str, Any] | None) -> Self:
        return _coerce(cls, value, "retention")


def _coerce(cls: type[_Settings], value: object, section: str) -> _Settings:
    """Shared by both settings classes: defaults, pass-through, or a dict of known keys."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise InvalidArgument(
            section, f"expected {cls.__name__}, a dict or None, got {type(value).__qualname__}"
        )
    known = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in known:
            raise InvalidArgument(f"{section}.{key}", f"unknown setting; known settings: {', '.join(known)}")
    return cls(**value)


def _check_positive(value: object, field: str, *, optional: bool, high: int) -> None:
    if value is None and optional:
        return
    integer(value, field, 1, high)


def _positive_duration(value: DurationLike, name: str) -> timedelta:
    field = f"retention.{name}"
    duration = parse_duration(value, field=field)  # at most MAX_DURATION (100 years)
    if duration <= timedelta():
        raise InvalidArgument(field, f"{show(value)} must be longer than zero")
    if name == "schedule" and duration < MIN_RETENTION_SCHEDULE:
        raise InvalidArgument(field, f"{show(value)} is shorter than the minimum of 1s")
    return duration
