"""Loading a config from a JSON file, a dict or a MemfitConfig, validated once, with every problem
reported together as one ConfigError."""

import json
import os
import typing
import warnings

from pydantic import BaseModel, ValidationError

from memfit.config.deepspeed_keys import COSMETIC, UNSUPPORTED
from memfit.config.errors import ConfigError, describe_pydantic_error, join_path, unknown_key
from memfit.config.models import MemfitConfig


def load_config(source) -> MemfitConfig:
    """source: a path to a JSON file, a dict, or a MemfitConfig (returned as is)."""
    if isinstance(source, MemfitConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        raw = _read_json(name)
    elif isinstance(source, dict):
        name, raw = "config", source
    else:
        raise TypeError(f"config: expected a file path, a dict or a MemfitConfig, got {type(source).__name__}")
    if not isinstance(raw, dict):
        raise ConfigError([f"expected a JSON object at the top level, got {type(raw).__name__}"], name)

    problems: list[str] = []
    cleaned = _screen_keys(raw, MemfitConfig, "", problems)
    config = None
    try:
        config = MemfitConfig.model_validate(cleaned)
    except ValidationError as error:
        problems += [describe_pydantic_error(e) for e in error.errors()]
    problems += _check_component_params(cleaned)
    if problems:
        raise ConfigError(problems, name)
    return config


def _read_json(path: str):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as error:
        raise ConfigError([f"cannot read: {error.strerror}"], path) from None

    def reject_duplicates(pairs):
        keys = [key for key, _ in pairs]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise ValueError(f"duplicate keys {duplicates}")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=reject_duplicates)
    except json.JSONDecodeError as error:
        raise ConfigError([f"line {error.lineno}, column {error.colno}: invalid JSON: {error.msg}"], path) from None
    except ValueError as error:
        raise ConfigError([f"invalid JSON: {error}"], path) from None


def _section_model(annotation):
    """The Section model a field holds, if any (unwrapping Optional)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _screen_keys(raw: dict, model: type[BaseModel], path: str, problems: list[str]) -> dict:
    """Drops keys pydantic must not see, recording why: unknown keys (with a suggestion), DeepSpeed
    keys memfit lacks, cosmetic DeepSpeed keys (a warning), and DeepSpeed's "auto"."""
    cleaned = {}
    fields = model.model_fields
    for key, value in raw.items():
        where = join_path(path, key) if path else key
        if value == "auto":
            problems.append(f'{where}: "auto" is not accepted by memfit; give a value')
            continue
        if key in fields:
            nested = _section_model(fields[key].annotation)
            if nested is not None and isinstance(value, dict):
                value = _screen_keys(value, nested, where, problems)
            cleaned[key] = value
        elif key == "fp16" and not path and isinstance(value, dict) and not value.get("enabled", False):
            warnings.warn("config: fp16 is disabled; the section is ignored", UserWarning, stacklevel=4)
        elif key in UNSUPPORTED.get(path, ()):
            problems.append(f"{where}: supported by DeepSpeed, not by memfit")
        elif key in COSMETIC.get(path, ()):
            warnings.warn(
                f"config: {where} is ignored by memfit (it does not change training)", UserWarning, stacklevel=4
            )
        else:
            problems.append(unknown_key(path, key, list(fields)))
    return cleaned


def _check_component_params(cleaned: dict) -> list[str]:
    """optimizer.params and scheduler.params against the named component's signature; checked
    even when other sections failed, so that one run reports everything."""
    from memfit.optim.registry import optimizer_param_problems
    from memfit.runtime.schedulers import SCHEDULERS, scheduler_param_problems

    problems = []
    optimizer, scheduler = cleaned.get("optimizer"), cleaned.get("scheduler")
    if isinstance(optimizer, dict) and isinstance(optimizer.get("params", {}), dict):
        problems += optimizer_param_problems(optimizer.get("type", "AdamW"), optimizer.get("params", {}))
    if (
        isinstance(scheduler, dict)
        and scheduler.get("type") in SCHEDULERS
        and isinstance(scheduler.get("params", {}), dict)
    ):
        problems += scheduler_param_problems(scheduler["type"], scheduler.get("params", {}))
    return problems
