"""pydantic models whose errors read like the rest of the tool: ``file: field=value: what is allowed``.

The models declare types, ranges and choices; pydantic checks them and writes the JSON Schema editors use.
One translator, :func:`config_error`, turns pydantic's first error into a :class:`ConfigError`:

- an unknown key names the close one (did-you-mean) and lists the fields of the model it was found in;
- a wrong type says "must be an integer", "must be a number", "must be a string", "must be true or false";
- a range says it whole ("must be in [0, 1]", "must be between 1 and 1000"), from the field's constraints;
- a list item that is wrong shows the whole list and the item;
- a field that carries a :class:`Rule` says that rule instead, for any error of the field or its items;
- a :class:`ConfigError` raised by a validator keeps its words; its field is relative to the model (or the
  field) whose validator raised it, and ``""`` names that model itself.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from sounding_anagrams.errors import ConfigError, unknown_name_message

_MISSING = object()
_Model = TypeVar("_Model", bound="StrictModel")


@dataclass(frozen=True)
class Rule:
    """What a field allows, said in every type or range error of the field and of its items.

    For fields whose rule is one sentence a person reads better than its parts, e.g.
    ``Annotated[list[float], Rule("give a list of fractions of the steps in (0, 1), e.g. [0.5, 0.75]")]``.
    """

    text: str


@dataclass(frozen=True)
class NullIsDefault:
    """Marks a field where null asks for the default (``image_start_step: null``); its type errors say so."""


NULL_IS_DEFAULT = NullIsDefault()


class StrictModel(BaseModel):
    """A frozen model that refuses unknown keys and coerces nothing but ints to floats and lists to tuples.

    ``SECTIONS`` are fields holding a model of their own whose errors are named ``file: section: field``.
    Building one with keywords raises :class:`ConfigError`, as :meth:`validate_data` does.
    """

    # Field descriptions are given with Field(description=...), not read from attribute docstrings: reading
    # those walks sys.modules and would import every lazily loaded module (torch) at the first config.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    SECTIONS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise config_error(error, type(self), data) from None

    # Nested models are validated by pydantic, not through this __init__ (as RootModel does), so that their
    # errors keep their place (``render.views``) in the outer model's error.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @classmethod
    def validate_data(
        cls: type[_Model], data: Any, *, source: str | None = None, what: str = "config"
    ) -> _Model:
        """The model of ``data`` (a mapping read from YAML); errors name ``source`` and the field."""
        if not isinstance(data, Mapping):
            raise ConfigError(what, data, "must be a mapping of field: value", source=source)
        try:
            return cls.model_validate(dict(data))
        except ValidationError as error:
            raise config_error(error, cls, data, source=source) from None


def config_error(
    error: ValidationError, model: type[BaseModel], data: Any, *, source: str | None = None
) -> ConfigError:
    """The first of pydantic's errors as one :class:`ConfigError` (see the module's docstring)."""
    first = error.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    sections = getattr(model, "SECTIONS", ())
    kind, value = first["type"], first.get("input")
    raised = first.get("ctx", {}).get("error")
    if loc and loc[0] in sections and (len(loc) > 1 or isinstance(raised, ConfigError)):
        source = f"{source}: {loc[0]}" if source else str(loc[0])
        model = _annotation_at(model, loc[:1])
        data = _value_at(data, loc[:1])
        loc = loc[1:]

    if isinstance(raised, ConfigError):
        # A validator's own words; its field is relative to the model or field it validated.
        base = loc if _is_model(_annotation_at(model, loc)) else loc[:-1]
        field = _join((*base, raised.field) if raised.field else base)
        return ConfigError(field, raised.value, raised.allowed, source=source or raised.source)
    if kind == "invalid_key" or (loc and loc[-1] == "[key]"):
        # pydantic's place of a bad key: (..., key) at the top, (..., key, "[key]") in a dict field.
        parent = loc[:-2] if loc and loc[-1] == "[key]" else loc[:-1]
        return ConfigError(
            _join(parent) or "config",
            _value_at(data, parent),
            f"has a key {value!r} that is not text; keys are names",
            source=source,
        )
    if kind == "extra_forbidden":
        known = list(getattr(_annotation_at(model, loc[:-1]), "model_fields", {}))
        return ConfigError(
            _join(loc), value, unknown_name_message("field", str(loc[-1]), known), source=source
        )

    # An error of a list's item is said of the whole list; a missing field has no value.
    item_of_list = len(loc) > 1 and isinstance(loc[-1], int)
    field_loc = loc[:-1] if item_of_list else loc
    info = _field_info(model, field_loc)
    shown = _shown(_value_at(data, field_loc) if item_of_list or kind == "missing" else value, info)
    rule = next((m for m in info.metadata if isinstance(m, Rule)), None) if info else None
    if raised is not None:
        allowed = str(raised)
    elif rule is not None:
        return ConfigError(_join(field_loc), shown, rule.text, source=source)
    else:
        name = str(field_loc[-1]) if field_loc else "value"
        nullable = not item_of_list and info is not None and NULL_IS_DEFAULT in info.metadata
        allowed = _allowed(kind, value, info, _annotation_at(model, loc), name, nullable, first["msg"])
    if item_of_list:
        allowed = f"every item {allowed}, but got {value!r}"
    return ConfigError(_join(field_loc), shown, allowed, source=source)


def _allowed(
    kind: str, value: Any, info: FieldInfo | None, annotation: Any, name: str, nullable: bool, said: str
) -> str:
    """What a field allows, from its type and constraints, for one of pydantic's error types (``said``:
    pydantic's own words, for the kinds not named here)."""
    choices = _literal_choices(annotation)
    if kind == "literal_error" and choices:
        if not isinstance(value, str):
            return f"must be one of {', '.join(str(c) for c in choices)}"
        return unknown_name_message(name, value, [str(c) for c in choices])
    if kind == "missing":
        return "is required"
    if kind in ("model_type", "model_attributes_type", "dict_type", "mapping_type"):
        return "must be a mapping"
    if kind in ("list_type", "tuple_type"):
        return "must be a list"
    if kind == "bool_type":
        return "must be true or false"
    if kind == "string_type":
        return "must be a string"
    or_null = " (or null for the default)" if nullable else ""
    bounds = _bounds(info)
    if kind in ("int_type", "int_from_float", "int_parsing"):
        return "must be an integer" + or_null
    if kind in ("float_type", "float_parsing") and (bounds or _allows_inf_nan(info)):
        return "must be a number" + or_null
    if kind in ("float_type", "float_parsing", "finite_number") and not bounds:
        return "must be a finite number" + or_null
    if bounds or kind in ("multiple_of", "finite_number"):
        return _range_message(bounds, annotation)
    return said[0].lower() + said[1:] if said else kind


def _range_message(bounds: dict[str, Any], annotation: Any) -> str:
    """``must be in [0, 1]``, ``must be between 1 and 1000``, ``must be an integer of at least 1``."""
    integer = annotation is int
    low = bounds.get("ge", bounds.get("gt"))
    high = bounds.get("le", bounds.get("lt"))
    multiple = f"a multiple of {bounds['multiple_of']} " if "multiple_of" in bounds else ""
    if low is not None and high is not None:
        if integer and "ge" in bounds and "le" in bounds:
            return f"must be {multiple}between {_number(low)} and {_number(high)}"
        opening, closing = ("[" if "ge" in bounds else "("), ("]" if "le" in bounds else ")")
        return f"must be {multiple}in {opening}{_number(low)}, {_number(high)}{closing}"
    if bounds.get("gt") == 0 and high is None:
        return "must be a finite positive number" if not integer else "must be a positive integer"
    if low is not None:
        word = "at least" if "ge" in bounds else "greater than"
        return f"must be {'an integer' if integer else 'a number'} {multiple}of {word} {_number(low)}"
    if high is not None:
        word = "at most" if "le" in bounds else "less than"
        return f"must be {word} {_number(high)}"
    return f"must be {multiple.strip()}"


def _number(value: Any) -> str:
    """A bound as a person writes it: 1, 0.5, 2**63."""
    if isinstance(value, int) and value >= 2**16 and value & (value - 1) == 0:
        return f"2**{value.bit_length() - 1}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown(value: Any, info: FieldInfo | None) -> Any:
    """The value as the field holds it: an int given for a float field is shown as that float."""
    if info is not None and _unwrap(info.annotation) is float and type(value) is int and abs(value) < 2**1023:
        return float(value)
    return value


def _bounds(info: FieldInfo | None) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in info.metadata if info else ():
        for name in ("gt", "ge", "lt", "le", "multiple_of"):
            if isinstance(getattr(item, name, None), (int, float)) and not isinstance(item, Rule):
                found[name] = getattr(item, name)
    return found


def _allows_inf_nan(info: FieldInfo | None) -> bool:
    return not any(getattr(item, "allow_inf_nan", True) is False for item in (info.metadata if info else ()))


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    annotation = _unwrap(annotation)
    return get_args(annotation) if get_origin(annotation) is Literal else ()


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _unwrap(annotation: Any) -> Any:
    """``X | None`` and ``Annotated[X, ...]`` -> ``X``."""
    while True:
        origin = get_origin(annotation)
        if origin is typing.Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [arg for arg in get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _field_info(model: type[BaseModel], loc: tuple[Any, ...]) -> FieldInfo | None:
    """The :class:`FieldInfo` of the field at ``loc`` (model fields through dicts and lists)."""
    if not loc:
        return None
    owner = _annotation_at(model, loc[:-1])
    if _is_model(owner):
        return owner.model_fields.get(str(loc[-1]))
    return None


def _annotation_at(model: Any, loc: tuple[Any, ...]) -> Any:
    """The type at ``loc`` below ``model``: through model fields, dict values and list items."""
    annotation = model
    for part in loc:
        annotation = _unwrap(annotation)
        if _is_model(annotation):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation = field.annotation
            continue
        origin, args = get_origin(annotation), get_args(annotation)
        if origin in (dict, Mapping) and len(args) == 2:
            annotation = args[1]
        elif origin in (list, tuple, Sequence) and args:
            annotation = args[0]
        else:
            return None
    return _unwrap(annotation)


def _value_at(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        if isinstance(data, Mapping):
            data = data.get(part, _MISSING)
        elif isinstance(data, Sequence) and not isinstance(data, str) and isinstance(part, int):
            data = data[part] if part < len(data) else _MISSING
        else:
            return None
        if data is _MISSING:
            return None
    return data


def _join(loc: tuple[Any, ...]) -> str:
    """``("start_points", 0, "audio_weight")`` -> ``start_points[0].audio_weight``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
