"""A small declarative schema for policy models: typed fields read from TOML tables.

Each policy section is a frozen, slotted dataclass whose fields carry a
:class:`Spec` in their metadata (made with :func:`boolean`, :func:`integer`,
:func:`number`, ...). :func:`build` turns a parsed TOML table into such a
dataclass and returns *every* problem it finds, each as (dotted field,
problem), rather than stopping at the first:

- a key the section does not define: ``unknown key``;
- a value of the wrong TOML type (``true`` is a boolean, never an integer;
  ``nan``/``inf`` are not accepted as numbers);
- a value out of its range (negative ε, fraction outside (0, 1], ...);
- a cross-field problem the section's ``_cross_problems`` method reports.

The same range and cross-field checks run in ``__post_init__`` (through
:func:`raise_problems`) when a model is built in code, so a model that exists
is a valid model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from common.errors import ConfigurationError

_SPEC = "fedseal.policy.spec"
T = TypeVar("T")
Problem = tuple[str, str]

_KINDS = (
    "bool",
    "int",
    "float",
    "str",
    "str_list",
    "int_list",
    "float_table",
    "section",
    "section_table",
)


@dataclass(frozen=True, slots=True)
class Spec:
    """How one field is read and checked.

    Attributes
    ----------
    kind : str
        One of ``bool``, ``int``, ``float``, ``str``, ``str_list``,
        ``int_list``, ``float_table`` (a table of name -> number, stored as
        sorted pairs), ``section`` (a nested table) and ``section_table`` (a
        table of name -> nested table, stored as sorted pairs).
    optional : bool
        The field may be absent (``None``); TOML has no null, so a present
        key always carries a value.
    ge, gt, le, lt : float or None
        Inclusive/exclusive bounds for numbers and list elements.
    choices : tuple of str or None
        The allowed strings.
    normalize : callable or None
        Maps a string (or list element) to its canonical form, raising
        :class:`ConfigurationError` with the problem when it is invalid.
    section : type or None
        The dataclass of a ``section`` or ``section_table`` field.
    """

    kind: str
    optional: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    normalize: Callable[[str], str] | None = None
    section: type | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigurationError(f"unknown field kind {self.kind!r}")


def _field(default: object, spec: Spec) -> Any:
    return dataclasses.field(default=default, metadata={_SPEC: spec})


def boolean(default: bool) -> Any:
    """A ``true``/``false`` field."""
    return _field(default, Spec("bool"))


def integer(
    default: int | None,
    *,
    ge: float | None = None,
    le: float | None = None,
    optional: bool = False,
) -> Any:
    """An integer field (booleans refused)."""
    return _field(default, Spec("int", optional=optional, ge=ge, le=le))


def number(
    default: float | None,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    optional: bool = False,
) -> Any:
    """A finite real-number field; an integer is accepted and stored as float."""
    return _field(default, Spec("float", optional=optional, ge=ge, gt=gt, le=le, lt=lt))


def string(
    default: str | None,
    *,
    choices: tuple[str, ...] | None = None,
    normalize: Callable[[str], str] | None = None,
    optional: bool = False,
) -> Any:
    """A string field, optionally one of ``choices`` or put in canonical form."""
    return _field(default, Spec("str", optional=optional, choices=choices, normalize=normalize))


def string_list(*, normalize: Callable[[str], str] | None = None) -> Any:
    """An array of distinct strings, stored canonical and sorted as a tuple."""
    return _field((), Spec("str_list", normalize=normalize))


def integer_list(*, ge: float | None = None) -> Any:
    """An array of distinct integers, stored sorted as a tuple."""
    return _field((), Spec("int_list", ge=ge))


def number_table(*, ge: float | None = None, le: float | None = None) -> Any:
    """A table of name -> finite number, stored as sorted ``(name, value)`` pairs."""
    return _field((), Spec("float_table", ge=ge, le=le))


def section(cls: type) -> Any:
    """A nested table read into the dataclass ``cls``."""
    return dataclasses.field(default_factory=cls, metadata={_SPEC: Spec("section", section=cls)})


def section_table(cls: type) -> Any:
    """A table of name -> nested table, stored as sorted ``(name, cls)`` pairs."""
    return _field((), Spec("section_table", section=cls))


def spec_of(field: dataclasses.Field[Any]) -> Spec:
    """The :class:`Spec` of a schema field."""
    spec = field.metadata.get(_SPEC)
    if not isinstance(spec, Spec):
        raise ConfigurationError(f"field {field.name!r} has no policy schema")
    return spec


# ------------------------------------------------------------------ type names


def toml_type(value: object) -> str:
    """The TOML name of a parsed value's type, for messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _wrong_type(expected: str, value: object) -> str:
    return f"wrong type: expected {expected}, got {toml_type(value)} {_show(value)}"


# ------------------------------------------------------------------ scalar checks


def _range_problem(spec: Spec, value: int | float) -> str | None:
    if spec.ge is not None and not value >= spec.ge:
        return f"out of range: must be >= {spec.ge:g}, got {value!r}"
    if spec.gt is not None and not value > spec.gt:
        return f"out of range: must be > {spec.gt:g}, got {value!r}"
    if spec.le is not None and not value <= spec.le:
        return f"out of range: must be <= {spec.le:g}, got {value!r}"
    if spec.lt is not None and not value < spec.lt:
        return f"out of range: must be < {spec.lt:g}, got {value!r}"
    return None


def _convert_int(value: object) -> tuple[int | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, int):
        return None, _wrong_type("integer", value)
    return value, None


def _convert_float(value: object) -> tuple[float | None, str | None]:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, _wrong_type("number", value)
    if not math.isfinite(value):
        return None, f"out of range: must be a finite number, got {value!r}"
    return float(value), None


def _convert_str(spec: Spec, value: object) -> tuple[str | None, str | None]:
    if not isinstance(value, str):
        return None, _wrong_type("string", value)
    if spec.normalize is not None:
        try:
            return spec.normalize(value), None
        except ConfigurationError as exc:
            return None, f"invalid value: {exc}"
    return value, None


def _scalar_problem(spec: Spec, value: object) -> str | None:
    """Range/choice problems of an already-typed scalar (None if fine)."""
    if spec.kind in ("int", "float") and isinstance(value, int | float):
        return _range_problem(spec, value)
    if spec.kind == "str" and isinstance(value, str) and spec.choices is not None:
        if value not in spec.choices:
            allowed = ", ".join(repr(c) for c in spec.choices)
            return f"out of range: must be one of {allowed}, got {value!r}"
    return None


# ------------------------------------------------------------------ conversion


def _convert(spec: Spec, value: object, path: str, problems: list[Problem]) -> tuple[bool, object]:
    """Convert one TOML value; append problems; return (ok, converted)."""
    start = len(problems)
    result: object = None
    if spec.kind == "bool":
        if isinstance(value, bool):
            result = value
        else:
            problems.append((path, _wrong_type("boolean (true or false)", value)))
    elif spec.kind == "int":
        result, err = _convert_int(value)
        if err:
            problems.append((path, err))
    elif spec.kind == "float":
        result, err = _convert_float(value)
        if err:
            problems.append((path, err))
    elif spec.kind == "str":
        result, err = _convert_str(spec, value)
        if err:
            problems.append((path, err))
    elif spec.kind in ("str_list", "int_list"):
        result = _convert_list(spec, value, path, problems)
    elif spec.kind == "float_table":
        result = _convert_float_table(spec, value, path, problems)
    elif spec.kind == "section":
        if spec.section is None:
            raise ConfigurationError(f"{path}: section field without a dataclass")
        if isinstance(value, dict):
            result = _build_into(spec.section, value, path, problems)
        else:
            problems.append((path, _wrong_type("table", value)))
    elif spec.kind == "section_table":
        result = _convert_section_table(spec, value, path, problems)
    if spec.kind in ("str_list", "int_list", "float_table", "section_table"):
        # A container with bad entries keeps its good ones (the bad ones are
        # already reported), so cross-field checks see what was meant.
        return result is not None, result
    return len(problems) == start, result


def _convert_list(spec: Spec, value: object, path: str, problems: list[Problem]) -> object:
    if not isinstance(value, list):
        problems.append((path, _wrong_type("array", value)))
        return None
    items: list[Any] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        converted: int | str | None
        if spec.kind == "int_list":
            converted, err = _convert_int(item)
            if err is None and converted is not None:
                err = _range_problem(spec, converted)
        else:
            converted, err = _convert_str(spec, item)
        if err is not None:
            problems.append((where, err))
        elif converted in items:
            problems.append((where, f"duplicate entry {_show(item)}"))
        else:
            items.append(converted)
    return tuple(sorted(items))


def _convert_float_table(spec: Spec, value: object, path: str, problems: list[Problem]) -> object:
    if not isinstance(value, dict):
        problems.append((path, _wrong_type("table", value)))
        return None
    pairs: list[tuple[str, float]] = []
    for name, item in value.items():
        converted, err = _convert_float(item)
        if err is None and converted is not None:
            err = _range_problem(spec, converted)
        if err is not None or converted is None:
            problems.append((f"{path}.{name}", err or "invalid value"))
        else:
            pairs.append((str(name), converted))
    return tuple(sorted(pairs))


def _convert_section_table(spec: Spec, value: object, path: str, problems: list[Problem]) -> object:
    if spec.section is None:
        raise ConfigurationError(f"{path}: section table without a dataclass")
    if not isinstance(value, dict):
        problems.append((path, _wrong_type("table", value)))
        return None
    pairs: list[tuple[str, object]] = []
    for name, item in value.items():
        where = f"{path}.{name}"
        if not isinstance(item, dict):
            problems.append((where, _wrong_type("table", item)))
            continue
        pairs.append((str(name), _build_into(spec.section, item, where, problems)))
    return tuple(sorted(pairs, key=lambda p: p[0]))


def _new_unchecked(cls: type[T], values: Mapping[str, object]) -> T:
    """An instance of a frozen dataclass without running ``__post_init__``."""
    obj = object.__new__(cls)
    for name, val in values.items():
        object.__setattr__(obj, name, val)
    return obj


def _default(field: dataclasses.Field[Any]) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise ConfigurationError(f"field {field.name!r} has no default")


def _build_into(cls: type[T], table: Mapping[str, object], path: str, problems: list[Problem]) -> T:
    prefix = f"{path}." if path else ""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in table:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            allowed = ", ".join(fields)
            problems.append((f"{prefix}{key}", f"unknown key{hint}; allowed keys: {allowed}"))
    values: dict[str, object] = {}
    broken: set[str] = set()
    for name, f in fields.items():
        if name not in table:
            values[name] = _default(f)
            continue
        ok, converted = _convert(spec_of(f), table[name], f"{prefix}{name}", problems)
        if ok:
            values[name] = converted
        else:
            values[name] = _default(f)
            broken.add(f"{prefix}{name}")
    obj = _new_unchecked(cls, values)
    for where, problem in instance_problems(obj, path):
        if where not in broken:
            problems.append((where, problem))
    return obj


def build(cls: type[T], table: Mapping[str, object], path: str = "") -> tuple[T, list[Problem]]:
    """Read ``table`` into the schema dataclass ``cls``.

    Parameters
    ----------
    cls : type
        A dataclass whose fields were declared with this module's helpers.
    table : mapping
        The parsed TOML table.
    path : str
        The dotted prefix for field names in problems (``""`` at top level).

    Returns
    -------
    tuple
        The model and the list of (dotted field, problem). The model is only
        meaningful when the list is empty; otherwise broken fields hold their
        defaults.
    """
    problems: list[Problem] = []
    obj = _build_into(cls, table, path, problems)
    return obj, problems


# ------------------------------------------------------------------ instance checks


def _typed_ok(spec: Spec, value: object) -> bool:
    if spec.kind == "bool":
        return isinstance(value, bool)
    if spec.kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec.kind == "float":
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        )
    if spec.kind == "str":
        return isinstance(value, str)
    if spec.kind in ("str_list", "int_list", "float_table", "section_table"):
        return isinstance(value, tuple)
    if spec.kind == "section":
        return spec.section is not None and isinstance(value, spec.section)
    return False


def instance_problems(obj: object, path: str = "") -> list[Problem]:
    """Type, range, canonical-form and cross-field problems of one model (not nested ones)."""
    prefix = f"{path}." if path else ""
    problems: list[Problem] = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        spec = spec_of(f)
        value = getattr(obj, f.name)
        where = f"{prefix}{f.name}"
        if value is None and spec.optional:
            continue
        if not _typed_ok(spec, value):
            problems.append((where, f"wrong type: got {type(value).__name__} {_show(value)}"))
            continue
        problem = _scalar_problem(spec, value)
        if problem is not None:
            problems.append((where, problem))
        if spec.kind == "str" and spec.normalize is not None and isinstance(value, str):
            problems.extend(_canonical_problems(spec.normalize, [value], where, single=True))
        if spec.kind == "str_list" and spec.normalize is not None and isinstance(value, tuple):
            problems.extend(_canonical_problems(spec.normalize, list(value), where, single=False))
        if spec.kind == "int_list" and isinstance(value, tuple):
            for i, item in enumerate(value):
                if isinstance(item, bool) or not isinstance(item, int):
                    problems.append((f"{where}[{i}]", _wrong_type("integer", item)))
                elif (err := _range_problem(spec, item)) is not None:
                    problems.append((f"{where}[{i}]", err))
    cross: Callable[[], list[Problem]] | None = getattr(obj, "_cross_problems", None)
    if cross is not None:
        problems.extend((f"{prefix}{name}", problem) for name, problem in cross())
    return problems


def _canonical_problems(
    normalize: Callable[[str], str], values: list[object], where: str, *, single: bool
) -> list[Problem]:
    problems: list[Problem] = []
    for i, item in enumerate(values):
        at = where if single else f"{where}[{i}]"
        if not isinstance(item, str):
            problems.append((at, _wrong_type("string", item)))
            continue
        try:
            canonical = normalize(item)
        except ConfigurationError as exc:
            problems.append((at, f"invalid value: {exc}"))
            continue
        if canonical != item:
            problems.append((at, f"not in canonical form; use {_show(canonical)}"))
    return problems


def raise_problems(obj: object) -> None:
    """``__post_init__`` helper: raise :class:`ConfigurationError` naming every problem."""
    problems = instance_problems(obj)
    if problems:
        name = type(obj).__name__
        raise ConfigurationError(
            f"invalid {name}: " + "; ".join(f"{where}: {what}" for where, what in problems)
        )


# ------------------------------------------------------------------ canonical dump


def to_plain(obj: object) -> dict[str, object]:
    """The model as plain JSON-ready data: floats as floats, lists sorted, nested tables as dicts.

    Absent optional fields are left out, so that a file that omits an
    optional key and the model built in code without it dump identically.
    """
    out: dict[str, object] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        spec = spec_of(f)
        value = getattr(obj, f.name)
        if value is None:
            continue
        out[f.name] = _plain_value(spec, value)
    return out


def _plain_value(spec: Spec, value: object) -> object:
    if spec.kind == "float" and isinstance(value, int | float):
        return float(value)
    if spec.kind in ("str_list", "int_list") and isinstance(value, tuple):
        return sorted(value)
    if spec.kind == "float_table" and isinstance(value, tuple):
        return {str(k): float(v) for k, v in sorted(value)}
    if spec.kind == "section":
        return to_plain(value)
    if spec.kind == "section_table" and isinstance(value, tuple):
        return {str(k): to_plain(v) for k, v in sorted(value, key=lambda p: str(p[0]))}
    return value
