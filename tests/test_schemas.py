"""Schema adapters: one validate() over pydantic, msgspec, dataclasses and callables
(docs/guide.md §1, "Schemas and values")."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID, uuid4

import msgspec
import pydantic
import pytest
from typing_extensions import TypedDict

from iterflow.codec import to_json
from iterflow.errors import Code, InvalidArgument, ValidationFailed
from iterflow.schemas import Schema


class Line(pydantic.BaseModel):
    sku: str
    qty: int


class Order(pydantic.BaseModel):
    id: str
    lines: list[Line]


class StrictEvent(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)
    at: datetime
    ref: UUID
    pair: tuple[int, int]


class Movie(TypedDict):
    title: str
    year: int


@dataclasses.dataclass
class Address:
    city: str
    zip: int


class Pt(msgspec.Struct):
    x: int


class Shape(msgspec.Struct):
    points: list[Pt]
    meta: dict[str, int] = {}


def validate(spec: object, value: object) -> Any:
    schema = Schema.of(spec)
    assert schema is not None
    return schema.validate(value, code=Code.INPUT_INVALID, what="input of flow 'f'")


def failure(spec: object, value: object, code: str = Code.INPUT_INVALID) -> ValidationFailed:
    schema = Schema.of(spec)
    assert schema is not None
    with pytest.raises(ValidationFailed) as info:
        schema.validate(value, code=code, what="signal 'go' payload")
    assert info.value.code == code
    assert info.value.message.startswith("signal 'go' payload failed validation: ")
    return info.value


def paths(error: ValidationFailed) -> list[str]:
    return [issue["path"] for issue in error.issues]


def test_of_none_is_none_and_schema_passes_through() -> None:
    assert Schema.of(None) is None
    schema = Schema(Order)
    assert Schema.of(schema) is schema


def test_pydantic_model_from_json_dict() -> None:
    order = validate(Order, {"id": "o1", "lines": [{"sku": "a", "qty": "2"}]})
    assert isinstance(order, Order)
    assert order.lines[0].qty == 2


def test_pydantic_model_accepts_an_instance() -> None:
    order = Order(id="o1", lines=[])
    assert validate(Order, order) is order


def test_pydantic_errors_become_issues_with_dotted_paths() -> None:
    error = failure(Order, {"id": 5, "lines": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": "many"}, {}]})
    assert paths(error) == ["id", "lines.1.qty", "lines.2.sku", "lines.2.qty"]
    assert (
        error.issues[1]["message"] == "Input should be a valid integer, unable to parse string as an integer"
    )
    assert "lines.1.qty: Input should be a valid integer" in error.message
    assert error.message.endswith("(and 1 more)")


def test_code_is_the_callers() -> None:
    failure(Order, {}, code=Code.SIGNAL_PAYLOAD_INVALID)


def test_strict_model_revalidates_its_own_stored_json() -> None:
    event = StrictEvent(at=datetime(2024, 1, 1, tzinfo=UTC), ref=uuid4(), pair=(1, 2))
    stored = to_json(event, field="input")
    assert validate(StrictEvent, stored) == event


def test_strict_model_still_strict_for_wrong_json_types() -> None:
    error = failure(StrictEvent, {"at": "2024-01-01T00:00:00Z", "ref": str(uuid4()), "pair": ["1", 2]})
    assert paths(error) == ["pair.0"]


def test_plain_dict_with_python_objects_is_validated_in_python_mode() -> None:
    ref = uuid4()
    event = validate(StrictEvent, {"at": datetime(2024, 1, 1, tzinfo=UTC), "ref": ref, "pair": (1, 2)})
    assert event.ref == ref


def test_type_adapter_types() -> None:
    assert validate(list[int], ["1", 2]) == [1, 2]
    assert paths(failure(list[int], [1, "x", 3])) == ["1"]
    assert validate(Movie, {"title": "t", "year": "1999"}) == {"title": "t", "year": 1999}
    assert paths(failure(Movie, {"title": "t"})) == ["year"]
    assert validate(Annotated[int, pydantic.Field(gt=0)], 3) == 3
    assert paths(failure(Annotated[int, pydantic.Field(gt=0)], 0)) == [""]


def test_dataclass_type_via_type_adapter() -> None:
    address = validate(Address, {"city": "Oslo", "zip": "150"})
    assert address == Address(city="Oslo", zip=150)
    assert validate(Address, Address(city="Oslo", zip=1)) == Address(city="Oslo", zip=1)
    assert paths(failure(Address, {"city": "Oslo", "zip": "x"})) == ["zip"]


def test_type_adapter_instance() -> None:
    adapter = pydantic.TypeAdapter(dict[str, int])
    assert validate(adapter, {"a": "1"}) == {"a": 1}
    assert paths(failure(adapter, {"a": "x"})) == ["a"]


def test_msgspec_struct() -> None:
    shape = validate(Shape, {"points": [{"x": 1}]})
    assert shape == Shape(points=[Pt(x=1)])
    assert validate(Shape, shape) is shape


@pytest.mark.parametrize(
    ("value", "path", "message"),
    [
        ({"points": [{"x": 1}, {"x": "no"}]}, "points.1.x", "Expected `int`, got `str`"),
        ({"points": 3}, "points", "Expected `array`, got `int`"),
        ({}, "points", "Object missing required field `points`"),
        ({"points": [{}]}, "points.0.x", "Object missing required field `x`"),
        ({"points": [], "meta": {"k": "v"}}, "meta.*", "Expected `int`, got `str`"),
        ({"points": [], "meta": {1: 2}}, "meta", "Expected `str`, got `int` (in a key)"),
        ("nope", "", "Expected `object`, got `str`"),
    ],
)
def test_msgspec_errors_become_dotted_issues(value: object, path: str, message: str) -> None:
    error = failure(Shape, value)
    assert error.issues == [{"path": path, "message": message}]


def test_plain_callable_validator() -> None:
    def positive(value: int) -> int:
        if value <= 0:
            raise ValueError("must be positive")
        return value * 10

    assert validate(positive, 2) == 20
    error = failure(positive, -1)
    assert error.issues == [{"path": "", "message": "must be positive"}]
    assert error.message.endswith("failed validation: must be positive")
    assert isinstance(error.__cause__, ValueError)


def test_callable_with_empty_message_reports_the_exception_type() -> None:
    def check(value: object) -> object:
        if value != "ok":
            raise ValueError()
        return value

    assert failure(check, "bad").issues == [{"path": "", "message": "ValueError"}]


def test_callable_that_uses_pydantic_keeps_its_paths() -> None:
    assert paths(failure(lambda v: Order.model_validate(v), {"id": "x", "lines": [{"sku": 1}]})) == [
        "lines.0.sku",
        "lines.0.qty",
    ]


def test_callable_raising_validation_failed_keeps_its_issues() -> None:
    def check(value: object) -> object:
        raise ValidationFailed("X", "bad", issues=[{"path": "a.b", "message": "nope"}])

    assert failure(check, {}).issues == [{"path": "a.b", "message": "nope"}]


def test_callable_objects_and_unadaptable_classes_are_callables() -> None:
    class Upper:
        def __call__(self, value: str) -> str:
            return value.upper()

    class Email:
        def __init__(self, value: str) -> None:
            if "@" not in value:
                raise ValueError(f"{value!r} is not an email")
            self.value = value

    assert validate(Upper(), "a") == "A"
    assert validate(Email, "a@b").value == "a@b"
    assert failure(Email, "nope").issues == [{"path": "", "message": "'nope' is not an email"}]


def test_bugs_in_pydantic_validators_are_not_swallowed_as_invalid() -> None:
    class Boom(pydantic.BaseModel):
        a: int

        @pydantic.field_validator("a")
        @classmethod
        def explode(cls, value: int) -> int:
            raise KeyError("bug")

    with pytest.raises(KeyError):
        validate(Boom, {"a": 1})


@pytest.mark.parametrize("spec", [42, "Order", [int]])
def test_non_schemas_are_invalid_arguments(spec: object) -> None:
    with pytest.raises(InvalidArgument) as info:
        Schema.of(spec)
    assert info.value.field == "schema"
    assert "is not a schema" in info.value.message


def test_names() -> None:
    def check(value: object) -> object:
        return value

    assert Schema(Order).name == "Order"
    assert Schema(Pt).name == "Pt"
    assert Schema(list[int]).name == "list[int]"
    assert Schema(check).name == "test_names.<locals>.check"
    assert repr(Schema(Order)) == "Schema(Order)"


def test_equality_follows_the_spec() -> None:
    def check(value: object) -> object:
        return value

    assert Schema(Order) == Schema(Order)
    assert Schema(list[int]) == Schema(list[int])
    assert Schema(check) == Schema(check)
    assert Schema(Order) != Schema(Line)
    assert Schema(list[int]) != Schema(list[str])
    assert Schema(lambda v: v) != Schema(lambda v: v)
    assert len({Schema(Order), Schema(Order), Schema(Pt), Schema(Pt)}) == 2
    assert Schema(Order) != Order


def test_unhashable_specs_compare_by_identity() -> None:
    class Checker:
        def __eq__(self, other: object) -> bool:
            return isinstance(other, Checker)

        def __call__(self, value: object) -> object:
            return value

    first, second = Checker(), Checker()
    assert Schema(first) == Schema(first)
    assert Schema(first) != Schema(second)
    assert len({Schema(first), Schema(first), Schema(second)}) == 2


def test_schema_is_immutable() -> None:
    schema = Schema(Order)
    with pytest.raises(AttributeError):
        schema._spec = Line
    with pytest.raises(AttributeError):
        del schema._name
    assert schema.spec is Order
