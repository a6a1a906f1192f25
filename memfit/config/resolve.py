"""The one entry point from a raw config to a MemfitConfig: read, screen keys, resolve "auto",
validate, check the batch rule. The engine calls resolve_config(raw, world_size, client) and logs
the returned resolved values on rank 0; `memfit config check` and `memfit run` call the same
function, so they accept exactly what memfit.initialize accepts. Every problem is reported
together in one ConfigError, one line each, each naming its key."""

import os
import warnings
from dataclasses import dataclass, field

from pydantic import ValidationError

from memfit.config.batch import ACCUMULATION, MICRO, TRAIN, batch_problems, check_world_size, resolve_batch
from memfit.config.client import ClientComponents
from memfit.config.components import Findings, Resolved, resolve_optimizer, resolve_scheduler
from memfit.config.deepspeed_keys import STAGE3_SETTINGS, STAGE3_TUNING
from memfit.config.errors import ConfigError, describe_pydantic_error
from memfit.config.models import MemfitConfig
from memfit.config.read import nesting_problem, read_config_file
from memfit.config.screen import screen
from memfit.config.values import check_int, show

# "auto" that is not the key's default: the Hugging Face Trainer fills gradient_clipping with its
# max_grad_norm (1.0), while a missing key means DeepSpeed's default, 0 (off).
AUTO_OTHER_THAN_DEFAULT = {"gradient_clipping": (1.0, "auto: 1.0, the Hugging Face Trainer's max_grad_norm")}


@dataclass(frozen=True)
class ResolvedConfig:
    config: MemfitConfig
    resolved: list[Resolved] = field(default_factory=list)  # what memfit chose; rank 0 logs these


def resolve_config(source, world_size: int | None = None, client: ClientComponents | None = None) -> ResolvedConfig:
    """source: a JSON file path, a dict, or a MemfitConfig. world_size: the number of data-parallel
    ranks, or None to check only what does not depend on it (the batch triple stays partly
    unresolved). client: what memfit.initialize was given besides the config."""
    if world_size is not None:
        check_world_size(world_size)
    if isinstance(source, MemfitConfig):
        if world_size is None:
            return ResolvedConfig(source)
        source = source.model_dump()
    name, raw = _raw(source)
    found = Findings()
    screened = screen(raw, MemfitConfig, found)
    data = screened.data
    _resolve_defaults(data, screened.auto, found)
    client = client or ClientComponents()
    optimizer, lr = resolve_optimizer(data.get("optimizer"), client, found)
    data["optimizer"] = optimizer if data.get("optimizer") is not None else None
    data["scheduler"] = resolve_scheduler(data.get("scheduler"), client, lr, found)
    config = None
    try:
        config = MemfitConfig.model_validate(data)
    except ValidationError as error:
        found.problems += [describe_pydantic_error(e) for e in error.errors()]
    batch = _check_batch(data, world_size, frozenset(screened.auto), found)
    if config is not None and config.bf16.enabled and config.fp16.enabled:
        found.problems.append("fp16.enabled: true together with bf16.enabled true; enable one of them")
    if config is not None and config.gradient_allreduce_op == "sum" and config.zero_optimization.stage == 3:
        found.problems.append('gradient_allreduce_op: "sum" is refused at ZeRO stage 3, as DeepSpeed refuses it')
    if config is not None:
        found.warnings += checkpointing_settings_ignored(config.activation_checkpointing)
        written = [  # the keys as the file names them (DeepSpeed's other names included)
            screened.written_as.get(f"zero_optimization.{key}", key).rpartition(".")[2]
            for key in data.get("zero_optimization", {})
        ]
        stage3_settings_ignored(config.zero_optimization, written, screened.ignored)
    found.warnings += screened.ignored_warnings()
    problems = list(dict.fromkeys(_as_written(problem, screened.written_as) for problem in found.problems))
    if problems:
        raise ConfigError(problems, name)
    for warning in found.warnings:
        warnings.warn(f"{name}: {warning}", UserWarning, stacklevel=3)
    if batch is not None:
        config = config.model_copy(update=dict(zip((TRAIN, MICRO, ACCUMULATION), batch)))
    return ResolvedConfig(config, found.resolved)


CHECKPOINTING_IGNORED = {
    "partition_activations": "memfit has no model-parallel ranks to split activations over",
    "contiguous_memory_optimization": "torch's checkpoint keeps each block's inputs as they are",
    "number_checkpoints": "it sizes DeepSpeed's contiguous buffer",
    "synchronize_checkpoint_boundary": "memfit does not synchronize CUDA at checkpoints",
    "profile": "memfit does not time checkpoints",
}


def checkpointing_settings_ignored(section) -> list[str]:
    """The activation_checkpointing keys that ask for something memfit does not do, one warning each."""
    return [
        f"activation_checkpointing.{key}: {show(getattr(section, key))} is ignored by memfit: {why}"
        for key, why in CHECKPOINTING_IGNORED.items()
        if getattr(section, key) not in (False, None)
    ]


def stage3_settings_ignored(zero, written: list[str], ignored: dict) -> None:
    """Below stage 3 every stage-3 setting changes nothing, as in DeepSpeed: memfit's fields join
    DeepSpeed's tuning keys in one warning. At stage 3 only the tuning keys are ignored."""
    key = ("zero_optimization", STAGE3_SETTINGS)
    if zero.stage == 3:
        if key in ignored:
            ignored[("zero_optimization", STAGE3_TUNING)] = ignored.pop(key)
        buffers = [name for name in ("buffer_count", "buffer_size") if name in zero.offload_param.model_fields_set]
        if buffers:
            reason = "memfit reads each tensor into a buffer of its own size"
            ignored[("zero_optimization.offload_param", reason)] = buffers
        return
    fields = {name.removeprefix("stage3_") for name in type(zero).model_fields if name.startswith("stage3_")}
    given = [name for name in written if name.removeprefix("stage3_") in fields]
    if zero.offload_param.device != "none":
        given.append("offload_param")
    if given:
        ignored[key] = given + ignored.get(key, [])


def load_config(source) -> MemfitConfig:
    """resolve_config without a world size or passed components: a path, dict or MemfitConfig."""
    return resolve_config(source).config


def engine_gaps(config: MemfitConfig, world_size: int | None = None) -> list[str]:
    """Settings the config accepts that the engine refuses at this world size, as problem lines;
    the engine, `memfit config check --world-size` and `memfit run` all refuse them."""
    zero = config.zero_optimization
    if zero.offload_optimizer.device != "none" and zero.stage == 0 and (world_size or 1) > 1:
        return [
            f'zero_optimization.offload_optimizer.device: "{zero.offload_optimizer.device}" needs ZeRO stage 1 or 2 '
            "on more than one rank (at stage 0 every rank would keep all the state)"
        ]
    return []


def _raw(source) -> tuple[str, dict]:
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        raw = read_config_file(name)
    elif isinstance(source, dict):
        name, raw = "config", source
    else:
        raise TypeError(f"config: expected a file path, a dict or a MemfitConfig, got {type(source).__name__}")
    if not isinstance(raw, dict):
        raise ConfigError([f"expected a JSON object at the top level, got {type(raw).__name__}"], name)
    if (problem := nesting_problem(raw)) is not None:
        raise ConfigError([problem], name)
    return name, raw


def _resolve_defaults(data: dict, auto: set[str], found: Findings) -> None:
    """ "auto" on a plain field is its default (DeepSpeed's); the batch members stay unset here."""
    for path in sorted(auto - {TRAIN, MICRO, ACCUMULATION}):
        *sections, key = path.split(".")
        model, target = MemfitConfig, data
        for section in sections:
            model, target = model.model_fields[section].default_factory, target[section]
        if path in AUTO_OTHER_THAN_DEFAULT:
            target[key], reason = AUTO_OTHER_THAN_DEFAULT[path]
        else:
            target[key], reason = model.model_fields[key].default, "auto: the default"
        found.resolved.append(Resolved(path, target[key], reason))


def _check_batch(data: dict, world_size: int | None, auto: frozenset, found: Findings) -> tuple | None:
    """The batch triple for world_size (None without one), its problems added to found. Skipped
    while a member is itself invalid: the model reports that."""
    members = []
    for key in (TRAIN, MICRO, ACCUMULATION):
        try:
            members.append(check_int(data[key], minimum=1) if data.get(key) is not None else None)
        except ValueError:
            return None
    if world_size is None:
        found.problems += batch_problems(*members, auto)
        return None
    try:
        train, micro, accumulation, derived = resolve_batch(*members, world_size, auto)
    except ConfigError as error:
        found.problems += error.problems
        return None
    values = {TRAIN: train, MICRO: micro, ACCUMULATION: accumulation}
    found.resolved += [Resolved(key, values[key], how) for key, how in derived.items()]
    return train, micro, accumulation


def _as_written(problem: str, written_as: dict[str, str]) -> str:
    """A problem found under a memfit name, given the DeepSpeed name the user wrote."""
    for memfit_path, deepspeed_path in written_as.items():
        if problem.startswith(memfit_path) and problem[len(memfit_path) : len(memfit_path) + 1] in (".", ":", "["):
            return deepspeed_path + problem[len(memfit_path) :]
    return problem
