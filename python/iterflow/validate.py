"""The limits on caller-supplied text and numbers, checked before anything is written.

PostgreSQL refuses some values only at write time, and then with an error that names no
argument: a NUL character in ``text``, a string that is not UTF-8 (a lone surrogate), an index
entry over ~2,700 bytes (``index row requires N bytes``), a NOTIFY payload over 8,000 bytes, an
int that does not fit its column. Every value that becomes a name, a key or a tag goes through
this module first and fails with an ``InvalidArgument`` that names the field and the limit.

The limits (docs/guide.md §3, "Limits on names, keys and values"):

- names (flows, steps, signals, crons): 1 to ``MAX_NAME_CHARS`` characters;
- idempotency keys (runs and signals) and tags: 1 to ``MAX_KEY_BYTES`` bytes of UTF-8, at most
  ``MAX_TAGS`` tags per run; a cancel reason at most ``MAX_REASON_BYTES``;
- all of them: no NUL character and valid UTF-8 (no lone surrogates).

Lookups (``list_runs(name=..., tag=...)``, ``remove_cron``) only require well-formed text: a
value too long to be written can still be looked for, it just matches nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import InvalidArgument

MAX_NAME_CHARS = 200
MAX_KEY_BYTES = 1000
MAX_TAGS = 64
MAX_REASON_BYTES = 1000
MAX_VERSION = 2**31 - 1  # the ``version`` column is an int4
DRIFT_MODES = ("park", "fail")


def show(value: object, width: int = 60) -> str:
    """A repr short enough for an error message (a hostile value may be megabytes)."""
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} chars)"


def text(value: object, field: str, *, max_chars: int | None = None, max_bytes: int | None = None,
         allow_empty: bool = False) -> str:
    """``value`` as a plain ``str`` PostgreSQL can store, within the given limits."""
    if not isinstance(value, str):
        raise InvalidArgument(field, f"must be a string, got {type(value).__name__} {show(value)}")
    value = str.__str__(value)
    if not value and not allow_empty:
        raise InvalidArgument(field, "must be a non-empty string")
    if "\x00" in value:
        raise InvalidArgument(field, f"{show(value)} contains a NUL character (\\x00), which PostgreSQL cannot store")
    if value.isascii():
        size = len(value)
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidArgument(
                field, f"{show(value)} contains a lone surrogate; text must be valid UTF-8"
            ) from None
    if max_chars is not None and len(value) > max_chars:
        raise InvalidArgument(field, f"is {len(value)} characters, over the limit of {max_chars}")
    if max_bytes is not None and size > max_bytes:
        raise InvalidArgument(field, f"is {size} bytes (UTF-8), over the limit of {max_bytes}")
    return value


def name(value: object, field: str) -> str:
    """Names become cursor keys, index entries and NOTIFY payloads: 1 to ``MAX_NAME_CHARS``
    characters of valid UTF-8 without NUL, not blank. Any other character is fine: cursor keys
    encode ``:`` and ``%`` (keys.py), so no name can produce another call's key."""
    value = text(value, field, max_chars=MAX_NAME_CHARS)
    if not value.strip():
        raise InvalidArgument(field, f"must be a non-empty string, got {value!r}")
    return value


def version(value: Any) -> int:
    """A positive int that fits the ``version`` column (int4)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VERSION:
        raise InvalidArgument("version", f"must be an int from 1 to {MAX_VERSION:,}, got {show(value)}")
    return value


def drift(value: Any) -> str | None:
    """``None`` (the engine's default) or one of ``DRIFT_MODES`` (docs/replay.md §6)."""
    if value is None:
        return None
    if value not in DRIFT_MODES:
        raise InvalidArgument("drift", f"must be 'park' or 'fail', got {value!r}")
    return str(value)


def idempotency_key(value: Any, field: str = "idempotency_key") -> str | None:
    """``None`` or a non-empty key of at most ``MAX_KEY_BYTES`` bytes."""
    if value is None:
        return None
    return text(value, field, max_bytes=MAX_KEY_BYTES)


def tags(value: Any, field: str = "tags") -> tuple[str, ...]:
    """A sequence of at most ``MAX_TAGS`` non-empty tags, each at most ``MAX_KEY_BYTES`` bytes.

    A bare string is refused: ``tuple("vip")`` would silently be three one-letter tags.
    """
    if isinstance(value, (str, bytes, bytearray)) or not isinstance(value, Iterable):
        raise InvalidArgument(field, f"must be a list of strings, got {type(value).__name__} {show(value)}")
    out = tuple(value)
    if len(out) > MAX_TAGS:
        raise InvalidArgument(field, f"has {len(out)} tags, over the limit of {MAX_TAGS}")
    return tuple(text(t, f"{field}[{i}]", max_bytes=MAX_KEY_BYTES) for i, t in enumerate(out))


def reason(value: Any, field: str = "reason") -> str | None:
    if value is None:
        return None
    return text(value, field, max_bytes=MAX_REASON_BYTES)


def lookup(value: Any, field: str) -> str | None:
    """A filter value: any well-formed text (no length limit), or None."""
    if value is None:
        return None
    return text(value, field)


def integer(value: Any, field: str, low: int, high: int) -> int:
    """An ``int`` (not a bool) within ``low..high`` inclusive."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(field, f"must be an int from {low:,} to {high:,}, got {show(value)}")
    return int(value)


def flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(field, f"must be True or False, got {show(value)}")
    return value
