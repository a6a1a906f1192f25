"""Strict value checks shared by the section models and by optimizer.params / scheduler.params.

JSON numbers are numbers, JSON true/false are booleans, and nothing is converted from a string:
"8", "yes" and "on" are errors, as are NaN and infinities wherever a number is read. The one
conversion is a whole-valued float to an integer (DeepSpeed files write 5e8 for 500000000).
Each check raises ValueError with the text that follows "path: " in a ConfigError line.
"""

import json
import math
from collections.abc import Callable
from typing import Annotated, Any

from annotated_types import Ge, Le, MultipleOf
from pydantic import BeforeValidator, Field

Check = Callable[[Any], Any]  # returns the accepted (maybe converted) value or raises ValueError

# Past 2**53 a float no longer holds every integer: 1e20 or 1e300 is not a count anyone wrote.
MAX_EXACT_FLOAT_INT = 2**53
# Counts (batch sizes, steps, buffers) far past any real job, below what C int arithmetic takes.
MAX_COUNT = 2**31 - 1


def show(value: Any) -> str:
    """A value as the user wrote it in JSON (strings quoted, true/false/null, NaN), shortened."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


def check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show(value)}")
    return value


def check_string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show(value)}")
    return value


def check_number(value: Any, minimum=None, maximum=None, above=None) -> int | float:
    """A finite JSON number within the bounds (above: strictly greater than)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {show(value)}")
    if above is not None and value <= above:
        raise ValueError(f"expected a number > {above}, got {show(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"expected a number{_bounds(minimum, maximum)}, got {show(value)}")
    return value


def check_int(value: Any, minimum=None, maximum=None, multiple_of=None, limit=None) -> int:
    """A JSON integer (or a whole-valued number such as 5e8) within the bounds. limit: a sanity
    cap past any real value, named only when a value exceeds it (the bounds stay the message for
    a value below the minimum)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) <= MAX_EXACT_FLOAT_INT:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {show(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"expected an integer{_bounds(minimum, maximum)}, got {show(value)}")
    if limit is not None and value > limit:
        raise ValueError(f"expected an integer{_bounds(minimum, limit)}, got {show(value)}")
    if multiple_of is not None and value % multiple_of:
        raise ValueError(f"expected a multiple of {multiple_of}, got {show(value)}")
    return value


def check_path(value: Any) -> str:
    """A file system path: a non-empty string without NUL bytes (the OS refuses those, late)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a path (a string), got {show(value)}")
    if not value:
        raise ValueError('expected a non-empty path, got ""')
    if "\0" in value:
        raise ValueError(f"expected a path without NUL bytes, got {show(value)}")
    return value


def check_choice(value: Any, choices: tuple) -> Any:
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(show(choice) for choice in choices)
        raise ValueError(f"expected one of {listed}, got {show(value)}")
    return value


def check_finite_anywhere(value: Any) -> Any:
    """Any JSON value, with every number in it finite (for keys whose type is not declared)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"expected a finite number, got {show(item)}")
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return value


# Field types for the section models: the check runs before pydantic sees the value, so its
# message is the one users read; the annotated_types constraints only feed the JSON Schema.

Boolean = Annotated[bool, BeforeValidator(check_bool)]


def Integer(minimum=None, maximum=None, multiple_of=None, optional: bool = False, limit=None):
    constraints = [Ge(minimum)] if minimum is not None else []
    upper = maximum if maximum is not None else limit
    constraints += [Le(upper)] if upper is not None else []
    constraints += [MultipleOf(multiple_of)] if multiple_of is not None else []

    def check(value):
        return None if value is None and optional else check_int(value, minimum, maximum, multiple_of, limit)

    bounded = Annotated[(int, *constraints)] if constraints else int
    return Annotated[bounded | None if optional else bounded, BeforeValidator(check)]


def Real(minimum=None, maximum=None):
    constraints = [Ge(minimum)] if minimum is not None else []
    constraints += [Le(maximum)] if maximum is not None else []
    bounded = Annotated[(float, *constraints)] if constraints else float
    return Annotated[bounded, BeforeValidator(lambda value: float(check_number(value, minimum, maximum)))]


def OneOf(*choices: str):
    return Annotated[
        str,
        BeforeValidator(lambda value: check_choice(value, choices)),
        Field(json_schema_extra={"enum": list(choices)}),
    ]


def Path(optional: bool = False):
    def check(value):
        return None if value is None and optional else check_path(value)

    return Annotated[str | None if optional else str, BeforeValidator(check)]


def Text(optional: bool = False):
    def check(value):
        return None if value is None and optional else check_string(value)

    return Annotated[str | None if optional else str, BeforeValidator(check)]
