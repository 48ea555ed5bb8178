"""Typed settings: a dataclass field that carries its help and range, and the one check every setting goes through.

The engine-wide settings (`config.CompressionConfig`) and each policy's parameters (`scoring/`) are dataclasses
whose fields come from `setting(...)`. Their values arrive as parsed JSON or Python values (`additional_config`,
`LLM(...)`) as well as from argparse, so `check_settings` checks each against its declared type exactly (a bool is
not an int, an int not a bool, a float is finite, a choice is one of its names) and against its declared range.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from typing import Any, Literal, get_args

# Token counts above this exceed any context vLLM serves (and the int32 positions and slots the kernels use).
MAX_TOKENS = 2**31 - 1

Fail = Callable[[str, str], None]  # fail(setting name, why) raises


class SettingError(ValueError):
    """A setting is invalid, or conflicts with another vLLM option. `field` names the setting, `why` says why."""

    def __init__(self, message: str, field: str | None = None, why: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.why = why


def setting(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
            odd: bool = False) -> Any:
    """A dataclass field of a setting: its default, its one-line help (the flag's and the docs' text) and its
    closed range. Integer settings without a `maximum` are token counts, capped at `MAX_TOKENS`."""
    return dataclasses.field(default=default, metadata={"help": help, "minimum": minimum, "maximum": maximum,
                                                        "odd": odd})


def types_of(hint: Any) -> frozenset[type]:
    """The types a declared setting admits: `int | None` -> {int, NoneType}, a Literal of names -> {str}."""
    if typing.get_origin(hint) is Literal:
        return frozenset(type(choice) for choice in get_args(hint))
    return frozenset(get_args(hint) or (hint,))


def choices_of(hint: Any) -> tuple[Any, ...] | None:
    """The names a Literal setting may take; None for any other type."""
    return get_args(hint) if typing.get_origin(hint) is Literal else None


@functools.cache
def declared_types(cls: type) -> dict[str, Any]:
    """Each field's annotation, resolved (the modules use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def check_settings(instance: Any, fail: Fail, only: tuple[str, ...] | None = None) -> None:
    """Check the fields of a settings dataclass (`only` these, if given) against their declared types and ranges;
    the integers given for float settings become floats (the dataclass may be frozen)."""
    hints = declared_types(type(instance))
    for setting_field in dataclasses.fields(instance):
        name = setting_field.name
        if only is not None and name not in only:
            continue
        value, kinds = getattr(instance, name), types_of(hints[name])
        if value is None and type(None) in kinds:
            continue
        if bool in kinds:
            if type(value) is not bool:
                fail(name, f"{value!r} is not true or false")
        elif int in kinds:
            if type(value) is not int:
                fail(name, f"{value!r} is not an integer")
        elif float in kinds:
            if type(value) not in (int, float) or not finite(value):
                fail(name, f"{value!r} is not a finite number")
            value = float(value)
            object.__setattr__(instance, name, value)
        elif type(value) is not str:
            fail(name, f"{value!r} is not a string")
        choices = choices_of(hints[name])
        if choices is not None and value not in choices:
            fail(name, f"{value!r} is not one of {', '.join(map(str, choices))}")
        _check_range(name, value, setting_field.metadata, int in kinds, fail)


def _check_range(name: str, value: Any, metadata: Any, integer: bool, fail: Fail) -> None:
    low, high = metadata.get("minimum"), metadata.get("maximum")
    if integer and high is None and value > MAX_TOKENS:
        fail(name, f"{value} exceeds {MAX_TOKENS}, more tokens than any context holds")
    if low is not None and high is not None and not low <= value <= high:
        fail(name, f"{value} is outside [{low}, {high}]")
    if metadata.get("odd") and (value < 1 or value % 2 == 0):
        fail(name, f"{value} must be an odd number >= 1")
    if low is not None and high is None and value < low:
        fail(name, f"{value} must be at least {low}")


def finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float (10**400)
        return False
