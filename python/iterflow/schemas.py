"""One validation interface over every kind of schema a user may declare (docs/guide.md §1, "Schemas and values").

Flows declare schemas for their input and signal payloads as pydantic models, other types
pydantic can adapt (``list[int]``, TypedDicts, dataclasses), msgspec Structs, or plain
callables. The engine must not care which: it calls :meth:`Schema.validate` and gets either
the validated object or a ``ValidationFailed`` whose ``issues`` have dotted paths, the same
shape whichever library produced them.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn, cast

import pydantic

from iterflow.codec import JSONValue, dumps
from iterflow.errors import InvalidArgument, Issue, IterflowError, ValidationFailed

_Check = Callable[[Any], Any]

# Stored values are plain JSON; they are validated in pydantic's JSON mode, which is what
# makes a strict model accept the ISO strings, UUID strings and lists its own dump produced.
_PLAIN_JSON = frozenset({dict, list, str, int, float, bool, type(None)})
_MSGSPEC_ERROR = re.compile(r"(?s)(?P<message>.*?) - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`")
_MSGSPEC_MISSING = re.compile(r"missing required field `(?P<field>[^`]+)`")
_MSGSPEC_SEGMENT = re.compile(r"\.([^.\[]+)|\[([^\]]*)\]")
_SUMMARY_ISSUES = 3


class Schema:
    """A declared schema, ready to validate; compare two to detect conflicting declarations.

    Equality follows the declared spec (``==`` where it is hashable, identity otherwise), so
    ``list[int]`` declared twice is the same schema while two different lambdas are not.
    """

    __slots__ = ("_check", "_failures", "_key", "_name", "_spec")

    _spec: object
    _name: str
    _check: _Check
    _failures: tuple[type[Exception], ...]
    _key: tuple[str, object]

    def __init__(self, spec: object) -> None:
        check, failures = _adapt(spec)
        for slot, value in (
            ("_spec", spec),
            ("_name", _name_of(spec)),
            ("_check", check),
            ("_failures", failures),
            ("_key", _identity(spec)),
        ):
            object.__setattr__(self, slot, value)

    @classmethod
    def of(cls, spec: object) -> Schema | None:
        """``None`` means "no schema", so optional declarations need no special casing."""
        if spec is None or isinstance(spec, Schema):
            return spec
        return cls(spec)

    @property
    def name(self) -> str:
        return self._name

    @property
    def spec(self) -> object:
        return self._spec

    def validate(self, value: object, *, code: str, what: str) -> Any:
        """Return the validated object, or raise ``ValidationFailed(code, ...)`` with issues.

        ``what`` starts the message ("input of flow 'order'", "signal 'approve' payload").
        """
        try:
            return self._check(value)
        except self._failures as exc:
            _fail(exc, code, what)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"Schema is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"Schema is immutable; cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schema):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Schema({self._name})"


def _adapt(spec: object) -> tuple[_Check, tuple[type[Exception], ...]]:
    """Pick the validator for a spec and the exceptions that mean "invalid", not "bug"."""
    if isinstance(spec, pydantic.TypeAdapter):
        return _pydantic_check(spec), (pydantic.ValidationError,)
    msgspec = sys.modules.get("msgspec")
    if msgspec is not None and isinstance(spec, type) and issubclass(spec, msgspec.Struct):
        return functools.partial(msgspec.convert, type=spec), (msgspec.ValidationError,)
    if inspect.isroutine(spec) or isinstance(spec, functools.partial):
        return spec, (Exception,)
    if isinstance(spec, str):
        # pydantic would resolve it as a forward reference in *this* module's namespace.
        raise _not_a_schema(spec)
    try:
        adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(cast(Any, spec))
    except pydantic.PydanticSchemaGenerationError:
        if callable(spec):
            return spec, (Exception,)
        raise _not_a_schema(spec) from None
    except pydantic.PydanticUserError as exc:
        raise InvalidArgument("schema", f"{spec!r} cannot be used as a schema: {exc}") from None
    return _pydantic_check(adapter), (pydantic.ValidationError,)


def _pydantic_check(adapter: pydantic.TypeAdapter[Any]) -> _Check:
    def check(value: object) -> Any:
        if type(value) in _PLAIN_JSON:
            try:
                text = dumps(cast("JSONValue", value))  # a plain container may still hold anything
            except (TypeError, ValueError):
                return adapter.validate_python(value)
            return adapter.validate_json(text)
        return adapter.validate_python(value)

    return check


def _fail(exc: Exception, code: str, what: str) -> NoReturn:
    issues = _issues(exc)
    shown = "; ".join(
        f"{i['path']}: {i['message']}" if i["path"] else i["message"] for i in issues[:_SUMMARY_ISSUES]
    )
    if len(issues) > _SUMMARY_ISSUES:
        shown += f" (and {len(issues) - _SUMMARY_ISSUES} more)"
    raise ValidationFailed(code, f"{what} failed validation: {shown}", issues=issues) from exc


def _issues(exc: Exception) -> list[Issue]:
    """Issues from whichever library raised; a callable may itself use pydantic or msgspec."""
    if isinstance(exc, pydantic.ValidationError):
        return [
            {"path": ".".join(str(part) for part in error["loc"]), "message": error["msg"]}
            for error in exc.errors()
        ]
    msgspec = sys.modules.get("msgspec")
    if msgspec is not None and isinstance(exc, msgspec.ValidationError):
        return [_msgspec_issue(str(exc))]
    if isinstance(exc, IterflowError) and exc.issues:
        return list(exc.issues)
    return [{"path": "", "message": str(exc) or type(exc).__name__}]


def _msgspec_issue(text: str) -> Issue:
    """Turn msgspec's "Expected `int`, got `str` - at `$.a[1].x`" into path "a.1.x"."""
    match = _MSGSPEC_ERROR.fullmatch(text)
    message, raw_path = (match["message"], match["path"]) if match else (text, "")
    parts = [name or ("*" if index == "..." else index) for name, index in _MSGSPEC_SEGMENT.findall(raw_path)]
    missing = _MSGSPEC_MISSING.search(message)
    if missing:
        parts.append(missing["field"])
    if match and match["key"]:
        message += " (in a key)"
    return {"path": ".".join(parts), "message": message}


def _name_of(spec: object) -> str:
    if isinstance(spec, type) or inspect.isroutine(spec):
        return str(getattr(spec, "__qualname__", spec))
    return repr(spec)


def _identity(spec: object) -> tuple[str, object]:
    try:
        hash(spec)
    except TypeError:
        return ("id", id(spec))
    return ("eq", spec)


def _not_a_schema(spec: object) -> InvalidArgument:
    return InvalidArgument(
        "schema",
        f"{spec!r} (type {type(spec).__qualname__}) is not a schema; pass a pydantic model or type, "
        "a dataclass, a msgspec Struct, or a callable that validates and returns the value",
    )
