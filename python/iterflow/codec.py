"""The one JSON form of every durable value (docs/guide.md §1, "Schemas and values").

Inputs, step results, signal payloads, outputs and errors are stored as ``jsonb``. A body must
see the same value on its first run and on every replay, so what it gets back is always this
module's normal form, never the object user code happened to return. Everything that is not
plain JSON is lowered here, once, with an error that names the offending spot *before* any
write, instead of a driver error (or silently different data) after it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable, Mapping
from datetime import date, datetime, time
from decimal import Decimal
from enum import Enum
from typing import Any, TypeAlias
from uuid import UUID

from iterflow.errors import InvalidArgument, IterflowError, LimitExceeded

JSONValue: TypeAlias = None | bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"]

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# An escaped NUL that is not itself an escaped backslash followed by "u0000".
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class _Unserializable(Exception):
    """Carries the reason out of the recursion; the path is filled in while unwinding."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []

    def describe(self) -> str:
        where = ".".join(reversed(self.path))
        return f"value at {where!r} {self.reason}" if where else f"value {self.reason}"


def to_json(value: object, *, field: str) -> JSONValue:
    """Lower ``value`` to plain JSON types (dict/list/str/int/float/bool/None).

    ``field`` names the value in the error ("input", "step 'charge' result", ...).
    """
    try:
        return _convert(value)
    except _Unserializable as exc:
        raise InvalidArgument(field, exc.describe()) from None
    except RecursionError:
        raise InvalidArgument(field, "value is nested too deeply or contains a cycle") from None


def dumps(value: object) -> str:
    """Compact text; NaN/Infinity are refused because jsonb (and strict JSON) cannot hold them."""
    return _ENCODER.encode(value)


def loads(text: str | bytes) -> JSONValue:
    """Parse stored JSON, refusing NaN/Infinity so a loaded value always re-encodes."""
    result: JSONValue = json.loads(text, parse_constant=_reject_constant)
    return result


def encode(value: object, *, field: str, limit: int | None, code: str) -> str:
    """Normalize, serialize and size-check a value about to be written.

    The size is the UTF-8 byte length because that is what the database stores and what the
    ``limits`` caps promise. Strings PostgreSQL's jsonb cannot hold (NUL, lone surrogates)
    are refused here so the failure names the field instead of aborting a batch commit.
    """
    if value is None:  # most steps return nothing
        return "null"
    try:
        text = _serialize(value, field)
    except IterflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a model's own serializer raising: still a typed error
        raise InvalidArgument(field, f"value could not be serialized: {type(exc).__name__}: {exc}") from None
    size = len(text) if text.isascii() else _utf8_size(text, field)
    if "\\u0000" in text and _ESCAPED_NUL.search(text):
        raise InvalidArgument(field, "value contains a NUL character (\\u0000), which jsonb cannot store")
    if limit is not None and size > limit:
        raise LimitExceeded(code, f"{field} is {size} bytes, over the limit of {limit}")
    return text


def _serialize(value: object, field: str) -> str:
    """``dumps(to_json(value))``, about twice as fast for values that are mostly plain JSON.

    The C encoder walks the native types itself and hands anything else to the same
    conversion ``to_json`` uses, so the text is the same. On any failure the slow path runs
    to raise ``to_json``'s error, which names the field and the path.
    """
    try:
        return _HOOKED_ENCODER.encode(value)
    except (TypeError, ValueError, RecursionError, _Unserializable):
        return dumps(to_json(value, field=field))


def _convert(value: object) -> JSONValue:
    # Exact-type checks first: plain JSON is the common case and must stay cheap.
    if value is None or type(value) is str or type(value) is bool:
        return value
    if type(value) is int:
        return value if value.bit_length() <= _SAFE_INT_BITS else _big_int(value)
    if type(value) is float:
        return _finite(value)
    if type(value) is dict:
        return _convert_mapping(value)
    if type(value) is list:
        return _convert_sequence(value)
    return _convert_other(value)


def _convert_other(value: object) -> JSONValue:
    if isinstance(value, Enum):
        return _convert(value.value)
    if isinstance(value, (str, int, float)):
        return _convert_scalar_subclass(value)
    if isinstance(value, Mapping):
        return _convert_mapping(value)
    if isinstance(value, (list, tuple)):
        return _convert_sequence(value)
    if isinstance(value, (set, frozenset)):
        return _sorted(_convert_sequence(value))
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (UUID, Decimal)):
        return str(value)
    return _convert_model(value)


def _convert_model(value: object) -> JSONValue:
    """Models and dataclasses; pydantic and msgspec are looked up, never imported.

    An instance of their classes can only exist once the library is imported, so checking
    ``sys.modules`` keeps both optional at no cost.
    """
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(value, pydantic.BaseModel):
        return _convert(_guarded(lambda: value.model_dump(mode="json")))
    msgspec = sys.modules.get("msgspec")
    if msgspec is not None and isinstance(value, msgspec.Struct):
        return _convert(_guarded(lambda: msgspec.to_builtins(value)))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _convert_mapping({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise _Unserializable("is bytes, which JSON cannot hold; decode or base64-encode it")
    raise _Unserializable(
        f"is not JSON-serializable (type {type(value).__qualname__}); return plain data or a model"
    )


def _guarded(dump: Callable[[], object]) -> object:
    """A model whose own serializer fails is reported like any other unserializable value."""
    try:
        return dump()
    except (TypeError, ValueError) as exc:
        raise _Unserializable(f"could not be serialized: {exc}") from None


def _convert_mapping(value: Mapping[Any, Any]) -> dict[str, JSONValue]:
    out: dict[str, JSONValue] = {}
    for key, item in value.items():
        name = key if type(key) is str else _key(key)
        try:
            out[name] = _convert(item)
        except _Unserializable as exc:
            exc.path.append(name)
            raise
    return out


def _convert_sequence(value: Any) -> list[JSONValue]:
    out: list[JSONValue] = []
    for index, item in enumerate(value):
        try:
            out.append(_convert(item))
        except _Unserializable as exc:
            exc.path.append(str(index))
            raise
    return out


def _key(key: object) -> str:
    """Non-string keys become strings exactly as ``json.dumps`` would write them."""
    if isinstance(key, str):
        return str.__str__(key)
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return int.__repr__(_big_int(int(key)))
    if isinstance(key, float):
        return float.__repr__(_finite(key))
    if key is None:
        return "null"
    raise _Unserializable(
        f"has a key {key!r} of type {type(key).__qualname__}; keys must be str, int, float, bool or None"
    )


def _convert_scalar_subclass(value: str | float) -> JSONValue:
    """A subclass (e.g. a NewType-like wrapper) is stored as its plain base value."""
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return _convert(int(value))
    return _finite(float(value))


# Every int this wide has fewer digits than the smallest allowed int->str limit (640).
_SAFE_INT_BITS = 2000


def _big_int(value: int) -> int:
    """An int Python can still write as decimal text (``sys.get_int_max_str_digits()``)."""
    try:
        int.__repr__(value)
    except ValueError:
        raise _Unserializable(
            f"is an integer with more than {sys.get_int_max_str_digits()} digits, which cannot be "
            "written as JSON; store it as a string"
        ) from None
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise _Unserializable(f"is {value!r}; JSON has no NaN or Infinity")
    return value


def _sorted(items: list[Any]) -> list[JSONValue]:
    """Sets have no order; sort them so the stored form does not depend on hash seeds."""
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=dumps)


def _utf8_size(text: str, field: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(field, "value contains a lone surrogate, which is not valid UTF-8") from None


_HOOKED_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_convert_other
)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")
