"""optimizer.params and scheduler.params: checked against the keyword arguments of the component
they are passed to, with the same strictness as the section models. The expected type of each key
comes from its annotation (torch.optim and memfit's schedules are annotated) or, lacking one, from
its default; range checks are the component's own, run on a small probe and traced back to the
key that fails them, so that every message names its key."""

import inspect
import math
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memfit.config.errors import unknown_keys
from memfit.config.values import check_bool, check_finite_anywhere, check_int, check_number, check_string, show


@dataclass(frozen=True)
class Kind:
    """An expected JSON type: `description` for messages, `check` returns the value or raises."""

    description: str
    check: Callable[[Any], Any]


ANY = Kind("any value", check_finite_anywhere)
NULL = Kind("null", lambda value: value if value is None else _fail("null", value))
BOOL = Kind("true or false", check_bool)
INT = Kind("an integer", check_int)
NUMBER = Kind("a number", check_number)
STRING = Kind("a string", check_string)


def _fail(description: str, value):
    raise ValueError(f"expected {description}, got {show(value)}")


def _list_of(items: list[Kind] | Kind) -> Kind:
    """A list of fixed length (one kind per position) or of any length (one kind for all)."""
    fixed = isinstance(items, list)
    element = items[0] if fixed and items else items
    plural = {"a number": "numbers", "an integer": "integers", "a string": "strings"}.get(element.description)
    description = f"a list of {len(items)} {plural or 'values'}" if fixed else f"a list of {plural or 'values'}"

    def check(value):
        if not isinstance(value, (list, tuple)) or (fixed and len(value) != len(items)):
            _fail(description, value)
        try:
            return [(items[i] if fixed else items).check(item) for i, item in enumerate(value)]
        except ValueError:
            non_finite = any(isinstance(item, float) and not math.isfinite(item) for item in value)
            _fail(description.replace("numbers", "finite numbers") if non_finite else description, value)

    return Kind(description, check)


def _union(kinds: list[Kind]) -> Kind:
    description = " or ".join(dict.fromkeys(kind.description for kind in kinds))

    def check(value):
        for kind in kinds:
            try:
                return kind.check(value)
            except ValueError:
                continue
        if isinstance(value, float) and not math.isfinite(value) and NUMBER in kinds:
            NUMBER.check(value)  # the specific message: expected a finite number
        _fail(description, value)

    return Kind(description, check)


def kind_from_hint(hint) -> Kind | None:
    """The Kind an annotation asks for, or None when it is not one a JSON value can meet."""
    if hint in (bool, int, float, str):
        return {bool: BOOL, int: INT, float: NUMBER, str: STRING}[hint]
    import torch  # here, not at the top: `memfit --help` runs without torch (components load it first)

    if hint is torch.Tensor:
        return NUMBER  # torch.optim takes tensors for lr and betas; a config gives numbers
    if hint is type(None):
        return NULL
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        choices = args
        listed = ", ".join(show(choice) for choice in choices)
        return Kind(f"one of {listed}", lambda value: value if value in choices else _fail(f"one of {listed}", value))
    if origin in (typing.Union, types.UnionType):
        members = {}
        for kind in map(kind_from_hint, args):
            if kind is not None:
                members.setdefault(kind.description, kind)
        return _union(list(members.values())) if members else None
    if origin in (tuple, list) and args:
        if origin is tuple and Ellipsis not in args:
            items = [kind_from_hint(arg) for arg in args]
            return _list_of(items) if all(items) else None
        item = kind_from_hint(args[0])
        return _list_of(item) if item else None
    return None


def kind_from_default(default) -> Kind:
    """For unannotated keywords: integers count as numbers, since untyped code writes 0 for 0.0."""
    if isinstance(default, bool):
        return BOOL
    if isinstance(default, (int, float)):
        return NUMBER
    if isinstance(default, str):
        return STRING
    if isinstance(default, (tuple, list)) and default:
        kinds = [kind_from_default(item) for item in default]
        # numbers in a tuple are a fixed shape (betas); names are a list of any length (modules)
        return _list_of(kinds) if all(kind is NUMBER for kind in kinds) else _list_of(kinds[0])
    return ANY


@dataclass(frozen=True)
class Keyword:
    name: str
    kind: Kind
    default: Any = inspect.Parameter.empty

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


def keywords_of(function, skip: int) -> list[Keyword]:
    """The keyword arguments of function after its first `skip` parameters; a function whose
    `forwards_to` names a class also takes that class's keywords (after its params)."""
    found: dict[str, Keyword] = {}
    for target, leading in ((function, skip), (getattr(function, "forwards_to", None), 2)):
        if target is None:
            continue
        init = target.__init__ if inspect.isclass(target) else target
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # unresolvable annotations: fall back to the defaults
            hints = {}
        parameters = list(inspect.signature(init).parameters.values())[leading:]
        for parameter in parameters:
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or parameter.name in found:
                continue
            hinted = kind_from_hint(hints[parameter.name]) if parameter.name in hints else None
            kind = hinted or kind_from_default(parameter.default)
            found[parameter.name] = Keyword(parameter.name, kind, parameter.default)
    return list(found.values())


def check_params(
    path: str, given: dict, keywords: list[Keyword], attempt, reported: frozenset = frozenset()
) -> tuple[dict, list[str]]:
    """(the accepted values, problems): unknown and missing keys, then types, then whatever the
    component rejects when attempt(values) builds it, traced to the key that fails. reported:
    keys already reported (and left out of given), not to be called missing."""
    by_name = {keyword.name: keyword for keyword in keywords}
    problems = unknown_keys(path, [key for key in given if key not in by_name], list(by_name))
    problems += [
        f"{path}.{keyword.name}: required key missing"
        for keyword in keywords
        if keyword.required and keyword.name not in given and keyword.name not in reported
    ]
    accepted = {}
    for key, value in given.items():
        if key not in by_name:
            continue
        try:
            accepted[key] = by_name[key].kind.check(value)
        except ValueError as error:
            problems.append(f"{path}.{key}: {error}")
    if problems or reported:
        return accepted, problems
    error = _attempt(attempt, accepted)
    if error is None:
        return accepted, []
    required = {key: value for key, value in accepted.items() if by_name[key].required}
    for key, value in accepted.items():
        alone = _attempt(attempt, {**required, key: value})
        if alone is not None:
            for restated in (f"{key}: ", f"{key} "):  # "warmup_num_steps must be ..." names the key again
                alone = alone.removeprefix(restated)
            problems.append(f"{path}.{key}: {alone}")
    return accepted, problems or [f"{path}: {error}"]


def _attempt(attempt, values: dict) -> str | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe's warnings are the real build's to give
        try:
            attempt(values)
        except Exception as error:  # whatever the component raises, it raised for these values
            return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return None
