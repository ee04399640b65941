"""JSON normalization of durable values (docs/guide.md §1, "Schemas and values")."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections import OrderedDict
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
import pydantic
import pytest

from iterflow.codec import dumps, encode, loads, to_json
from iterflow.errors import Code, InvalidArgument, LimitExceeded


class Color(enum.Enum):
    RED = "red"
    PAIR = (1, 2)


class Level(enum.IntEnum):
    LOW = 1


class Kind(str, enum.Enum):  # noqa: UP042 - the mixin form is what users write
    A = "a"


class Item(pydantic.BaseModel):
    sku: str
    when: datetime
    tags: set[str] = set()


class Point(msgspec.Struct):
    x: int
    at: date


@dataclasses.dataclass
class Line:
    start: Point
    label: str
    color: Color = Color.RED


class UserStr(str):
    pass


WHEN = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
ID = UUID("12345678-1234-5678-1234-567812345678")


@pytest.mark.parametrize("value", [None, True, False, 0, -7, 2**70, 1.5, "", "héllo ✓", [], {}])
def test_plain_scalars_and_empties_pass_through(value: object) -> None:
    assert to_json(value, field="v") == value


def test_plain_nested_json_is_equal_and_types_kept() -> None:
    value = {"a": [1, 2.5, {"b": None, "c": [True, "x"]}], "d": {}}
    out = to_json(value, field="v")
    assert out == value
    assert type(out["a"][0]) is int and type(out["a"][1]) is float  # type: ignore[index]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (WHEN, "2024-05-01T12:30:00+00:00"),
        (date(2024, 5, 1), "2024-05-01"),
        (time(8, 15), "08:15:00"),
        (ID, "12345678-1234-5678-1234-567812345678"),
        (Decimal("12.50"), "12.50"),
        (Color.RED, "red"),
        (Color.PAIR, [1, 2]),
        (Level.LOW, 1),
        (Kind.A, "a"),
        ((1, "a"), [1, "a"]),
        ({10, 1, 5}, [1, 5, 10]),
        (frozenset({"b", "a"}), ["a", "b"]),
        (UserStr("x"), "x"),
        (OrderedDict(b=1, a=2), {"b": 1, "a": 2}),
    ],
)
def test_lowers_non_json_types(value: object, expected: object) -> None:
    out = to_json(value, field="v")
    assert out == expected
    assert type(out) is type(expected)


def test_unsortable_set_is_ordered_by_its_json_text() -> None:
    assert to_json({3, "b", None, 1, "a"}, field="v") == ["a", "b", 1, 3, None]


@pytest.mark.parametrize(
    ("key", "text"),
    [
        (1, "1"),
        (-2.5, "-2.5"),
        (True, "true"),
        (False, "false"),
        (None, "null"),
        (Kind.A, "a"),
        (Level.LOW, "1"),
    ],
)
def test_keys_become_strings_like_json(key: object, text: str) -> None:
    value = {key: "x"}
    assert to_json(value, field="v") == {text: "x"}
    assert json.loads(json.dumps(value)) == {text: "x"}


@pytest.mark.parametrize("key", [(1, 2), Color.RED, b"k", frozenset()])
def test_other_key_types_are_rejected(key: object) -> None:
    with pytest.raises(InvalidArgument, match="key"):
        to_json({key: 1}, field="v")


def test_pydantic_model_becomes_its_json_dump() -> None:
    out = to_json(Item(sku="a", when=WHEN, tags={"z"}), field="v")
    assert out == {"sku": "a", "when": "2024-05-01T12:30:00Z", "tags": ["z"]}


def test_msgspec_struct_becomes_builtins() -> None:
    assert to_json(Point(x=1, at=date(2024, 1, 2)), field="v") == {"x": 1, "at": "2024-01-02"}


def test_dataclass_becomes_a_recursively_normalized_dict() -> None:
    out = to_json(Line(start=Point(x=3, at=date(2024, 1, 2)), label="l"), field="v")
    assert out == {"start": {"x": 3, "at": "2024-01-02"}, "label": "l", "color": "red"}


def test_models_nested_in_plain_containers() -> None:
    out = to_json({"items": [Item(sku="a", when=WHEN)], "at": (ID,)}, field="v")
    assert out == {"items": [{"sku": "a", "when": "2024-05-01T12:30:00Z", "tags": []}], "at": [str(ID)]}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [1.0, math.nan], {"a": {"b": math.inf}}])
def test_nan_and_infinity_are_rejected(value: object) -> None:
    with pytest.raises(InvalidArgument, match="NaN or Infinity"):
        to_json(value, field="v")


def test_nan_key_is_rejected() -> None:
    with pytest.raises(InvalidArgument):
        to_json({math.nan: 1}, field="v")


def test_bytes_are_rejected_with_a_hint() -> None:
    with pytest.raises(InvalidArgument, match="base64"):
        to_json({"blob": b"\x00"}, field="v")


def test_unknown_object_error_names_field_type_and_path() -> None:
    class Widget:
        pass

    with pytest.raises(InvalidArgument) as info:
        to_json({"order": {"lines": [1, Widget()]}}, field="step 'charge' result")
    error = info.value
    assert error.code == Code.INVALID_ARGUMENT
    assert error.field == "step 'charge' result"
    assert "'order.lines.1'" in error.message
    assert (
        "not JSON-serializable (type test_unknown_object_error_names_field_type_and_path.<locals>.Widget)"
        in (error.message)
    )
    assert "return plain data or a model" in error.message


def test_top_level_unknown_object_has_no_path() -> None:
    with pytest.raises(InvalidArgument, match=r"v: value is not JSON-serializable \(type object\)"):
        to_json(object(), field="v")


def test_model_whose_serializer_fails_is_invalid_argument() -> None:
    class Bad(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
        thing: object

    with pytest.raises(InvalidArgument, match="could not be serialized"):
        to_json(Bad(thing=object()), field="v")


def test_deep_nesting_is_handled() -> None:
    value: Any = "leaf"
    for _ in range(200):
        value = {"k": [value]}
    out = to_json(value, field="v")
    assert out == value
    assert loads(encode(value, field="v", limit=None, code=Code.INPUT_TOO_LARGE)) == value


def test_cycles_are_rejected() -> None:
    value: list[Any] = []
    value.append(value)
    with pytest.raises(InvalidArgument, match="cycle"):
        to_json(value, field="v")
    with pytest.raises(InvalidArgument, match="cycle"):
        encode(value, field="v", limit=None, code=Code.INPUT_TOO_LARGE)


def test_dumps_is_compact_and_keeps_unicode() -> None:
    assert dumps({"a": [1, "é"], "b": None}) == '{"a":[1,"é"],"b":null}'


def test_dumps_rejects_nan() -> None:
    with pytest.raises(ValueError):
        dumps(math.nan)


def test_loads_accepts_str_and_bytes_and_rejects_nan() -> None:
    assert loads('{"a":[1,2]}') == {"a": [1, 2]}
    assert loads('"é"'.encode()) == "é"
    with pytest.raises(ValueError):
        loads("[NaN]")


def test_encode_normalizes_then_serializes() -> None:
    text = encode(
        {"item": Item(sku="a", when=WHEN), "n": Decimal("1.0")}, field="input", limit=None, code="X"
    )
    assert loads(text) == {"item": {"sku": "a", "when": "2024-05-01T12:30:00Z", "tags": []}, "n": "1.0"}


ZOO: list[object] = [
    {"a": 1, "b": [1.5, None, True], "c": {"d": "é"}},
    {1: "a", None: "b", 2.5: "c", False: "d", Kind.A: "e"},
    {Level.LOW: "f"},
    [(1, 2), {3, 1}, frozenset({"x"}), OrderedDict(z=1)],
    {"m": Item(sku="s", when=WHEN, tags={"b", "a"}), "p": Point(x=1, at=date(2024, 1, 1))},
    Line(start=Point(x=1, at=date(2024, 1, 1)), label="x"),
    [Color.RED, Color.PAIR, Level.LOW, Kind.A, UserStr("u"), ID, Decimal(2), WHEN, time(1, 2)],
    {"mixed": {1, "a"}},
]


@pytest.mark.parametrize("value", ZOO)
def test_encode_matches_to_json(value: object) -> None:
    text = encode(value, field="v", limit=None, code="X")
    assert text == dumps(to_json(value, field="v"))


@pytest.mark.parametrize(
    "value",
    [{"a": object()}, [math.nan], {"k": b"x"}, {(1,): 2}, {"d": {"e": [1, {"f": math.inf}]}}],
)
def test_encode_errors_match_to_json_errors(value: object) -> None:
    with pytest.raises(InvalidArgument) as slow:
        to_json(value, field="v")
    with pytest.raises(InvalidArgument) as fast:
        encode(value, field="v", limit=None, code="X")
    assert fast.value.message == slow.value.message


def test_encode_limit_counts_utf8_bytes() -> None:
    value = "é" * 10  # 20 bytes of UTF-8 plus two quotes
    assert encode(value, field="input", limit=22, code=Code.INPUT_TOO_LARGE) == '"' + "é" * 10 + '"'
    with pytest.raises(LimitExceeded) as info:
        encode(value, field="input", limit=21, code=Code.INPUT_TOO_LARGE)
    assert info.value.code == Code.INPUT_TOO_LARGE
    assert info.value.message == "input is 22 bytes, over the limit of 21"


def test_encode_limit_uses_the_given_code() -> None:
    with pytest.raises(LimitExceeded) as info:
        encode({"a": "x" * 100}, field="step 'a' result", limit=10, code=Code.STEP_RESULT_TOO_LARGE)
    assert info.value.code == Code.STEP_RESULT_TOO_LARGE
    assert info.value.message.startswith("step 'a' result is 108 bytes")


def test_encode_without_limit_accepts_big_values() -> None:
    assert len(encode("x" * 2_000_000, field="v", limit=None, code="X")) == 2_000_002


def test_encode_rejects_nul_which_jsonb_cannot_store() -> None:
    with pytest.raises(InvalidArgument, match="NUL"):
        encode({"a": "x\x00y"}, field="v", limit=None, code="X")
    with pytest.raises(InvalidArgument, match="NUL"):
        encode({"a\x00": 1}, field="v", limit=None, code="X")


@pytest.mark.parametrize("text", ["\\u0000", "\\\\u0000", "a\\", "\\\\"])
def test_encode_accepts_backslashes_that_only_look_like_nul(text: str) -> None:
    assert loads(encode(text, field="v", limit=None, code="X")) == text


def test_encode_rejects_escaped_backslash_then_nul() -> None:
    with pytest.raises(InvalidArgument, match="NUL"):
        encode("\\\x00", field="v", limit=None, code="X")


def test_encode_rejects_lone_surrogates() -> None:
    with pytest.raises(InvalidArgument, match="surrogate"):
        encode("a\ud800", field="v", limit=None, code="X")
