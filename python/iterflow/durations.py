"""Durations and deadlines as users write them (docs/guide.md §1, "Durations").

Every API that waits (sleep, signal timeouts, step timeouts, delays, retention) takes the same
forms, so they all go through :func:`parse_duration` and fail the same way: an
``InvalidArgument`` that shows the bad value and the accepted forms, raised before anything is
written.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from typing import TypeAlias

from iterflow.errors import InvalidArgument
from iterflow.validate import show

DurationLike: TypeAlias = int | float | timedelta | str
DeadlineLike: TypeAlias = DurationLike | datetime

_ACCEPTED = (
    "use seconds (int or float), a timedelta, or a string like "
    "'250ms', '30s', '5m', '1h', '3d', '2w', '1.5h', '2h30m', '3 days', '10 minutes'"
)

# The longest duration anything accepts (sleeps, timeouts, delays, leases, retention): far
# beyond any real wait, and far inside both Python's and PostgreSQL's date arithmetic.
MAX_DURATION = timedelta(days=36_525)
_MAX_TEXT = "100 years (36525 days)"
_MAX_TEXT_LENGTH = 100  # "2h30m" needs a few characters; a megabyte of them is not a duration

_MILLISECOND = timedelta(milliseconds=1)
_SECOND = timedelta(seconds=1)
_MINUTE = timedelta(minutes=1)
_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)
_WEEK = timedelta(weeks=1)

_UNITS: dict[str, timedelta] = {
    **dict.fromkeys(("ms", "msec", "msecs", "millisecond", "milliseconds"), _MILLISECOND),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), _SECOND),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), _MINUTE),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), _HOUR),
    **dict.fromkeys(("d", "day", "days"), _DAY),
    **dict.fromkeys(("w", "wk", "wks", "week", "weeks"), _WEEK),
}

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_COMPONENT = re.compile(rf"\s*({_NUMBER})\s*([a-z]+)")
# A bare number ("30") is rejected on purpose: seconds and milliseconds are both common
# conventions for unit-less strings, and guessing wrong silently is worse than asking.
_WHOLE = re.compile(rf"(?:\s*{_NUMBER}\s*[a-z]+)+\s*")


def parse_duration(value: DurationLike, *, field: str = "duration") -> timedelta:
    """Turn any accepted duration form into a ``timedelta`` from 0 to ``MAX_DURATION``.

    ``field`` names the argument in the error so the caller can tell which of several
    durations was wrong.
    """
    if isinstance(value, timedelta):
        return _in_range(value, value, field)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _from_seconds(value, field)
    if isinstance(value, str):
        return _from_string(value, field)
    raise InvalidArgument(field, f"{value!r} (type {type(value).__name__}) is not a duration; {_ACCEPTED}")


def deadline(value: DeadlineLike, now: datetime, *, field: str = "duration") -> datetime:
    """The absolute time a wait ends, given either a duration from ``now`` or a moment.

    A past moment means ``now`` (the wait is already over) rather than an error, because a
    replayed or delayed call legitimately reaches a deadline after it has passed. Naive
    datetimes are refused: guessing their zone would move deadlines by hours.
    """
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise InvalidArgument(field, f"{value!r} is a naive datetime; pass a timezone-aware one")
        return max(value, now)
    delta = parse_duration(value, field=field)
    try:
        return now + delta
    except OverflowError:
        raise InvalidArgument(field, f"{value!r} is too far in the future") from None


def format_duration(td: timedelta) -> str:
    """Compact, exact, re-parseable text ("250ms", "1.5s", "1h30m") for messages and the CLI."""
    micros = td // timedelta(microseconds=1)
    if micros < 0:
        return "-" + format_duration(-td)
    if micros == 0:
        return "0s"
    if micros < 1_000_000:
        return _decimal(micros, 1_000) + "ms"
    if micros < 60_000_000:
        return _decimal(micros, 1_000_000) + "s"
    return _compound(micros)


def _from_seconds(seconds: float, field: str) -> timedelta:
    # compared before any float conversion: math.isnan(10**400) itself overflows
    if isinstance(seconds, float) and (math.isnan(seconds) or math.isinf(seconds)):
        raise InvalidArgument(field, f"{seconds!r} is not a finite number of seconds; {_ACCEPTED}")
    if seconds < 0:
        raise InvalidArgument(field, f"{show(seconds)} is negative; durations must be >= 0")
    if seconds > MAX_DURATION.total_seconds():
        raise InvalidArgument(field, f"{show(seconds)} seconds is too far: durations are at most {_MAX_TEXT}")
    return timedelta(seconds=seconds)


def _from_string(text: str, field: str) -> timedelta:
    lowered = text.lower()
    if len(lowered) > _MAX_TEXT_LENGTH or not _WHOLE.fullmatch(lowered):
        if lowered.strip().startswith("-"):
            raise InvalidArgument(field, f"{show(text)} is negative; durations must be >= 0")
        raise InvalidArgument(field, f"{show(text)} is not a duration; {_ACCEPTED}")
    total = timedelta()
    for number, unit in _COMPONENT.findall(lowered):
        size = _UNITS.get(unit)
        if size is None:
            raise InvalidArgument(field, f"{show(text)} has an unknown unit {unit!r}; {_ACCEPTED}")
        try:
            total += size * float(number)
        except OverflowError:
            raise InvalidArgument(field, f"{show(text)} is too far: durations are at most {_MAX_TEXT}") from None
    return _in_range(total, text, field)


def _in_range(td: timedelta, shown: object, field: str) -> timedelta:
    if td < timedelta():
        raise InvalidArgument(field, f"{show(shown)} is negative; durations must be >= 0")
    if td > MAX_DURATION:
        raise InvalidArgument(field, f"{show(shown)} is too far: durations are at most {_MAX_TEXT}")
    return td


def _compound(micros: int) -> str:
    parts: list[str] = []
    for unit, size in (("d", 86_400_000_000), ("h", 3_600_000_000), ("m", 60_000_000)):
        count, micros = divmod(micros, size)
        if count:
            parts.append(f"{count}{unit}")
    if micros:
        parts.append(_decimal(micros, 1_000_000) + "s")
    return "".join(parts)


def _decimal(amount: int, scale: int) -> str:
    """``amount / scale`` written exactly, without float noise or trailing zeros."""
    whole, fraction = divmod(amount, scale)
    if not fraction:
        return str(whole)
    digits = len(str(scale)) - 1
    return f"{whole}.{fraction:0{digits}d}".rstrip("0")
