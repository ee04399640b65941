"""Limits and Retention settings (docs/guide.md §3; docs/operations.md §6)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from iterflow.config import Limits, Retention
from iterflow.errors import Code, InvalidArgument


def test_limits_defaults() -> None:
    limits = Limits.coerce(None)
    assert limits == Limits(
        max_input_bytes=1_048_576,
        max_step_result_bytes=1_048_576,
        max_signal_payload_bytes=262_144,
        max_invoke_depth=10,
        max_children_per_run=1000,
    )


def test_limits_instance_passes_through() -> None:
    limits = Limits(max_invoke_depth=3)
    assert Limits.coerce(limits) is limits


def test_limits_from_dict() -> None:
    limits = Limits.coerce({"max_input_bytes": 10, "max_children_per_run": 5})
    assert limits.max_input_bytes == 10
    assert limits.max_children_per_run == 5
    assert limits.max_step_result_bytes == 1_048_576


def test_byte_caps_may_be_disabled() -> None:
    limits = Limits.coerce(
        {"max_input_bytes": None, "max_step_result_bytes": None, "max_signal_payload_bytes": None}
    )
    assert limits.max_input_bytes is None


def test_limits_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Limits().max_invoke_depth = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_input_bytes", 0),
        ("max_input_bytes", -1),
        ("max_step_result_bytes", 1.5),
        ("max_signal_payload_bytes", "1kb"),
        ("max_invoke_depth", 0),
        ("max_invoke_depth", None),
        ("max_children_per_run", True),
        ("max_children_per_run", -5),
    ],
)
def test_bad_limits_name_the_field(key: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        Limits.coerce({key: value})
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.field == f"limits.{key}"
    assert repr(value) in info.value.message


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(InvalidArgument, match=r"limits\.max_invoke_depth"):
        Limits(max_invoke_depth=-1)


def test_unknown_limit_key_is_named() -> None:
    with pytest.raises(InvalidArgument) as info:
        Limits.coerce({"max_input_byte": 10})
    assert info.value.field == "limits.max_input_byte"
    assert "unknown setting" in info.value.message
    assert "max_input_bytes" in info.value.message


def test_limits_wrong_type() -> None:
    with pytest.raises(InvalidArgument, match="expected Limits, a dict or None, got int"):
        Limits.coerce(5)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="got Retention"):
        Limits.coerce(Retention())  # type: ignore[arg-type]


def test_retention_defaults() -> None:
    retention = Retention.coerce(None)
    assert retention.events_older_than is None
    assert retention.runs_older_than is None
    assert retention.schedule == timedelta(hours=1)


def test_retention_parses_durations() -> None:
    retention = Retention.coerce({"events_older_than": "7d", "runs_older_than": 86400, "schedule": "15m"})
    assert retention == Retention(
        events_older_than=timedelta(days=7), runs_older_than=timedelta(days=1), schedule=timedelta(minutes=15)
    )
    assert isinstance(retention.runs_older_than, timedelta)


def test_retention_instance_passes_through() -> None:
    retention = Retention(runs_older_than="30d")
    assert Retention.coerce(retention) is retention
    assert retention.runs_older_than == timedelta(days=30)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("events_older_than", "soon"),
        ("runs_older_than", -1),
        ("runs_older_than", "0s"),
        ("schedule", 0),
        ("schedule", None),
        ("schedule", "1 fortnight"),
    ],
)
def test_bad_retention_names_the_field(key: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        Retention.coerce({key: value})
    assert info.value.field == f"retention.{key}"


def test_unknown_retention_key_is_named() -> None:
    with pytest.raises(InvalidArgument) as info:
        Retention.coerce({"older_than": "1d"})
    assert info.value.field == "retention.older_than"


def test_retention_is_frozen_and_hashable() -> None:
    retention = Retention(events_older_than="1d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        retention.schedule = timedelta(1)  # type: ignore[misc]
    assert hash(retention) == hash(Retention(events_older_than=timedelta(days=1)))
