"""Duration parsing, deadlines and formatting (docs/guide.md §1, "Durations")."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone

import pytest

from iterflow.durations import deadline, format_duration, parse_duration
from iterflow.errors import Code, InvalidArgument

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("30s", timedelta(seconds=30)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("3d", timedelta(days=3)),
        ("2w", timedelta(weeks=2)),
        ("1.5h", timedelta(minutes=90)),
        (".5s", timedelta(milliseconds=500)),
        ("3 days", timedelta(days=3)),
        ("1 day", timedelta(days=1)),
        ("10 minutes", timedelta(minutes=10)),
        ("1 hour", timedelta(hours=1)),
        ("2 hrs", timedelta(hours=2)),
        ("45 secs", timedelta(seconds=45)),
        ("1 second", timedelta(seconds=1)),
        ("2 mins", timedelta(minutes=2)),
        ("1 week", timedelta(weeks=1)),
        ("2h30m", timedelta(hours=2, minutes=30)),
        ("1h 30m 15s", timedelta(hours=1, minutes=30, seconds=15)),
        ("1 hour 30 minutes", timedelta(minutes=90)),
        ("  5M  ", timedelta(minutes=5)),
        ("1H", timedelta(hours=1)),
        ("0s", timedelta()),
    ],
)
def test_parses_strings(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, timedelta()),
        (30, timedelta(seconds=30)),
        (1.5, timedelta(milliseconds=1500)),
        (0.25, timedelta(milliseconds=250)),
        (timedelta(minutes=3), timedelta(minutes=3)),
    ],
)
def test_parses_numbers_and_timedeltas(value: float | timedelta, expected: timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "soon",
        "5",
        "s",
        "5 parsecs",
        "5x",
        "-5s",
        "1h-30m",
        "1,5h",
        "1e3s",
        "5 s s",
        -1,
        -0.5,
        math.nan,
        math.inf,
        True,
        None,
        [5],
        timedelta(seconds=-1),
        10**30,
        "99999999999999w",
    ],
)
def test_rejects_bad_values(value: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_duration(value, field="sleep")  # type: ignore[arg-type]
    assert info.value.code == Code.INVALID_ARGUMENT
    assert info.value.field == "sleep"
    assert info.value.message.startswith("sleep: ")


def test_error_shows_bad_value_and_accepted_forms() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_duration("tomorrowish", field="timeout")
    assert "'tomorrowish'" in info.value.message
    assert "'30s'" in info.value.message and "3 days" in info.value.message


def test_unknown_unit_is_named() -> None:
    with pytest.raises(InvalidArgument, match="unknown unit 'fortnights'"):
        parse_duration("2 fortnights")


def test_negative_says_negative() -> None:
    with pytest.raises(InvalidArgument, match="negative"):
        parse_duration("-5m")
    with pytest.raises(InvalidArgument, match="negative"):
        parse_duration(-3)


def test_default_field_name() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_duration("nope")
    assert info.value.field == "duration"


def test_deadline_from_duration() -> None:
    assert deadline("1h", NOW) == NOW + timedelta(hours=1)
    assert deadline(90, NOW) == NOW + timedelta(seconds=90)
    assert deadline(timedelta(days=2), NOW) == NOW + timedelta(days=2)


def test_deadline_future_datetime_is_absolute() -> None:
    when = NOW + timedelta(days=3)
    assert deadline(when, NOW) == when


def test_deadline_in_other_zone_is_same_instant() -> None:
    when = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=1)))
    assert deadline(when, NOW) == NOW + timedelta(hours=1)


def test_deadline_past_datetime_means_now() -> None:
    assert deadline(NOW - timedelta(days=1), NOW) == NOW


def test_deadline_rejects_naive_datetime() -> None:
    with pytest.raises(InvalidArgument) as info:
        deadline(datetime(2030, 1, 1), NOW, field="until")
    assert info.value.field == "until"
    assert "naive" in info.value.message


def test_deadline_rejects_bad_duration_with_field() -> None:
    with pytest.raises(InvalidArgument) as info:
        deadline("later", NOW, field="timeout")
    assert info.value.field == "timeout"


def test_deadline_overflow_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="too far"):
        deadline(timedelta(days=999_999_999), NOW)


@pytest.mark.parametrize(
    ("td", "text"),
    [
        (timedelta(), "0s"),
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(microseconds=1500), "1.5ms"),
        (timedelta(milliseconds=1500), "1.5s"),
        (timedelta(seconds=30), "30s"),
        (timedelta(minutes=3), "3m"),
        (timedelta(hours=2), "2h"),
        (timedelta(days=3), "3d"),
        (timedelta(minutes=90), "1h30m"),
        (timedelta(days=1, seconds=1, milliseconds=500), "1d1.5s"),
        (timedelta(seconds=-30), "-30s"),
    ],
)
def test_format_duration(td: timedelta, text: str) -> None:
    assert format_duration(td) == text


@pytest.mark.parametrize(
    "td",
    [
        timedelta(milliseconds=1),
        timedelta(seconds=59, milliseconds=999),
        timedelta(days=400, hours=5, minutes=7, seconds=3, milliseconds=20),
        timedelta(weeks=2),
    ],
)
def test_format_round_trips_through_parse(td: timedelta) -> None:
    assert parse_duration(format_duration(td)) == td
