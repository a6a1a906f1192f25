"""The walk over a raw config before validation: every key is a memfit field, a DeepSpeed key
(judged by its value, see deepspeed_keys), or unknown. A DeepSpeed key memfit does not implement
is reported as such before anything else is asked of it, and "auto" is set aside for resolution
only where memfit resolves it."""

import typing
from dataclasses import dataclass, field

from pydantic import BaseModel

from memfit.config.components import Findings
from memfit.config.deepspeed_keys import DEEPSPEED_KEYS
from memfit.config.errors import MAX_SUGGESTIONS, join_path, unknown_key
from memfit.config.values import show

# Sections DeepSpeed declares optional, where null means the defaults (no offload).
NULL_MEANS_DEFAULT = {"zero_optimization.offload_optimizer", "zero_optimization.offload_param"}

# Fields where "auto" is resolved; optimizer.params and scheduler.params take it for every key.
AUTO_FIELDS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
    "zero_optimization.reduce_bucket_size",
    # Hugging Face's templates write these as "auto" (it derives them from the hidden size)
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
    "zero_optimization.stage3_max_live_parameters",
    "zero_optimization.stage3_max_reuse_distance",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save",
}


# Fields where "auto" is one of the values, not a request for a default.
AUTO_IS_A_VALUE = {"memfit.checkpoint_blocks"}


@dataclass
class Screened:
    data: dict  # what the models validate
    auto: set[str] = field(default_factory=set)  # paths of AUTO_FIELDS given as "auto"
    written_as: dict[str, str] = field(default_factory=dict)  # memfit path -> the DeepSpeed name used
    ignored: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (section, kind) -> keys

    def ignored_warnings(self) -> list[str]:
        return [f"{path}: {', '.join(keys)} ignored: {kind}" for (path, kind), keys in self.ignored.items()]


def screen(raw: dict, model: type[BaseModel], found: Findings) -> Screened:
    screened = Screened(data={})
    screened.data = _section(raw, model, "", screened, found)
    return screened


def _section(raw: dict, model: type[BaseModel], path: str, screened: Screened, found: Findings) -> dict:
    fields = model.model_fields
    deepspeed = DEEPSPEED_KEYS.get(path, {})
    kept = {}
    num_unknown = 0
    for key, value in raw.items():
        where = join_path(path, key) if path else key
        if key in fields:
            _field(kept, key, value, fields[key].annotation, where, screened, found)
            continue
        if key not in deepspeed:
            num_unknown += 1
            valid = list(fields) + list(deepspeed) if num_unknown <= MAX_SUGGESTIONS else []
            problem = unknown_key(path, key, valid)
            if path:
                found.problems.append(problem)
            else:  # DeepSpeed ignores unknown top-level keys (other tools' settings share its file)
                found.warnings.append(f"{problem}; ignored, as DeepSpeed ignores unknown top-level keys")
            continue
        verdict = deepspeed[key](value)
        if verdict.problem:
            found.problems.append(f"{where}: {verdict.problem}")
        if verdict.warning:
            found.warnings.append(f"{where}: {verdict.warning}")
        if verdict.ignored_as:
            screened.ignored.setdefault((path, verdict.ignored_as), []).append(key)
        if verdict.rename_to is not None:
            new_where = join_path(path, verdict.rename_to) if path else verdict.rename_to
            if verdict.rename_to in raw:
                found.problems.append(f"{where}: DeepSpeed's old name for {verdict.rename_to}; give only one of them")
                continue
            screened.written_as[new_where] = where
            target = fields[verdict.rename_to].annotation
            _field(kept, verdict.rename_to, verdict.renamed_value, target, new_where, screened, found)
    return kept


def _field(kept: dict, key: str, value, annotation, where: str, screened: Screened, found: Findings) -> None:
    nested = _section_model(annotation)
    if isinstance(value, str) and value == "auto" and nested is None and where not in AUTO_IS_A_VALUE:
        if where in AUTO_FIELDS:
            screened.auto.add(where)
        else:
            found.problems.append(f'{where}: "auto" cannot be resolved for this key; give a value')
        return
    if nested is None or (value is None and type(None) in typing.get_args(annotation)):
        kept[key] = value
    elif value is None and where in NULL_MEANS_DEFAULT:
        return
    elif not isinstance(value, dict):
        found.problems.append(f"{where}: expected an object, got {show(value)}")
    else:
        kept[key] = _section(value, nested, where, screened, found)


def _section_model(annotation) -> type[BaseModel] | None:
    """The section model a field holds, if any (unwrapping Optional)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
